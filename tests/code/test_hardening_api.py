"""Issue #12, items 1, 2, 4 and 8: what a hostile audit of the API found, pinned down.

* several files to the one-clip ``/predict`` are refused; ``/predict/batch`` answers each;
* a retrain body that is not JSON is a 415 (no job), while no body at all still means defaults;
* a chunked body (no ``Content-Length``) over ``URBANSOUND_MAX_UPLOAD_MB`` is a 413 with
  nothing recorded, through werkzeug's own de-chunking stream and through a real HTTP server;
* "no file" says so (not "the file is empty"), and staging folders left by a process killed
  mid-upload are swept at start-up, never those of a live sibling.
"""

from __future__ import annotations

import http.client
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from web_helpers import ROOT, TOKEN, tone

from src.preprocessing import CLASSES

MIB = 1 << 20


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body


def n_uploads(client) -> int:
    return client.get("/api/v1/uploads").get_json()["total"]


# --------------------------------------------------------------------------- 1. batch predict

def test_predict_refuses_several_files(client, clip):
    r = client.post("/api/v1/predict", data={
        "file": [(io.BytesIO(clip), "a.wav"), (io.BytesIO(tone(1, 900)), "b.wav")]})
    body = assert_error(r, 400, "one_file_only")
    assert "/predict/batch" in body["error"]["message"]


def test_predict_batch_one_result_per_file_in_order(client, clip):
    r = client.post("/api/v1/predict/batch?top_k=2", data={"files": [
        (io.BytesIO(clip), "first clip.wav"),
        (io.BytesIO(b"this is not audio at all" * 10), "junk.wav"),
        (io.BytesIO(b""), "empty.wav"),
        (io.BytesIO(tone(1, 900)), "third.wav"),
    ]})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["model_version"] == "quick-1"
    assert (body["n_files"], body["n_ok"], body["n_failed"]) == (4, 2, 2)
    results = body["results"]
    assert [x["file"] for x in results] == ["first_clip.wav", "junk.wav", "empty.wav",
                                            "third.wav"]
    for ok in (results[0], results[3]):
        assert ok["label"] in CLASSES and ok["class_id"] == CLASSES.index(ok["label"])
        assert ok["model_version"] == "quick-1" and ok["latency_ms"] > 0
        assert set(ok["probabilities"]) == set(CLASSES) and len(ok["top_k"]) == 2
        assert ok["confidence"] == pytest.approx(max(ok["probabilities"].values()))
        assert "error" not in ok
    assert results[1]["error"]["code"] == "undecodable" and "label" not in results[1]
    assert results[2]["error"] == {"code": "empty", "message": "The file is empty."}

    single = client.post("/api/v1/predict", data={"file": (io.BytesIO(clip), "x.wav")})
    assert {k: v for k, v in single.get_json().items() if k in ("label", "probabilities")} == \
        {k: v for k, v in results[0].items() if k in ("label", "probabilities")}


def test_predict_batch_takes_file_fields_and_one_model_version(app, clip, monkeypatch):
    """The model is captured once: a second look at the served model (a swap mid-batch)
    would find none here and fail, so every result comes from the first."""
    state = app.extensions["urbansound"]
    first = state.predictor()
    calls: list[int] = []

    def once():
        calls.append(1)
        return first if len(calls) == 1 else None

    monkeypatch.setattr(state, "predictor", once)
    r = app.test_client().post("/api/v1/predict/batch", data={
        "file": [(io.BytesIO(clip), "a.wav"), (io.BytesIO(tone(1, 700)), "b.wav"),
                 (io.BytesIO(tone(1, 800)), "c.wav")]})
    assert r.status_code == 200, r.get_json()
    assert {x["model_version"] for x in r.get_json()["results"]} == {first.version}
    assert len(calls) == 1


def test_predict_batch_request_errors(make_app, monkeypatch, clip):
    monkeypatch.setenv("URBANSOUND_MAX_BATCH_FILES", "2")
    client = make_app().test_client()
    three = {"files": [(io.BytesIO(clip), f"{i}.wav") for i in range(3)]}
    body = assert_error(client.post("/api/v1/predict/batch", data=three), 413, "too_many_files")
    assert "at most 2" in body["error"]["message"]
    assert_error(client.post("/api/v1/predict/batch", data=clip, content_type="audio/wav"),
                 415, "unsupported_media_type")
    assert_error(client.post("/api/v1/predict/batch", data={"other": "x"},
                             content_type="multipart/form-data"), 400, "missing_file")


def test_predict_batch_is_in_the_openapi_document(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    op = spec["paths"]["/api/v1/predict/batch"]["post"]
    ref = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/BatchPredictionOut")
    schema = spec["components"]["schemas"]["BatchPredictionOut"]
    assert {"model_version", "results"} <= set(schema["properties"])
    assert "multipart/form-data" in op["requestBody"]["content"]


# --------------------------------------------------------------------------- 2. retrain body

@pytest.fixture()
def pending(client, auth):
    r = client.post("/api/v1/uploads", headers=auth,
                    data={"files": [(io.BytesIO(tone(2.0, 900, seed=7)), "siren/p.wav")]})
    assert r.status_code == 201 and r.get_json()["n_accepted"] == 1, r.get_json()


@pytest.mark.parametrize(("data", "ctype"), [
    (b"<a/>", "application/xml"), (b'{"epochs": 2}', "text/plain"),
    (b"epochs=2", "application/x-www-form-urlencoded")])
def test_retrain_refuses_a_body_that_is_not_json(client, auth, no_sender, pending, data,
                                                  ctype):
    r = client.post("/api/v1/retrain", headers=auth, data=data, content_type=ctype)
    assert_error(r, 415, "unsupported_media_type")
    assert not no_sender and client.get("/api/v1/jobs").get_json()["items"] == []


def test_retrain_without_a_body_still_means_defaults(client, auth, no_sender, pending):
    r = client.post("/api/v1/retrain", headers=auth, data=b"", content_type="application/xml")
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["job"]["params"] == {} and len(no_sender) == 1


# --------------------------------------------------------------------------- 4. chunked bodies

def zip_of(n_bytes: int) -> bytes:
    """A valid zip of about ``n_bytes`` (stored, incompressible noise)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("siren/noise.bin", os.urandom(n_bytes))
    return buf.getvalue()


def chunk_encode(body: bytes, size: int = 64 << 10) -> bytes:
    out = bytearray()
    for i in range(0, len(body), size):
        piece = body[i:i + size]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    return bytes(out + b"0\r\n\r\n")


def post_chunked(client, path: str, body: bytes, ctype: str, auth: dict):
    """What gunicorn and werkzeug's server hand the app for ``Transfer-Encoding: chunked``:
    no Content-Length, ``wsgi.input_terminated``, a de-chunking stream over the wire bytes."""
    from werkzeug.serving import DechunkedInput

    wire = DechunkedInput(io.BytesIO(chunk_encode(body)))
    return client.post(path, headers={**auth, "Transfer-Encoding": "chunked"},
                       content_type=ctype, environ_overrides={
                           "wsgi.input": wire, "wsgi.input_terminated": True})


@pytest.fixture()
def small_limit(make_app, monkeypatch):
    monkeypatch.setenv("URBANSOUND_MAX_UPLOAD_MB", "1")
    return make_app()


def test_oversized_chunked_zip_is_413_and_nothing_is_recorded(small_limit, auth, web_env):
    client = small_limit.test_client()
    big = zip_of(MIB + 300_000)
    r = post_chunked(client, "/api/v1/uploads", big, "application/zip", auth)
    body = assert_error(r, 413, "too_large")
    assert "1 MiB" in body["error"]["message"]
    assert n_uploads(client) == 0
    incoming = web_env.uploads_dir / ".incoming"
    assert not incoming.exists() or not list(incoming.iterdir())

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("siren/a.wav", tone(1, 1000))
    r = post_chunked(client, "/api/v1/uploads", buf.getvalue(), "application/zip", auth)
    assert r.status_code == 201 and r.get_json()["n_accepted"] == 1, r.get_json()


def test_oversized_chunked_multipart_and_clip_are_413(small_limit, auth):
    client = small_limit.test_client()
    boundary = "xyzzy"
    payload = os.urandom(MIB + 300_000)
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
                 f"filename=\"siren/a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").encode() + \
        payload + f"\r\n--{boundary}--\r\n".encode()
    r = post_chunked(client, "/api/v1/uploads", multipart,
                     f"multipart/form-data; boundary={boundary}", auth)
    assert_error(r, 413, "too_large")
    assert n_uploads(client) == 0
    r = post_chunked(client, "/api/v1/predict", payload, "audio/wav", {})
    assert_error(r, 413, "too_large")


def test_oversized_chunked_zip_against_a_real_server(small_limit, auth):
    """A real HTTP server and a real chunked request on a socket: the answer is the 413."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, small_limit, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        status, _ = raw_chunked_post(server.port, "/api/v1/uploads", zip_of(MIB + 300_000),
                                     "application/zip")
        assert status == 413
        assert n_uploads(small_limit.test_client()) == 0
    finally:
        server.shutdown()


def raw_chunked_post(port: int, path: str, body: bytes, ctype: str) -> tuple[int, bytes]:
    """Send ``body`` chunked on one thread while reading the answer on another (the server
    may answer, and stop reading, before the body is all sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}"
            f"\r\nContent-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n"
            "Connection: close\r\n\r\n").encode()

    def send():
        try:
            sock.sendall(head)
            wire = chunk_encode(body)
            for i in range(0, len(wire), 16 << 10):
                sock.sendall(wire[i:i + (16 << 10)])
        except OSError:
            pass  # the server answered and closed: the answer is what counts

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    response = http.client.HTTPResponse(sock)
    try:
        response.begin()
        return response.status, response.read()
    finally:
        sock.close()
        sender.join(10)


# --------------------------------------------------------------------------- 8. no file; staging

def test_a_file_field_without_a_file_says_no_file_was_sent(client, auth):
    r = client.post("/api/v1/predict", data={"file": (io.BytesIO(b""), "")})
    body = assert_error(r, 400, "missing_file")
    assert body["error"]["message"].startswith("No file was sent")
    assert "empty" not in body["error"]["message"]

    r = client.post("/api/v1/uploads", headers=auth, data={"files": (io.BytesIO(b""), "")})
    body = assert_error(r, 400, "no_files")
    assert body["error"]["message"].startswith("No file was sent")
    assert n_uploads(client) == 0
    # a real file with no bytes is still "empty"
    assert_error(client.post("/api/v1/predict", data={"file": (io.BytesIO(b""), "a.wav")}),
                 400, "empty")


HOLD = """
import sys, time
from pathlib import Path
from src import ingest
staging, owner = ingest._claim_staging(Path(sys.argv[1]))
(staging / "000000.wav").write_bytes(b"RIFF" + b"x" * 1000)
print(staging, flush=True)
time.sleep(120)
"""


def stage_in_child(incoming: Path) -> tuple[subprocess.Popen, Path]:
    """A process that is staging an upload (holding its folder), as a gunicorn worker would."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(incoming)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, "the child did not stage"
    return proc, Path(line)


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (then, then))


def test_startup_sweeps_staging_of_killed_uploads_only(make_app, web_env):
    incoming = web_env.uploads_dir / ".incoming"
    incoming.mkdir(parents=True)
    killed, killed_dir = stage_in_child(incoming)
    live, live_dir = stage_in_child(incoming)
    try:
        killed.send_signal(signal.SIGKILL)  # kill -9 mid-upload
        killed.wait(10)
        legacy_old, legacy_new = incoming / "0123abcd", incoming / "4567cdef"
        for folder in (legacy_old, legacy_new):
            folder.mkdir()
            (folder / "000000.wav").write_bytes(b"x")
        for folder in (killed_dir, live_dir):
            age(folder, 3600)  # an hour old: age alone would not say who is alive
        age(legacy_old, 2 * 86_400)

        make_app()  # start-up

        assert not killed_dir.exists() and not legacy_old.exists()
        assert live_dir.exists() and (live_dir / "000000.wav").exists()  # a live sibling's
        assert legacy_new.exists()  # no owner file and young: maybe just being created
    finally:
        live.kill()
        live.wait(10)
    make_app()  # the sibling died too: now its folder goes
    assert not live_dir.exists()


def test_an_upload_in_this_process_keeps_its_staging(web_env):
    from src import ingest

    incoming = web_env.uploads_dir / ".incoming"
    staging, owner = ingest._claim_staging(incoming)
    try:
        age(staging, 3600)
        assert ingest.sweep_staging(web_env) == []
        assert staging.exists()
    finally:
        owner.close()
    assert ingest.sweep_staging(web_env) == [staging] and not staging.exists()
