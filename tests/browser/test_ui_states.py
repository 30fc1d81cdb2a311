"""Issue #10's honest UI states, in headless Chromium against gunicorn + a Celery worker: a
failed job turns red live, the retrain plan is on the Training page, "Wrong? It was ..." turns
a prediction into training data (and refuses a test-set clip), and /training and /data fit a
400 px wide phone. (The live training curves and the footer's served model after a promotion
are checked in ``test_browser.py``'s retrain test, which runs the real job.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_browser import css, login, wait
from web_helpers import clip_path, pick

from src.preprocessing import CLASSES

pytestmark = pytest.mark.browser
SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"


def add_job(**values) -> str:
    from src.db import TrainingJob, session_scope
    from src.settings import get_settings

    with session_scope(get_settings().db_url) as s:
        job = TrainingJob(requested_by="browser-test", **values)
        s.add(job)
        s.flush()
        return job.id


def update_job(job_id: str, **values) -> None:
    from src.db import TrainingJob, session_scope
    from src.settings import get_settings

    with session_scope(get_settings().db_url) as s:
        job = s.get(TrainingJob, job_id)
        for key, value in values.items():
            setattr(job, key, value)


def narrow_screenshot(browser, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(400, min(max(int(height), 800), 4000))
    browser.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def test_failed_job_turns_red_live(system, browser, screenshot):
    history = [{"epoch": 1, "loss": 2.1, "val_f1": 0.2, "seconds": 3.0}]
    job_id = add_job(status="running", progress={
        "stage": "training", "epoch": 1, "epochs": 4, "loss": 2.1, "val_f1": 0.2,
        "history": history, "eta_s": 9.0, "stopped_early": False})
    try:
        browser.get(f"{system.url}/training/jobs/{job_id}")
        wait(browser, lambda b: css(b, "[data-testid=job-status]").text == "running")
        assert "alert-info" in css(browser, "[data-testid=job-banner]").get_attribute("class")
        assert "left" in css(browser, "[data-field=eta]").text
        browser.execute_script("window.__samePage = true;")
    finally:  # never leave an active job behind: it would block the retrain tests
        update_job(job_id, status="failed", error="No fixed test set: found no clips",
                   message="Failed: No fixed test set: found no clips in fold 3")
    wait(browser, lambda b: css(b, "[data-testid=job-status]").text == "failed", 30)
    assert browser.execute_script("return window.__samePage === true;")
    banner = css(browser, "[data-testid=job-banner]")
    assert "alert-error" in banner.get_attribute("class")
    assert "Retrain failed" in banner.text and "No fixed test set" in banner.text
    bar = css(browser, "progress")
    assert bar.get_attribute("value") == "0" and "bar-failed" in bar.get_attribute("class")
    color = browser.execute_script(
        "return getComputedStyle(arguments[0]).backgroundColor", banner)
    assert color == "rgb(253, 236, 238)"  # the error tone, not green
    screenshot("job-failed")
    # the same job, loaded fresh (no JavaScript involved in the verdict)
    browser.get(f"{system.url}/training/jobs/{job_id}")
    assert "alert-error" in css(browser, "[data-testid=job-banner]").get_attribute("class")


def test_training_page_shows_the_plan(system, browser, screenshot):
    if system.api("GET", "/api/v1/uploads").json()["stats"]["n_unused"] == 0:
        rows = [r for r in pick(system.rows, 2, 1, skip=12) if r["class"] in ("siren", "drilling")]
        files = [("files", (f"{r['class']}/{r['slice_file_name']}", clip_path(r).open("rb")))
                 for r in rows]
        assert system.api("POST", "/api/v1/uploads", files=files).status_code == 201
    plan = system.api("GET", "/api/v1/retrain/plan").json()
    login(browser, system)
    browser.get(system.url + "/training")
    box = css(browser, "[data-testid=retrain-plan]")
    assert "base training clips" in box.text and "test set" in box.text
    assert css(browser, "[data-testid=plan-new]").text == str(plan["new_uploads"]) != "0"
    assert int(css(browser, "[data-testid=plan-test]").text) == plan["test_set"]["n"] > 0
    assert plan["ready"] and css(browser, "[data-testid=retrain]").get_attribute("disabled") \
        is None
    screenshot("training-plan")


def test_footer_follows_the_served_model(system, browser):
    """Another version is activated (as a promotion would): the footer follows, no reload."""
    models = system.api("GET", "/api/v1/models").json()
    active = models["served"]
    other = [m["version"] for m in models["items"]
             if not m["active"] and m["status"] in ("rejected", "retired", "candidate")]
    if not other:
        pytest.skip("no second version yet (test_browser.py's retrain makes one)")
    browser.get(system.url + "/data")
    browser.execute_script("window.__samePage = true;")
    footer = "[data-testid=served-version]"
    assert css(browser, footer).text == active
    try:
        r = system.api("POST", f"/api/v1/models/{other[0]}/activate", params={"force": "true"})
        assert r.status_code == 200, r.text
        wait(browser, lambda b: css(b, footer).text == other[0], 30)
        assert browser.execute_script("return window.__samePage === true;")
    finally:
        system.api("POST", f"/api/v1/models/{active}/activate", params={"force": "true"})
    wait(browser, lambda b: css(b, footer).text == active, 30)


def predict(browser, system, row) -> str:
    browser.get(system.url + "/")
    css(browser, "#file").send_keys(str(clip_path(row)))
    css(browser, "#predict-form button[type=submit]").click()
    return wait(browser, lambda b: b.find_elements("css selector",
                                                   "[data-testid=predicted-label]"))[0].text


def correct(browser, label: str) -> str:
    from selenium.webdriver.support.ui import Select

    browser.execute_script("window.__samePage = true;")
    Select(css(browser, "#feedback-label")).select_by_value(label)
    css(browser, "[data-testid=feedback-submit]").click()
    report = wait(browser, lambda b: b.find_elements("css selector",
                                                     "[data-testid=feedback-report]"))[0]
    assert browser.execute_script("return window.__samePage === true;")  # stayed on the answer
    assert css(browser, "[data-testid=prediction]").is_displayed()
    return report.text


def test_wrong_it_was(system, browser, screenshot):
    browser.get(system.url + "/")
    if "Log out" in browser.page_source:
        browser.find_element("css selector", ".nav-session button").click()
        wait(browser, lambda b: "Log in" in b.page_source)
    row = pick(system.rows, 2, 1, skip=8)[CLASSES.index("dog_bark")]
    predict(browser, system, row)
    link = css(browser, "[data-testid=feedback-login]")
    assert "Log in to teach the model" in link.text

    login(browser, system)
    before = system.api("GET", "/api/v1/uploads").json()["stats"]["n_clips"]
    label = predict(browser, system, row)
    wrong = "dog_bark" if label != "dog bark" else "siren"
    assert css(browser, "label[for=feedback-label]").text == "Wrong? It was …"
    screenshot("predict-feedback-form")
    text = correct(browser, wrong)
    assert "Saved as training data for the next retrain" in text
    assert css(browser, "form[data-feedback]").get_attribute("hidden") is not None
    screenshot("predict-feedback")
    assert system.api("GET", "/api/v1/uploads").json()["stats"]["n_clips"] == before + 1

    # a clip of the gate's test set (fold 3) is refused, with the reason
    test_row = pick(system.rows, 3, 1)[CLASSES.index("siren")]
    predict(browser, system, test_row)
    text = correct(browser, "siren" if css(browser, "[data-testid=predicted-label]").text
                   != "siren" else "dog_bark")
    assert "Not saved" in text and "in_test_set" in text
    screenshot("predict-feedback-rejected")


@pytest.mark.parametrize(("path", "button"), [
    ("/training", "[data-testid=retrain]"),
    ("/data", "#upload-form button[type=submit]"),
])
def test_fits_a_400px_screen(system, browser, path, button):
    login(browser, system)
    browser.set_window_size(400, 900)
    try:
        browser.get(system.url + path)
        time.sleep(0.5)
        width = browser.execute_script("return window.innerWidth")
        scroll = browser.execute_script("return document.documentElement.scrollWidth")
        wide = browser.execute_script(  # what sticks out, for the failure message
            "return [...document.querySelectorAll('body *')].filter(e => "
            "e.getBoundingClientRect().right > window.innerWidth + 0.5 && "
            "!(e.parentElement && e.parentElement.closest('.table-scroll'))).slice(0, 8)"
            ".map(e => e.tagName + '.' + e.className + ' ' +"
            " Math.round(e.getBoundingClientRect().right));")
        assert width <= 400 and scroll <= 400, f"{path}: page is {scroll} px wide: {wide}"
        rect = browser.execute_script(
            "const r = arguments[0].getBoundingClientRect();"
            "return {left: r.left, right: r.right};", css(browser, button))
        assert rect["left"] >= 0 and rect["right"] <= width, rect
        narrow_screenshot(browser, f"narrow{path.replace('/', '-')}")
    finally:
        browser.set_window_size(1280, 1000)
