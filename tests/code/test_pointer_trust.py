"""The model pointer is verified, never trusted blindly (issue 12, item 6).

A ``models/CURRENT`` that cannot be followed (garbage, empty, a dangling or traversing version
name, a sha256 that does not match the file, a truncated checkpoint) never changes the model
that answers; readiness says why (503, JSON) and the metrics count it; fixing the pointer makes
the server ready again. A correct new pointer is still followed at once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from src import registry

POINTER = registry.POINTER


@pytest.fixture(autouse=True)
def _eager_models(monkeypatch):
    """Skip TorchScript tracing: these tests load many models and check which one answers."""
    from src.prediction import Predictor

    monkeypatch.setattr(Predictor, "_optimised", lambda self: self.model)


def pointer_to(models: Path, name: str, **overrides) -> None:
    """Replace ``CURRENT`` the way ``activate`` does (naming version ``name``), with the given
    fields changed."""
    data = {"version": name, "file": f"{name}.pt",
            "sha256": hashlib.sha256((models / f"{name}.pt").read_bytes()).hexdigest(),
            "activated_at": "2026-12-02T00:00:00+00:00", "previous": "quick-1", **overrides}
    (models / POINTER).write_text(json.dumps(data))


def truncated_copy(models: Path, version: str) -> str:
    """``version``: a copy of quick-2 published normally, then cut in half on disk. Returns
    the sha256 recorded before the damage (what an activation would have written)."""
    src = models / "quick-2.pt"
    tmp = models.parent / f"{version}-src.pt"
    import torch

    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    torch.save(dict(ckpt, version=version), tmp)
    registry.publish(tmp, version, models_dir=models)
    path = models / f"{version}.pt"
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    path.write_bytes(data[: len(data) // 2])
    return sha


# Each corruption, applied while quick-1 is served: (what it does, expected problem words).
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "garbage": (lambda m: (m / POINTER).write_bytes(b"\x00\xffnot json at all{"),
                "pointer_unreadable", "pointer unreadable"),
    "empty": (lambda m: (m / POINTER).write_bytes(b""),
              "pointer_unreadable", "pointer unreadable"),
    "not an object": (lambda m: (m / POINTER).write_text('["quick-2"]'),
                      "pointer_unreadable", "pointer unreadable"),
    "traversal in the version": (
        lambda m: pointer_to(m, "quick-2", version="../../../etc/passwd"),
        "pointer_unreadable", "invalid version name"),
    "traversal in the file": (
        lambda m: pointer_to(m, "quick-2", file="../quick-2.pt"),
        "pointer_unreadable", "pointer unreadable"),
    "no sha256": (lambda m: pointer_to(m, "quick-2", sha256=None),
                  "pointer_unreadable", "no valid sha256"),
    "wrong hash": (lambda m: pointer_to(m, "quick-2", sha256="0" * 64),
                   "hash_mismatch", "hash mismatch"),
    "dangling version": (
        lambda m: pointer_to(m, "quick-2", version="gone-1", file="gone-1.pt"),
        "older_than_pointer", "serving an older version than the pointer names"),
    "truncated after activation": (
        lambda m: pointer_to(m, "cut-1", sha256=truncated_copy(m, "cut-1")),
        "hash_mismatch", "hash mismatch"),
    "truncated checkpoint, hash of the truncated bytes": (
        lambda m: truncated_copy(m, "cut-2") and pointer_to(m, "cut-2"),  # only loading tells
        "older_than_pointer", "serving an older version than the pointer names"),
    "served file truncated in place": (
        lambda m: (m / "quick-1.pt").write_bytes((m / "quick-1.pt").read_bytes()[:1000]),
        "hash_mismatch", "hash mismatch"),
}


# --------------------------------------------------------------------------- the core


def live(models: Path):
    from src.prediction import LivePredictor

    return LivePredictor(models, poll_s=0.0, optimise=False)


def test_a_correct_new_pointer_is_followed(own_models):
    predictor = live(own_models)
    assert predictor.current.version == "quick-1" and predictor.pointer.ok
    registry.activate("quick-2", models_dir=own_models)
    assert predictor.refresh() is True
    assert predictor.current.version == "quick-2" and predictor.pointer.ok
    # as requests see it: polled, loaded in the background, answering all the while
    predictor.poll_s = 0.05
    registry.activate("quick-1", models_dir=own_models)
    started = time.monotonic()
    while predictor.get().version != "quick-1":
        assert time.monotonic() - started < 5, "the new pointer was not followed"
        time.sleep(0.01)
    assert predictor.pointer.ok and time.monotonic() - started < 5


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_pointer_that_cannot_be_trusted_changes_nothing_but_says_why(own_models, name):
    corrupt, state, words = CORRUPTIONS[name]
    predictor = live(own_models)
    before = predictor.current
    corrupt(own_models)
    predictor.refresh()
    assert predictor.current is before, f"{name}: the model changed"
    assert predictor.pointer.state == state, predictor.pointer
    assert words in predictor.pointer.message and "still serving quick-1" in \
        predictor.pointer.message
    # a fresh process (a restarted worker) does not serve the untrusted file either
    if name == "served file truncated in place":  # and nothing else was ever activated
        with pytest.raises(registry.RegistryError, match="No usable model"):
            live(own_models)
    else:
        restarted = live(own_models)
        assert restarted.current.version == "quick-1" and restarted.pointer.state == state
    # fixing it (a real activation) makes the pointer trusted again
    if name == "served file truncated in place":
        registry.activate("quick-2", models_dir=own_models)
        expected = "quick-2"
    else:
        registry.activate("quick-1", models_dir=own_models)
        expected = "quick-1"
    predictor.refresh()
    assert predictor.pointer.ok, predictor.pointer
    assert predictor.current.version == expected


def test_a_file_swapped_after_the_check_is_refused(own_models, monkeypatch):
    """The sha256 is checked on the bytes that are loaded, not on a file read earlier."""
    from src import prediction

    predictor = live(own_models)
    registry.activate("quick-2", models_dir=own_models)
    real = prediction.Path.read_bytes

    def swapped(path):
        data = real(path)
        return data[:-10] + b"0123456789" if path.name == "quick-2.pt" else data

    monkeypatch.setattr(prediction.Path, "read_bytes", swapped)
    predictor.refresh()
    assert predictor.current.version == "quick-1"
    assert predictor.pointer.state == "older_than_pointer"
    assert "sha256" in predictor.pointer.message


def test_check_pointer_reports_each_state(own_models):
    assert registry.check_pointer(own_models).ok
    pointer_to(own_models, "quick-2", sha256="f" * 64)
    check = registry.check_pointer(own_models)
    assert check.state == "hash_mismatch" and "quick-2.pt has sha256" in check.message
    # current() never names a file whose bytes differ from the pointer's record
    assert registry.current(own_models)[0] == "quick-1"
    (own_models / POINTER).unlink()
    assert registry.check_pointer(own_models).state == "unreadable"


# --------------------------------------------------------------------------- the server


def wait_ready(client, status: int, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/api/v1/ready")
        if r.status_code == status or time.monotonic() > deadline:
            assert r.status_code == status, r.get_json()
            return r.get_json()
        time.sleep(0.05)


@pytest.mark.parametrize("name", ["wrong hash", "garbage", "dangling version",
                                  "truncated checkpoint, hash of the truncated bytes"])
def test_readiness_and_metrics_say_why(own_models, make_app, monkeypatch, clip, name):
    monkeypatch.setenv("URBANSOUND_MODEL_POLL_S", "0.05")
    client = make_app().test_client()
    assert wait_ready(client, 200)["ready"] is True
    corrupt, state, words = CORRUPTIONS[name]
    corrupt(own_models)

    body = wait_ready(client, 503)
    assert body["error"]["code"] == "not_ready"
    assert words in body["error"]["message"]
    assert body["checks"]["model"]["ok"] is False and words in body["checks"]["model"]["message"]
    # the old model keeps answering
    r = client.post("/api/v1/predict", data=clip, content_type="audio/wav")
    assert r.status_code == 200 and r.get_json()["model_version"] == "quick-1"
    # and the metrics raise the flag, in both views
    text = client.get("/metrics").get_data(as_text=True)
    assert "urbansound_model_pointer_problem 1.0" in text
    assert f'urbansound_model_pointer_state{{state="{state}"}} 1.0' in text
    pointer = client.get("/api/v1/metrics").get_json()["model"]["pointer"]
    assert pointer == {"ok": False, "workers_by_state": {state: 1}}

    registry.activate("quick-2", models_dir=own_models)  # fixing the pointer
    body = wait_ready(client, 200)
    assert body["checks"]["model"]["message"] == "serving quick-2"
    text = client.get("/metrics").get_data(as_text=True)
    assert "urbansound_model_pointer_problem 0.0" in text
    pointer = client.get("/api/v1/metrics").get_json()["model"]["pointer"]
    assert pointer == {"ok": True, "workers_by_state": {"ok": 1}}


def wait_metrics(client, line: str) -> str:
    """/metrics once it shows ``line`` (it never asks for the predictor itself, so only the
    watcher thread can have moved the gauges)."""
    deadline = time.monotonic() + 10
    while True:
        text = client.get("/metrics").get_data(as_text=True)
        if line in text:
            return text
        assert time.monotonic() < deadline, f"/metrics never showed {line!r}"
        time.sleep(0.05)


def test_the_problem_flag_rises_and_falls_with_no_request_reaching_the_worker(
        own_models, make_app, monkeypatch):
    """A worker that keep-alive connections never reach learns of a broken pointer on its
    watcher thread; the alert must rise then, not at a request that may never come."""
    monkeypatch.setenv("URBANSOUND_MODEL_POLL_S", "0.05")
    client = make_app().test_client()
    assert wait_ready(client, 200)["ready"] is True  # the last request that reaches the model
    assert "urbansound_model_pointer_problem 0.0" in client.get("/metrics").get_data(as_text=True)

    CORRUPTIONS["wrong hash"][0](own_models)
    text = wait_metrics(client, "urbansound_model_pointer_problem 1.0")
    assert 'urbansound_model_pointer_state{state="hash_mismatch"} 1.0' in text
    assert 'urbansound_model_pointer_state{state="ok"} 0.0' in text

    registry.activate("quick-2", models_dir=own_models)
    text = wait_metrics(client, "urbansound_model_pointer_problem 0.0")
    assert 'urbansound_model_pointer_state{state="ok"} 1.0' in text
    assert 'urbansound_model_served{version="quick-2"} 1.0' in text
