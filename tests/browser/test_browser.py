"""What a person sees, in headless Chromium against gunicorn + a Celery worker: predict a real
clip, record from the (fake) microphone, upload a folder, retrain and watch it finish, the data
set visualisations and the dashboard's plots. Each test saves a screenshot."""

from __future__ import annotations

import shutil
import time

import pytest
from web_helpers import PASSWORD, clip_path, pick

from src.preprocessing import CLASSES

pytestmark = pytest.mark.browser
LABELS = {c.replace("_", " ") for c in CLASSES}


def wait(browser, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.5).until(condition)


def css(browser, selector: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, selector)


def all_css(browser, selector: str):
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, selector)


def images_loaded(browser, selector: str) -> bool:
    return browser.execute_script(
        "const imgs = [...document.querySelectorAll(arguments[0])];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);", selector)


def login(browser, system) -> None:
    browser.get(f"{system.url}/login?next=/data")
    if "Log out" in browser.page_source:
        return
    css(browser, "#password").send_keys(PASSWORD)
    css(browser, "form.card button[type=submit]").click()
    wait(browser, lambda b: "Log out" in b.page_source)


def test_predict_a_real_clip(system, browser, screenshot):
    row = pick(system.rows, 2, 1)[CLASSES.index("siren")]
    path = clip_path(row)
    expected = system.api("POST", "/api/v1/predict", files={"file": path.open("rb")}).json()

    browser.get(system.url + "/")
    css(browser, "#file").send_keys(str(path))
    css(browser, "#predict-form button[type=submit]").click()
    label = wait(browser, lambda b: b.find_elements("css selector",
                                                    "[data-testid=predicted-label]"))[0].text
    assert label in LABELS and label == expected["label"].replace("_", " ")
    assert len(all_css(browser, "table.bars meter")) == len(CLASSES)
    assert images_loaded(browser, ".result img.plot")  # the log-mel spectrogram
    assert css(browser, "audio").get_attribute("src").startswith("data:audio/")
    assert path.name in browser.page_source
    screenshot("predict")


def test_record_from_the_microphone(system, browser, screenshot):
    """Chromium's fake microphone: the page records 4 s, encodes WAV and submits it."""
    browser.get(system.url + "/")
    button = wait(browser, lambda b: [e for e in b.find_elements("css selector", "[data-record]")
                                      if e.is_displayed()])[0]
    button.click()
    label = wait(browser, lambda b: b.find_elements("css selector",
                                                    "[data-testid=predicted-label]"), 60)[0].text
    assert label in LABELS
    assert "recording.wav" in browser.page_source
    screenshot("predict-microphone")


def test_upload_a_folder(system, browser, screenshot, tmp_path):
    folder = tmp_path / "field-recordings"
    rows = [r for r in pick(system.rows, 2, 2) if r["class"] in ("dog_bark", "siren", "drilling")]
    for r in rows:  # copies in tmp (never in the repository)
        dst = folder / r["class"] / r["slice_file_name"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(clip_path(r), dst)
    (folder / "siren" / "notes.wav").write_bytes(b"this is not audio" * 20)

    login(browser, system)
    browser.get(system.url + "/data")
    browser.execute_script("window.__samePage = true;")
    css(browser, "#folder").send_keys(str(folder))
    css(browser, "#upload-form button[type=submit]").click()
    wait(browser, lambda b: b.find_elements("css selector", "[data-testid=upload-report]"), 120)
    assert css(browser, "[data-testid=n-accepted]").text == str(len(rows))
    assert css(browser, "[data-testid=n-rejected]").text == "1"
    assert "undecodable" in css(browser, "#upload-report").text
    # "N of M files accepted", not "Done."; the totals box refreshed in place
    assert css(browser, "[data-testid=upload-status]").text == \
        f"{len(rows)} of {len(rows) + 1} files accepted."
    stats = system.api("GET", "/api/v1/uploads").json()["stats"]
    totals = css(browser, "#uploads-box [data-testid=uploads-totals]").text
    assert totals.startswith(f"{stats['n_clips']} accepted clips")
    assert browser.execute_script("return window.__samePage === true;")
    screenshot("upload-folder")
    assert stats["per_class"] == {"dog_bark": 2, "drilling": 2, "siren": 2}


def test_retrain_and_watch_it_finish(system, browser, screenshot):
    if system.api("GET", "/api/v1/uploads").json()["stats"]["n_unused"] == 0:
        rows = pick(system.rows, 2, 1, skip=5)[:3]
        files = [("files", (f"{r['class']}/{r['slice_file_name']}", clip_path(r).open("rb")))
                 for r in rows]
        assert system.api("POST", "/api/v1/uploads", files=files).status_code == 201
    login(browser, system)
    browser.get(system.url + "/training")
    css(browser, "#epochs").send_keys("3")  # a few epochs: the curves need points
    css(browser, "[data-testid=retrain]").click()
    wait(browser, lambda b: "/training/jobs/" in b.current_url)
    browser.execute_script("window.__samePage = true;")  # progress must arrive without reloads
    served_before = css(browser, "[data-testid=served-version]").text
    seen, points = set(), []

    def finished(b) -> bool:
        status = css(b, "[data-testid=job-status]").text
        seen.add((status, css(b, "[data-field=stage]").text, css(b, "[data-field=epoch]").text,
                  css(b, "[data-field=val_f1]").text))
        points.append(len(b.find_elements("css selector", "[data-testid=curves-svg] .pt-loss")))
        return status in ("succeeded", "rejected", "failed")

    wait(browser, finished, timeout=900)
    status = css(browser, "[data-testid=job-status]").text
    assert status in ("succeeded", "rejected"), css(browser, "[data-field=message]").text
    assert browser.execute_script("return window.__samePage === true;")
    bar = css(browser, "progress")
    assert bar.get_attribute("value") == bar.get_attribute("max")
    # the gate's numbers, filled in live when the job ended
    assert float(css(browser, "[data-field=candidate_f1]").text) >= 0
    assert float(css(browser, "[data-field=served_f1]").text) >= 0
    message = css(browser, "[data-field=message]").text
    assert ("Promoted" if status == "succeeded" else "Rejected") in message
    # the curves were drawn as the job ran (points appeared before the end), one per epoch
    n = len(all_css(browser, "[data-testid=curves-svg] .pt-loss"))
    assert n >= 2 and n == len(all_css(browser, "[data-field=history-rows] tr"))
    assert len(all_css(browser, "[data-testid=curves-svg] .pt-f1")) >= 2
    assert any(0 < k < n for k in points) or n == max(points), points
    banner = css(browser, "[data-testid=job-banner]").get_attribute("class")
    assert ("alert-success" if status == "succeeded" else "alert-warn") in banner
    if status == "succeeded":  # the footer follows the promotion, still without a reload
        version = css(browser, "[data-field=result-version]").text
        wait(browser, lambda b: css(b, "[data-testid=served-version]").text == version, 30)
        assert version != served_before
        assert browser.execute_script("return window.__samePage === true;")
    screenshot("retrain-done")
    print(f"\njob states seen live: {sorted(seen)}; {message}")


def test_data_visualisations(system, browser, screenshot):
    browser.get(system.url + "/data")
    wait(browser, lambda b: len(b.find_elements("css selector", "[data-testid=visual]")) >= 3,
         timeout=600)
    wait(browser, lambda b: images_loaded(b, "[data-testid=visual] img"))
    captions = [e.text for e in all_css(browser, "[data-testid=visual] figcaption")]
    assert len(captions) >= 3 and all(len(c) > 40 for c in captions)
    assert any("clips" in c for c in captions)
    screenshot("data-visualisations")


def test_dashboard_plots(system, browser, screenshot):
    # After the retrain test a new version was promoted: each gunicorn worker swaps within a
    # poll interval, so reload until the page and the health endpoint name the same one.
    deadline = time.monotonic() + 60
    while True:
        browser.get(system.url + "/dashboard")
        wait(browser, lambda b: images_loaded(b, "[data-testid=dashboard-plot]"))
        version = css(browser, "[data-testid=dashboard-version]").text
        served = system.api("GET", "/api/v1/health").json()["model_version"]
        if version == served or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(all_css(browser, "[data-testid=dashboard-plot]")) == 4
    assert version == served
    assert "predictions" in css(browser, "[data-testid=drift]").text
    screenshot("dashboard")
