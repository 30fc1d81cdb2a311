"""Faults an unlucky operator meets, against a real server (gunicorn, 2 workers, SQLite: the
embedded default), kept in CI so the audit's hand-made faults stay survived:

- ``kill -9`` of a gunicorn worker, and of the gunicorn master, while clients keep uploading:
  every upload the server answered 201 for is in the database with its file on disk, whole
  (its bytes hash to the recorded sha256); no half-written file anywhere in the store; the
  server (respawned worker, or a restarted server after the master died) keeps serving.
- a corrupted ``models/CURRENT`` pointer (garbage, empty, dangling, a traversal name, a
  truncated checkpoint, a wrong hash): no prediction fails, the last good model keeps
  answering, readiness says why (503), and a valid pointer afterwards is followed again.

The worker side (``kill -9`` of the Celery pool child and of the whole worker group mid-epoch)
is in ``test_worker.py``: ``test_kill_9_of_the_pool_child_fails_the_job_on_redelivery`` and
``test_kill_9_mid_training_leaves_model_and_next_retrain_succeeds``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import requests
from web_helpers import TOKEN, ClientThreads, Gunicorn, app_env, build_registry, tone

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLIENTS = 2


@pytest.fixture()
def server_env(quick_model, synthetic_data, tmp_path):
    """A registry (quick-1 served, quick-2 a candidate), a migrated SQLite database and the
    environment ``Gunicorn`` runs the app with; rate limits off (the clients here upload as
    fast as they can on purpose)."""
    from src import db

    models = build_registry(quick_model.checkpoint, tmp_path)
    state = tmp_path / "var"
    env = app_env(state, models, synthetic_data, URBANSOUND_RATE_LIMITS="false")
    db.upgrade(f"sqlite:///{state / 'urbansound.db'}")
    return tmp_path, models, state, env


# --------------------------------------------------------------------------- uploads

class Uploaders(ClientThreads):
    """``CLIENTS`` threads uploading distinct one-second clips until stopped; remembers the
    sha256 of every clip the server answered 201 for, and what else happened."""

    join_timeout_s = 90

    def __init__(self, url: str, first_seed: int = 0):
        self.url, self.seed = url, first_seed
        self.accepted: dict[str, float] = {}  # sha256 -> when the 201 arrived
        self.other: list[str] = []
        super().__init__(CLIENTS)

    def next_clip(self) -> bytes:
        with self.lock:
            self.seed += 1
            seed = self.seed
        return tone(seconds=1.0, freq=200.0 + seed % 1500, seed=seed)

    def client(self, k: int) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            clip = self.next_clip()
            try:
                r = session.post(f"{self.url}/api/v1/uploads", headers=AUTH, timeout=60,
                                 files=[("files", ("clip.wav", clip, "audio/wav"))],
                                 data={"label": "dog_bark"})
            except requests.RequestException as exc:  # the process that had it was killed
                with self.lock:
                    self.other.append(type(exc).__name__)
                session = requests.Session()
                time.sleep(0.05)
                continue
            with self.lock:
                if r.status_code == 201:
                    body = r.json()
                    assert [a["sha256"] for a in body["accepted"]] == \
                        [hashlib.sha256(clip).hexdigest()], body
                    self.accepted[body["accepted"][0]["sha256"]] = time.monotonic()
                else:
                    self.other.append(f"{r.status_code} {r.text[:200]}")

    def wait_for(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.accepted) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(self.accepted) >= n, f"only {len(self.accepted)} uploads: {self.other[-5:]}"


def audit(what: str, survived: int) -> None:
    """A line ``scripts/audit.sh`` counts (printed only once everything was asserted)."""
    print("\nAUDIT " + json.dumps({"kind": "fault", "what": what, "tried": survived,
                                   "clean": survived}))


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def assert_store_consistent(state: Path, accepted: dict[str, float]) -> int:
    """Every 201 is a database row whose file is on disk and whole; every file in the store
    is whole (named by its content's hash); returns how many clips are stored."""
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{state / 'urbansound.db'}")
    try:
        with engine.connect() as conn:
            rows = dict(conn.execute(sa.text("SELECT sha256, path FROM clips")).all())
    finally:
        engine.dispose()
    lost = set(accepted) - set(rows)
    assert not lost, f"{len(lost)} uploads answered 201 are not in the database"
    uploads = state / "uploads"
    for sha, rel in rows.items():
        path = uploads / rel
        assert path.is_file(), f"row {sha[:12]} has no file {rel}"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha, f"{rel} is not whole"
    for path in uploads.rglob("*"):
        if path.is_file() and ".incoming" not in path.parts and not path.name.startswith("."):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            assert digest.startswith(path.stem), f"half-written file in the store: {path}"
    return len(rows)


def test_kill_9_of_a_gunicorn_worker_during_uploads_loses_nothing(server_env):
    root, _, state, env = server_env
    with Gunicorn(env, root / "gunicorn.log", workers=2) as server:
        master = server.proc.pid
        with Uploaders(server.url) as clients:
            clients.wait_for(10)
            victims = children(master)
            assert len(victims) == 2, victims
            os.kill(victims[0], signal.SIGKILL)  # mid-request: uploads never pause
            killed_at = time.monotonic()
            deadline = killed_at + 120
            while time.monotonic() < deadline:  # the master replaces it
                now = children(master)
                if len(now) == 2 and victims[0] not in now:
                    break
                time.sleep(0.2)
            assert victims[0] not in children(master) and len(children(master)) == 2
            server.wait_ready(120)
            before = len(clients.accepted)
            clients.wait_for(before + 10)
        after_kill = [t for t in clients.accepted.values() if t > killed_at]
        assert after_kill, "no upload succeeded after the kill"
        r = requests.post(f"{server.url}/api/v1/predict", data=tone(seed=99_999),
                          headers={"Content-Type": "audio/wav"}, timeout=60)
        assert r.status_code == 200, r.text
    stored = assert_store_consistent(state, clients.accepted)
    assert stored >= len(clients.accepted)
    audit("gunicorn worker kill -9 during uploads", 1)
    print(f"\nworker kill -9: {len(clients.accepted)} uploads answered 201, all stored; "
          f"{len(clients.other)} requests failed in flight ({sorted(set(clients.other))[:3]})")


def test_kill_9_of_the_gunicorn_master_during_uploads_loses_nothing(server_env):
    root, _, state, env = server_env
    server = Gunicorn(env, root / "gunicorn.log", workers=2).start()
    master = server.proc.pid
    try:
        with Uploaders(server.url) as clients:
            clients.wait_for(10)
            os.kill(master, signal.SIGKILL)
            server.proc.wait(timeout=30)
            deadline = time.monotonic() + 30  # orphaned workers notice and exit on their own
            while time.monotonic() < deadline and any(
                    Path(f"/proc/{p}").exists() for p in _group(master)):
                time.sleep(0.2)
            time.sleep(1)  # clients see refused connections for a moment
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(master, signal.SIGKILL)  # whatever did not exit (a test must not leak)
    before = len(clients.accepted)
    assert before >= 10
    assert_store_consistent(state, clients.accepted)

    with Gunicorn(env, root / "gunicorn-restarted.log", workers=2) as restarted:
        with Uploaders(restarted.url, first_seed=1_000_000) as more:
            more.wait_for(5)
        r = requests.post(f"{restarted.url}/api/v1/predict", data=tone(seed=99_999),
                          headers={"Content-Type": "audio/wav"}, timeout=60)
        assert r.status_code == 200, r.text
        listed = requests.get(f"{restarted.url}/api/v1/uploads", headers=AUTH, timeout=30)
        assert listed.status_code == 200
    assert_store_consistent(state, {**clients.accepted, **more.accepted})
    audit("gunicorn master kill -9 during uploads", 1)
    print(f"\nmaster kill -9: {before} uploads answered 201 before, all stored; restarted "
          f"server took {len(more.accepted)} more")


def _group(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    found.append(int(entry.name))
            except ProcessLookupError:
                continue
    return found


# --------------------------------------------------------------------------- CURRENT

REASONS = {  # what readiness must say for each (src.prediction.POINTER_PROBLEMS)
    "garbage": "pointer unreadable", "empty": "pointer unreadable",
    "traversal": "pointer unreadable", "wrong hash": "hash mismatch",
    "dangling": "serving an older version than the pointer names",
    "truncated checkpoint": "serving an older version than the pointer names",
}


def corruptions(models: Path) -> dict[str, bytes]:
    """What an unlucky operator (or a disk) can leave in ``models/CURRENT``."""
    good = json.loads((models / "CURRENT").read_text())
    quick2 = models / "quick-2.pt"
    truncated = models / "quick-trunc.pt"
    truncated.write_bytes(quick2.read_bytes()[: quick2.stat().st_size // 2])
    sha_trunc = hashlib.sha256(truncated.read_bytes()).hexdigest()

    def pointer(**fields: str) -> bytes:
        return json.dumps({**good, **fields}).encode()

    return {
        "garbage": b"\x00\xff{{not json at all",
        "empty": b"",
        "dangling": pointer(version="ghost", file="ghost.pt", sha256="0" * 64),
        "traversal": pointer(version="../../etc/passwd", file="../../../etc/passwd"),
        "truncated checkpoint": pointer(version="quick-trunc", file="quick-trunc.pt",
                                        sha256=sha_trunc),
        "wrong hash": pointer(version="quick-2", file="quick-2.pt", sha256=good["sha256"]),
    }


def test_corrupted_pointer_never_fails_a_prediction(server_env):
    from src import registry

    root, models, _, env = server_env
    clip = tone(seed=4242)
    answers: list[tuple[str, int, str]] = []  # (variant, status, version or body)
    with Gunicorn(env, root / "gunicorn.log", workers=2) as server:
        server.wait_workers("quick-1")
        ready = requests.get(f"{server.url}/api/v1/ready", timeout=30).json()
        reports_pointer = "pointer" in json.dumps(ready["checks"])
        good = (models / "CURRENT").read_bytes()
        readiness: dict[str, tuple[int, str]] = {}
        for variant, content in corruptions(models).items():
            (models / "CURRENT").write_bytes(content)  # in place, as a disk fault would
            end = time.monotonic() + 3.0  # six polls: every worker has looked at it
            while time.monotonic() < end:
                r = requests.post(f"{server.url}/api/v1/predict", data=clip, timeout=60,
                                  headers={"Content-Type": "audio/wav"})
                answers.append((variant, r.status_code, r.json().get("model_version")
                                if r.status_code == 200 else r.text[:200]))
            r = requests.get(f"{server.url}/api/v1/ready", timeout=30)
            readiness[variant] = (r.status_code, r.text)
            tmp = models / "CURRENT.restore"
            tmp.write_bytes(good)
            os.replace(tmp, models / "CURRENT")
            time.sleep(1.5)
        bad = [a for a in answers if a[1] != 200 or a[2] != "quick-1"]
        assert not bad, (bad[:5], server.tail())
        # The server still follows a valid pointer afterwards.
        # (a worker looks at the pointer when it answers: keep predicting meanwhile)
        registry.activate("quick-2", models_dir=models)
        deadline, versions = time.monotonic() + 120, set()
        while versions != {"quick-2"} and time.monotonic() < deadline:
            versions = set()
            for _ in range(6):
                r = requests.post(f"{server.url}/api/v1/predict", data=clip, timeout=60,
                                  headers={"Content-Type": "audio/wav"})
                assert r.status_code == 200, r.text
                versions.add(r.json()["model_version"])
            time.sleep(0.5)
        assert versions == {"quick-2"}, (versions, server.tail())

    assert {v for v, _, _ in answers} == set(readiness) and len(answers) >= 6 * 5
    if reports_pointer:  # readiness names the reason (issue 12, item 6)
        for variant, (status, text) in readiness.items():
            assert status == 503, (variant, text)
            assert json.loads(text)["error"]["code"] == "not_ready", (variant, text)
            assert REASONS[variant] in text, (variant, text)
    audit("corrupted models/CURRENT", len(readiness))
    print(f"\n{len(answers)} predictions over {len(readiness)} corrupted pointers, all 200 from "
          f"quick-1; readiness: {[(v, s) for v, (s, _) in readiness.items()]}")
