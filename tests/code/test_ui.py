"""The pages through Flask's test client: each page renders, forms work, admin actions need a
login, CSRF is enforced, errors are pages (not tracebacks)."""

from __future__ import annotations

import io
import logging
import re

import pytest
from web_helpers import PASSWORD, tone


def csrf_token(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the form"
    return match.group(1)


@pytest.mark.parametrize("path", ["/", "/data", "/training", "/dashboard", "/login",
                                  "/api/v1/docs"])
def test_pages_render(client, path):
    r = client.get(path)
    assert r.status_code == 200, r.get_data(as_text=True)[:500]
    html = r.get_data(as_text=True)
    assert r.mimetype == "text/html"
    assert '<html lang="en">' in html and 'href="#main"' in html  # language, skip link
    assert "http://" not in html.replace("http://localhost", "") or path == "/api/v1/docs"
    assert "cdn" not in html.lower()
    assert "quick-1" in html  # the footer names the served model


def test_nav_marks_current_page(client):
    html = client.get("/dashboard").get_data(as_text=True)
    assert re.search(r'href="/dashboard" aria-current="page"', html)


# --------------------------------------------------------------------------- predict

def test_predict_page_shows_label_bars_spectrogram_player(client, clip):
    r = client.post("/predict", data={"file": (io.BytesIO(clip), "siren clip.wav")})
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    label = re.search(r'data-testid="predicted-label">([^<]+)<', html).group(1)
    assert label.replace(" ", "_") in {
        "air_conditioner", "car_horn", "children_playing", "dog_bark", "drilling",
        "engine_idling", "gun_shot", "jackhammer", "siren", "street_music"}
    assert html.count("<meter") == 10
    assert 'src="data:image/png;base64,' in html  # the log-mel spectrogram
    # quick-1 has the default front end: the heading does not pass the image off as all it sees
    assert "Log-mel spectrogram (the model also sees its PCEN" in html
    assert '<audio controls src="data:audio/wav;base64,' in html
    assert "siren_clip.wav" in html and "quick-1" in html


@pytest.mark.parametrize(("data", "status", "text"), [
    ({}, 400, "Choose an audio file"),
    ({"file": (io.BytesIO(b""), "empty.wav")}, 400, "empty"),
    ({"file": (io.BytesIO(b"not audio" * 50), "x.wav")}, 415, "Not a readable audio file"),
])
def test_predict_page_errors(client, data, status, text):
    r = client.post("/predict", data=data, content_type="multipart/form-data")
    assert r.status_code == status
    html = r.get_data(as_text=True)
    assert 'data-testid="predict-error"' in html and text in html
    assert "Traceback" not in html


def test_predict_page_clip_too_large(make_app, monkeypatch):
    monkeypatch.setenv("URBANSOUND_MAX_CLIP_MB", "1")
    client = make_app().test_client()
    r = client.post("/predict", data={"file": (io.BytesIO(tone(30.0)), "big.wav")})
    assert r.status_code == 413 and "at most 1 MiB" in r.get_data(as_text=True)


def test_csrf_is_enforced(make_app, clip):
    client = make_app(WTF_CSRF_ENABLED=True).test_client()
    r = client.post("/predict", data={"file": (io.BytesIO(clip), "a.wav")})
    assert r.status_code == 400
    assert "CSRF" in r.get_data(as_text=True) and r.mimetype == "text/html"
    token = csrf_token(client.get("/").get_data(as_text=True))
    r = client.post("/predict", data={"file": (io.BytesIO(clip), "a.wav"), "csrf_token": token})
    assert r.status_code == 200
    # the bearer-token API is exempt: no cookie, no CSRF
    assert client.post("/api/v1/predict", data=clip, content_type="audio/wav").status_code == 200


def test_csrf_error_as_json_for_json_clients(make_app):
    client = make_app(WTF_CSRF_ENABLED=True).test_client()
    r = client.post("/logout", headers={"Accept": "application/json"})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "csrf_failed"


# --------------------------------------------------------------------------- login

def test_login_logout(client):
    r = client.post("/login", data={"password": "wrong"})
    assert r.status_code == 401 and "Wrong password" in r.get_data(as_text=True)
    r = client.post("/login", data={"password": PASSWORD, "next": "/training"})
    assert r.status_code == 302 and r.headers["Location"] == "/training"
    assert "Log out" in client.get("/training").get_data(as_text=True)
    r = client.post("/logout")
    assert r.status_code == 302
    assert "Log in" in client.get("/").get_data(as_text=True)


def test_login_with_api_token_and_no_open_redirect(client):
    from web_helpers import TOKEN

    r = client.post("/login", data={"password": TOKEN, "next": "https://evil.example/x"})
    assert r.status_code == 302 and r.headers["Location"] == "/"
    r = client.post("/login", data={"password": TOKEN, "next": "//evil.example/x"})
    assert r.headers["Location"] == "/"


def test_empty_admin_password_locks_login(make_app, monkeypatch):
    monkeypatch.setenv("URBANSOUND_ADMIN_PASSWORD", "")
    monkeypatch.setenv("URBANSOUND_API_TOKEN", "")
    client = make_app().test_client()
    assert client.post("/login", data={"password": ""}).status_code == 401


@pytest.mark.parametrize(("path", "data"), [
    ("/data/upload", {"files": [(io.BytesIO(b"x"), "siren/a.wav")]}),
    ("/training/retrain", {}),
    ("/training/models/quick-2/activate", {}),
])
def test_admin_actions_need_login(client, path, data):
    r = client.post(path, data=data, content_type="multipart/form-data",
                    headers={"Referer": "http://localhost/data"})
    assert r.status_code == 302 and r.headers["Location"].startswith("/login?next=")


# --------------------------------------------------------------------------- data

def test_upload_page_report(admin_client):
    data = {"files": [(io.BytesIO(tone(1, 330)), "mine/dog_bark/a.wav"),
                      (io.BytesIO(b"zzz" * 100), "mine/dog_bark/b.wav")]}
    r = admin_client.post("/data/upload", data=data)
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert 'data-testid="n-accepted">1<' in html and 'data-testid="n-rejected">1<' in html
    assert "undecodable" in html
    page = admin_client.get("/data").get_data(as_text=True)
    assert "<strong>1</strong> accepted clips" in page


def test_upload_page_partial_for_fetch(admin_client):
    r = admin_client.post("/data/upload", headers={"X-Requested-With": "fetch"},
                          data={"label": "siren", "files": [(io.BytesIO(tone(1, 770)), "x.wav")]})
    assert r.status_code == 200 and r.headers["X-Partial"] == "1"
    assert "<html" not in r.get_data(as_text=True)
    r = admin_client.post("/data/upload", headers={"X-Requested-With": "fetch"},
                          data={"label": "whale", "files": [(io.BytesIO(tone(1, 771)), "x.wav")]})
    assert r.status_code == 400 and "Unknown label" in r.get_data(as_text=True)


def test_upload_page_error_without_fetch(admin_client):
    r = admin_client.post("/data/upload", data={"label": "whale",
                                                "files": [(io.BytesIO(tone()), "x.wav")]})
    assert r.status_code == 302
    assert "Unknown label" in admin_client.get("/data").get_data(as_text=True)


def test_data_visualisations(client, web_env):
    from src import visualise

    visualise.render_all(web_env.data_dir, web_env.cache_dir)  # what the page starts in a thread
    assert client.get("/data/visuals/status").get_json() == {"ready": True, "error": None}
    html = client.get("/data").get_data(as_text=True)
    assert html.count('data-testid="visual"') == len(visualise.VISUALS) >= 3
    assert "synthetic demo set" in html  # the interpretation says what data it describes
    for spec in visualise.VISUALS:
        r = client.get(f"/data/visuals/{spec.name}.png")
        assert r.status_code == 200 and r.mimetype == "image/png" and r.data[:4] == b"\x89PNG"
    assert client.get("/data/visuals/nope.png").status_code == 404


def test_data_page_without_data(make_app, monkeypatch, tmp_path):
    monkeypatch.setenv("URBANSOUND_DATA_DIR", str(tmp_path / "nothing"))
    client = make_app().test_client()
    html = client.get("/data").get_data(as_text=True)
    assert "No data set at" in html
    assert client.get("/data/visuals/status").get_json()["ready"] is False


def test_an_empty_data_folder_is_said_on_the_page_not_warned_in_the_log(make_app, monkeypatch,
                                                                        tmp_path, caplog):
    """A fresh clone's data/ holds only its README: the page says what to do, and the log
    records it below WARNING (it is the user's state, not a server fault)."""
    import time

    empty = tmp_path / "data"
    empty.mkdir()
    (empty / "README.md").write_text("put a data set here\n")
    monkeypatch.setenv("URBANSOUND_DATA_DIR", str(empty))
    client = make_app().test_client()
    with caplog.at_level(logging.INFO, logger="web.ui"):
        client.get("/data")
        deadline = time.monotonic() + 30
        while "no audio found" not in client.get("/data").get_data(as_text=True):
            assert time.monotonic() < deadline, "the page never said the folder holds no audio"
            time.sleep(0.2)
    said = [r for r in caplog.records if "visualisations failed" in r.getMessage()]
    assert said and all(r.levelno == logging.INFO for r in said), said


# --------------------------------------------------------------------------- training

def test_retrain_button_and_job_page(admin_client, no_sender, plan):
    plan(READY_PLAN)
    r = admin_client.post("/training/retrain", data={"epochs": "2"})
    assert r.status_code == 302 and r.headers["Location"].startswith("/training/jobs/")
    html = admin_client.get(r.headers["Location"]).get_data(as_text=True)
    assert 'data-testid="job-status">queued<' in html and "<progress" in html
    assert 'data-job-url="/api/v1/jobs/' in html
    training = admin_client.get("/training").get_data(as_text=True)
    assert "A job is already queued" in training
    again = admin_client.post("/training/retrain", data={})
    assert again.headers["Location"] == r.headers["Location"]


def test_retrain_form_validation_and_broker_down(admin_client, plan):
    plan(READY_PLAN)
    r = admin_client.post("/training/retrain", data={"epochs": "lots"})
    assert r.status_code == 302 and r.headers["Location"] == "/training"
    assert "whole number" in admin_client.get("/training").get_data(as_text=True)

    from src import jobs

    def down(_job_id):
        raise ConnectionRefusedError("refused")

    jobs.set_sender(down)
    try:
        r = admin_client.post("/training/retrain", data={})
    finally:
        jobs.set_sender(None)
    assert r.headers["Location"] == "/training"
    assert "broker" in admin_client.get("/training").get_data(as_text=True)


def test_unknown_job_page_is_404_page(client):
    r = client.get("/training/jobs/nope")
    assert r.status_code == 404 and r.mimetype == "text/html"
    assert "not found" in r.get_data(as_text=True)


def test_versions_table_and_version_page(client, quick_model):
    html = client.get("/training").get_data(as_text=True)
    for version in ("quick-1", "quick-2", "quick-bad", "broken"):
        assert version in html
    # each score beside the size (and description) of the test set it was measured on
    metrics = quick_model.checkpoint["metrics"]
    row = re.search(r'<tr[^>]*>\s*<td><a href="/training/models/quick-1">.*?</tr>', html, re.S)
    assert row, html
    cell = re.search(r'data-field="test-clips"><span title="([^"]*)">(\d+)</span>', row.group(0))
    assert cell and int(cell.group(2)) == metrics["n"] and cell.group(1) == metrics["split"], row
    assert "Scores on different test sets do not compare" in html
    page = client.get("/training/models/quick-1")
    assert page.status_code == 200
    text = page.get_data(as_text=True)
    assert "Confusion matrix" in text and "macro-F1" in text and "siren" in text
    png = client.get("/training/models/quick-1/confusion.png")
    assert png.status_code == 200 and png.data[:4] == b"\x89PNG"
    assert client.get("/training/models/nope").status_code == 404
    assert client.get("/training/models/broken/confusion.png").status_code == 404


def test_activate_from_the_page(own_models, make_app):
    client = make_app().test_client()
    client.post("/login", data={"password": PASSWORD})
    r = client.post("/training/models/quick-2/activate")
    assert r.status_code == 302
    assert "Now serving quick-2" in client.get("/training").get_data(as_text=True)
    client.post("/training/models/quick-bad/activate", data={"force": "1"})
    assert "Now serving quick-bad" in client.get("/training").get_data(as_text=True)
    client.post("/training/models/broken/activate")
    assert "is corrupt" in client.get("/training").get_data(as_text=True)
    r = client.post("/training/models/quick-1/activate")
    assert "Now serving quick-1" in client.get("/training").get_data(as_text=True)


# --------------------------------------------------------------------------- dashboard

def test_dashboard_numbers_and_plots(client, clip):
    for _ in range(2):
        client.post("/api/v1/predict", data=clip, content_type="audio/wav")
    html = client.get("/dashboard").get_data(as_text=True)
    assert 'data-testid="dashboard-version">quick-1<' in html
    assert "predict p50 / p95 / p99" in html and "training mix" in html
    assert html.count('data-testid="dashboard-plot"') == 4
    for name in ("latency", "class_mix", "confidence", "requests"):
        r = client.get(f"/dashboard/plots/{name}.png")
        assert r.status_code == 200 and r.data[:4] == b"\x89PNG"
        assert r.headers["Cache-Control"] == "no-store"
    assert client.get("/dashboard/plots/nope.png").status_code == 404


def test_html_errors(client):
    r = client.get("/no/such/page")
    assert r.status_code == 404 and r.mimetype == "text/html"
    assert "Nothing at /no/such/page" in r.get_data(as_text=True)
    r = client.get("/no/such/page", headers={"Accept": "application/json"})
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found"
    r = client.get("/predict")
    assert r.status_code == 405 and r.mimetype == "text/html"


def test_request_too_large_page(make_app, monkeypatch):
    monkeypatch.setenv("URBANSOUND_MAX_UPLOAD_MB", "1")
    client = make_app().test_client()
    r = client.post("/predict", data={"file": (io.BytesIO(b"\0" * (2 << 20)), "x.wav")})
    assert r.status_code == 413 and "too large" in r.get_data(as_text=True)


def test_pages_without_a_model(make_app, monkeypatch, tmp_path):
    """A fresh install (no model yet) still renders every page and says so."""
    monkeypatch.setenv("URBANSOUND_MODELS_DIR", str(tmp_path / "no-models"))
    client = make_app().test_client()
    for path in ("/", "/training", "/dashboard", "/data"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert "none yet" in r.get_data(as_text=True)
    assert "No predictions served yet" in client.get("/dashboard").get_data(as_text=True)
    r = client.post("/predict", data={"file": (io.BytesIO(tone()), "a.wav")})
    assert r.status_code == 503 and "No model is being served" in r.get_data(as_text=True)


# --------------------------------------------------------------------------- honest states (#10)

READY_PLAN = {
    "ready": True, "served_version": "quick-1",
    "base": {"n": 120, "description": "UrbanSound8K folds 4-9 under data/"},
    "new_uploads": 3,
    "test_set": {"kind": "folds", "description": "UrbanSound8K fold 3", "n": 30},
    "missing": [],
    "summary": "Fine-tunes quick-1 on 120 base clips + 3 new uploads; gate on fold 3.",
}
MISSING_PLAN = {
    "ready": False, "served_version": "quick-1",
    "base": {"n": 0, "description": "no base data set installed"},
    "new_uploads": 0, "test_set": None,
    "missing": [{"what": "No clips to train on", "fix": "upload labelled clips"},
                {"what": "No test set for the quality gate",
                 "fix": "urbansound data import DIR"}],
    "summary": "A retrain cannot run yet.",
}


@pytest.fixture()
def plan(monkeypatch):
    """``plan(value)``: what ``src.jobs.retrain_plan`` answers (a dict, or an exception)."""
    from src import jobs

    def set_plan(value):
        def fake(settings=None):
            if isinstance(value, Exception):
                raise value
            return value

        monkeypatch.setattr(jobs, "retrain_plan", fake, raising=False)

    return set_plan


def add_job(web_env, **values) -> str:
    """A job row in any state (the worker's side is tested elsewhere)."""
    from src.db import TrainingJob, session_scope

    with session_scope(web_env.db_url) as s:
        job = TrainingJob(requested_by="ui:admin", **values)
        s.add(job)
        s.flush()
        return job.id


def test_training_page_shows_the_plan(admin_client, plan):
    plan(READY_PLAN)
    html = admin_client.get("/training").get_data(as_text=True)
    assert READY_PLAN["summary"] in html
    assert 'data-testid="plan-base">120<' in html and 'data-testid="plan-new">3<' in html
    assert 'data-testid="plan-test">30<' in html and "UrbanSound8K fold 3" in html
    assert "UrbanSound8K folds 4-9 under data/" in html
    button = re.search(r'<button[^>]*data-testid="retrain"[^>]*>', html).group(0)
    assert "disabled" not in button
    assert html.index('data-testid="retrain-plan"') < html.index('data-testid="retrain"')


def test_training_page_missing_plan_disables_the_button(admin_client, plan, no_sender):
    plan(MISSING_PLAN)
    html = admin_client.get("/training").get_data(as_text=True)
    assert "No test set for the quality gate" in html and "No clips to train on" in html
    assert "<code>urbansound data import DIR</code>" in html
    assert 'href="/data"' in html  # "upload labelled clips" links to where that happens
    button = re.search(r'<button[^>]*data-testid="retrain"[^>]*>', html).group(0)
    assert "disabled" in button and 'aria-describedby="retrain-disabled"' in button
    assert 'data-testid="retrain-disabled"' in html and "Retrain is disabled" in html
    # a crafted POST does not start a job that could only fail
    r = admin_client.post("/training/retrain", data={})
    assert r.status_code == 302 and r.headers["Location"] == "/training"
    assert no_sender == []
    page = admin_client.get("/training").get_data(as_text=True)
    assert "A retrain cannot run yet" in page and "urbansound data import DIR" in page


def test_training_page_plan_unavailable(client, plan):
    from src.db import DatabaseUnavailable

    plan(DatabaseUnavailable("The database at sqlite:///x is unreachable."))
    r = client.get("/training")
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert 'data-testid="plan-error"' in html and "is unreachable" in html


def test_retrain_flash_does_not_claim_success(admin_client, plan, no_sender):
    plan(READY_PLAN)
    r = admin_client.post("/training/retrain", data={}, follow_redirects=True)
    html = r.get_data(as_text=True)
    assert "Retraining started" not in html and "Retrain queued" in html
    assert 'flash-info">Retrain queued' in html and 'flash-success">Retrain' not in html
    assert 'data-testid="job-status">queued<' in html


def test_failed_job_page_is_red(client, web_env):
    job_id = add_job(web_env, status="failed", error="No fixed test set: found no clips",
                     message="Failed: No fixed test set: found no clips",
                     progress={"stage": "loading data", "epoch": 0, "epochs": 3})
    html = client.get(f"/training/jobs/{job_id}").get_data(as_text=True)
    assert 'class="alert alert-error"' in html and "Retrain failed" in html
    assert "No fixed test set" in html
    bar = re.search(r"<progress[^>]*>", html).group(0)
    assert 'value="0"' in bar and "bar-failed" in bar
    assert 'data-done="true"' in html and "alert-success" not in html


@pytest.mark.parametrize(("status", "tone", "words"), [
    ("succeeded", "alert-success", "Promoted"),
    ("rejected", "alert-warn", "Rejected"),
])
def test_finished_job_page_tone(client, web_env, status, tone, words):
    history = [{"epoch": e, "loss": 1.0 / e, "val_f1": 0.2 * e, "seconds": 1.5}
               for e in (1, 2, 3)]
    job_id = add_job(web_env, status=status, message=f"{words} v-x: macro-F1 ...",
                     progress={"stage": "done", "epoch": 3, "epochs": 10, "history": history,
                               "stopped_early": True, "eta_s": None,
                               "stop_reason": "no val F1 gain for 2 epochs"})
    html = client.get(f"/training/jobs/{job_id}").get_data(as_text=True)
    assert f'class="alert {tone}"' in html and words in html
    bar = re.search(r"<progress[^>]*>", html).group(0)
    assert 'value="10"' in bar and f"bar-{status}" in bar
    # the curves' data (drawn by app.js) and the no-JS table of the same numbers
    assert 'data-testid="curves"' in html and "&#34;val_f1&#34;: 0.6" in html
    assert html.count('<td class="num">') >= 12
    assert "Early stopping ended training after epoch 3 of 10" in html
    assert "no val F1 gain for 2 epochs" in html


def test_running_job_shows_eta(client, web_env):
    job_id = add_job(web_env, status="running",
                     progress={"stage": "training", "epoch": 2, "epochs": 20, "loss": 0.9,
                               "val_f1": 0.4, "eta_s": 300.0, "stopped_early": False,
                               "history": [{"epoch": 1, "loss": 1.2, "val_f1": 0.3,
                                            "seconds": 15.0}]})
    html = client.get(f"/training/jobs/{job_id}").get_data(as_text=True)
    assert "about 5 min left" in html and "Retraining" in html
    assert re.search(r'data-testid="stopped-early"\s+hidden', html)


def test_upload_report_says_n_of_m_and_refreshes_totals(admin_client):
    r = admin_client.post("/data/upload", headers={"X-Requested-With": "fetch"},
                          data={"files": [(io.BytesIO(b"zzz" * 100), "dog_bark/a.wav"),
                                          (io.BytesIO(b"yyy" * 100), "dog_bark/b.wav")]})
    html = r.get_data(as_text=True)
    assert 'data-testid="n-accepted">0<' in html and 'data-testid="n-files">2<' in html
    assert 'data-n-accepted="0" data-n-files="2"' in html and "alert-error" in html
    assert "<template data-uploads-box>" in html and 'data-testid="uploads-totals"' in html
    r = admin_client.post("/data/upload", headers={"X-Requested-With": "fetch"},
                          data={"files": [(io.BytesIO(tone(1, 440)), "siren/a.wav")]})
    html = r.get_data(as_text=True)
    box = html[html.index("<template data-uploads-box>"):]
    assert "<strong>1</strong> accepted clips" in box  # the fresh totals for the box


def test_footer_names_what_to_poll(client):
    html = client.get("/data").get_data(as_text=True)
    assert re.search(r'data-testid="served-version" data-health-url="/api/v1/health"', html)
    assert client.get("/api/v1/health").get_json()["model_version"] == "quick-1"


# --------------------------------------------------------------------------- "Wrong? It was ..."

@pytest.fixture()
def fake_feedback(monkeypatch):
    """keep_clip / store_feedback stand-ins: what the page does with their answers."""
    from web import api

    calls: list[tuple] = []
    monkeypatch.setattr(api, "keep_clip", lambda data, name: "pred-123", raising=False)

    def answer(report):
        def store(prediction_id, label, client):
            calls.append((prediction_id, label, client))
            if isinstance(report, Exception):
                raise report
            return report

        monkeypatch.setattr(api, "store_feedback", store, raising=False)

    return calls, answer


def report(accepted: bool, code: str = "", message: str = "") -> dict:
    verdict = {"name": "recording.wav", "label": "dog_bark", "code": code, "message": message}
    return {"upload_id": 7 if accepted else None, "source": "feedback", "client": "ui:admin",
            "n_files": 1, "n_accepted": int(accepted), "n_rejected": int(not accepted),
            "accepted": [verdict] if accepted else [], "rejected": [] if accepted else [verdict],
            "skipped": []}


def test_predict_page_offers_feedback(admin_client, clip, fake_feedback):
    html = admin_client.post("/predict", data={"file": (io.BytesIO(clip), "a.wav")}) \
        .get_data(as_text=True)
    assert 'name="prediction_id" value="pred-123"' in html and "Wrong? It was" in html
    label = re.search(r'data-testid="predicted-label">([^<]+)<', html).group(1)
    options = re.findall(r'<option value="(\w+)">', html[html.index('id="feedback-label"'):])
    assert len(options) == 9 and label.replace(" ", "_") not in options


def test_predict_page_feedback_needs_login(client, clip, fake_feedback):
    html = client.post("/predict", data={"file": (io.BytesIO(clip), "a.wav")}) \
        .get_data(as_text=True)
    assert "Log in to teach the model" in html and 'name="prediction_id"' not in html
    r = client.post("/predict/feedback", data={"prediction_id": "pred-123", "label": "siren"})
    assert r.status_code == 302 and r.headers["Location"].startswith("/login?next=")
    assert fake_feedback[0] == []


def test_feedback_accepted(admin_client, fake_feedback):
    calls, answer = fake_feedback
    answer(report(True))
    r = admin_client.post("/predict/feedback", data={"prediction_id": "pred-123",
                                                     "label": "dog_bark"})
    assert r.status_code == 201
    html = r.get_data(as_text=True)
    assert "Saved as training data for the next retrain" in html and "alert-success" in html
    assert calls == [("pred-123", "dog_bark", "ui:admin")]
    r = admin_client.post("/predict/feedback", headers={"X-Requested-With": "fetch"},
                          data={"prediction_id": "pred-123", "label": "dog_bark"})
    assert r.headers["X-Partial"] == "1" and "<html" not in r.get_data(as_text=True)


@pytest.mark.parametrize(("code", "message"), [
    ("in_test_set", "This recording belongs to the test set of the quality gate."),
    ("duplicate", "Already uploaded (same sha256)."),
])
def test_feedback_rejected_says_why(admin_client, fake_feedback, code, message):
    _, answer = fake_feedback
    answer(report(False, code, message))
    r = admin_client.post("/predict/feedback", data={"prediction_id": "pred-123",
                                                     "label": "siren"})
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and "Not saved" in html
    assert f'data-code="{code}"' in html and message in html


def test_feedback_errors(admin_client, fake_feedback):
    from apiflask import HTTPError

    _, answer = fake_feedback
    answer(HTTPError(404, "No kept clip pred-123 (kept for an hour).",
                     extra_data={"code": "not_found"}))
    r = admin_client.post("/predict/feedback", data={"prediction_id": "pred-123",
                                                     "label": "siren"})
    assert r.status_code == 404 and "kept for an hour" in r.get_data(as_text=True)
    r = admin_client.post("/predict/feedback", data={"prediction_id": "pred-123",
                                                     "label": "whale"})
    assert r.status_code == 400 and "one of the ten classes" in r.get_data(as_text=True)


def test_feedback_needs_csrf(make_app, fake_feedback):
    client = make_app(WTF_CSRF_ENABLED=True).test_client()
    token = csrf_token(client.get("/login").get_data(as_text=True))
    client.post("/login", data={"password": PASSWORD, "csrf_token": token})
    r = client.post("/predict/feedback", data={"prediction_id": "pred-123", "label": "siren"})
    assert r.status_code == 400 and "CSRF" in r.get_data(as_text=True)


def test_feedback_for_real(admin_client):
    """The real keep_clip / store_feedback: the corrected clip becomes an upload; its id is
    spent; the same clip corrected again is a duplicate."""
    clip = tone(1.5, 523)

    def predict() -> str:
        html = admin_client.post("/predict", data={"file": (io.BytesIO(clip), "street.wav")}) \
            .get_data(as_text=True)
        return re.search(r'name="prediction_id" value="([^"]+)"', html).group(1)

    form = {"prediction_id": predict(), "label": "street_music"}
    r = admin_client.post("/predict/feedback", data=form)
    assert r.status_code == 201, r.get_data(as_text=True)[-2000:]
    assert "Saved as training data for the next retrain" in r.get_data(as_text=True)
    page = admin_client.get("/data").get_data(as_text=True)
    assert "<strong>1</strong> accepted clips" in page
    spent = admin_client.post("/predict/feedback", data=form)
    assert spent.status_code == 404 and 'data-code="not_found"' in spent.get_data(as_text=True)
    again = admin_client.post("/predict/feedback", data={**form, "prediction_id": predict()})
    html = again.get_data(as_text=True)
    assert "Not saved" in html and 'data-code="duplicate"' in html


def test_spectrogram_heading_names_what_else_the_model_sees():
    from web.plots import spectrogram_title

    assert spectrogram_title("logmel") == "Log-mel spectrogram (what the model sees)"
    assert "PCEN" in spectrogram_title("logmel+pcen")
    assert "PCEN (per-channel energy normalised) and delta" in \
        spectrogram_title("logmel+pcen+delta")
