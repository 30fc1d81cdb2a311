"""Swapping the served model under load: real gunicorn (2 workers), concurrent clients, the
pointer replaced several times the way a promotion or a rollback does it.

Shown: no request fails; every response names a version, and its probabilities are exactly
that version's (so the name is the model that really answered, not a label read at another
moment); every worker moves to the new version shortly after each swap.
"""

from __future__ import annotations

import statistics
import threading
import time

import numpy as np
import pytest
import requests
from web_helpers import Gunicorn, app_env

pytestmark = pytest.mark.integration
CLIENTS = 3
SWAPS = ("swap-2", "swap-1", "swap-2")
SETTLE_S = 90.0  # notice (<= poll 0.5 s) + load (~2 s idle; far more on a loaded machine)


def perturbed(ckpt: dict, version: str, parent: str) -> dict:
    """The same network with a shifted output bias: a different, valid model whose answers
    can be told apart from the original's."""
    import torch

    state = dict(ckpt["state_dict"])
    state["head.bias"] = state["head.bias"] + torch.linspace(-1.0, 1.0, len(ckpt["classes"]))
    return dict(ckpt, state_dict=state, version=version, parent=parent)


@pytest.fixture(scope="module")
def swap_env(quick_model, synthetic_data, tmp_path_factory):
    from src import db, registry
    from src.model import save_checkpoint

    root = tmp_path_factory.mktemp("hot-swap")
    models = root / "models"
    base = dict(quick_model.checkpoint, torch=str(quick_model.checkpoint["torch"]))
    for ckpt in (dict(base, version="swap-1", parent=None), perturbed(base, "swap-2", "swap-1")):
        path = save_checkpoint(ckpt, root / f"{ckpt['version']}.pt")
        registry.publish(path, ckpt["version"], models_dir=models)
    registry.activate("swap-1", models_dir=models)
    state = root / "var"
    env = app_env(state, models, synthetic_data)
    db.upgrade(f"sqlite:///{state / 'urbansound.db'}")
    return root, models, env


def expected_probabilities(models, clip: bytes) -> dict[str, np.ndarray]:
    from src.prediction import Predictor
    from src.preprocessing import CLASSES

    out = {}
    for version in ("swap-1", "swap-2"):
        p = Predictor(models / f"{version}.pt").predict(clip)  # as the workers compute it
        out[version] = np.array([p.probabilities[c] for c in CLASSES])
    assert np.abs(out["swap-1"] - out["swap-2"]).max() > 0.01  # the two are distinguishable
    return out


def test_swap_under_load_fails_nothing(swap_env, synthetic_data):
    from src import registry
    from src.preprocessing import CLASSES

    root, models, env = swap_env
    clip = sorted((synthetic_data / "test" / "siren").glob("*.wav"))[0].read_bytes()
    expected = expected_probabilities(models, clip)
    results: list[dict] = []
    errors: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            started = time.monotonic()
            try:
                r = session.post(f"{server.url}/api/v1/predict", data=clip,
                                 headers={"Content-Type": "audio/wav"}, timeout=30)
            except requests.RequestException as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            row = {"start": started, "end": time.monotonic(), "status": r.status_code}
            if r.status_code == 200:
                body = r.json()
                row["version"] = body["model_version"]
                row["probs"] = np.array([body["probabilities"][c] for c in CLASSES])
            else:
                row["body"] = r.text[:300]
            with lock:
                results.append(row)

    with Gunicorn(env, root / "gunicorn.log", workers=2) as server:
        server.wait_workers("swap-1")
        threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        swaps: list[tuple[float, str, float]] = []  # (activated, version, all workers on it)
        try:
            time.sleep(3)
            for version in SWAPS:
                activated = time.monotonic()
                registry.activate(version, models_dir=models)  # what a promotion/rollback does
                server.wait_workers(version, timeout=SETTLE_S)
                swaps.append((activated, version, time.monotonic()))
                time.sleep(2)  # keep answering on the new version for a while
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        log = server.tail()

    assert not errors, errors[:5]
    failed = [r for r in results if r["status"] != 200]
    assert not failed, failed[:5]
    assert len(results) > 50, f"only {len(results)} requests: {log}"
    # src's own log lines reach gunicorn's log (a swap can be read from the server log)
    server_log = (root / "gunicorn.log").read_text(errors="replace")
    assert "now serving model swap-2" in server_log, log

    for r in results:  # each response names the version that computed it
        assert r["version"] in expected
        assert np.abs(r["probs"] - expected[r["version"]]).max() < 2e-3, r["version"]

    versions_seen = {r["version"] for r in results}
    assert versions_seen == {"swap-1", "swap-2"}
    # Once every worker reports the new version, nothing answers with the old one.
    ends = [a for a, _, _ in swaps[1:]] + [float("inf")]
    for (_, version, settled), end in zip(swaps, ends, strict=True):
        after = [r for r in results if settled < r["start"] < end]
        assert after and all(r["version"] == version for r in after), version

    latencies = [r["end"] - r["start"] for r in results]
    p95 = statistics.quantiles(latencies, n=20)[18]
    switch = [(version, round(settled - activated, 2)) for activated, version, settled in swaps]
    print(f"\n{len(results)} requests from {CLIENTS} clients, 0 failed; client p95 "
          f"{1000 * p95:.0f} ms; seconds until every worker served the new version: {switch}")
    assert max(latencies) < 30
