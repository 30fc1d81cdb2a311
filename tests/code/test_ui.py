"""The pages through Flask's test client: each page renders, forms work, admin actions need a
login, CSRF is enforced, errors are pages (not tracebacks)."""

from __future__ import annotations

import io
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


# --------------------------------------------------------------------------- training

def test_retrain_button_and_job_page(admin_client, no_sender):
    r = admin_client.post("/training/retrain", data={"epochs": "2"})
    assert r.status_code == 302 and r.headers["Location"].startswith("/training/jobs/")
    html = admin_client.get(r.headers["Location"]).get_data(as_text=True)
    assert 'data-testid="job-status">queued<' in html and "<progress" in html
    assert 'data-job-url="/api/v1/jobs/' in html
    training = admin_client.get("/training").get_data(as_text=True)
    assert "A job is already queued" in training
    again = admin_client.post("/training/retrain", data={})
    assert again.headers["Location"] == r.headers["Location"]


def test_retrain_form_validation_and_broker_down(admin_client):
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


def test_versions_table_and_version_page(client):
    html = client.get("/training").get_data(as_text=True)
    for version in ("quick-1", "quick-2", "quick-bad", "broken"):
        assert version in html
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
