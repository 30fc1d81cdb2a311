"""The local production topology, for real: ``urbansound stack up --replicas 2`` (nginx + two
gunicorn replicas + Celery worker + Flower) against Postgres and Redis, then

* predictions through nginx all succeed and are balanced over the replicas (``X-Upstream``),
  static files come from nginx, nginx's own errors are JSON, the Locust profile runs clean;
* a load test during which a real retrain (one fine-tuning epoch) is promoted: zero failed
  requests, every response names the base or the new version, each replica switches once and
  for all, and after the swap every response names the new version;
* ``urbansound stack down`` leaves no process behind.

Isolation: a tmp state/models/data folder, a fresh Postgres database (dropped at the end), Redis
db ``URBANSOUND_TEST_STACK_REDIS_DB`` (13, flushed), random free ports on 127.0.0.1. The model
is a tiny one trained here on the synthetic set (the repository's ``models/`` and ``var/`` are
never touched). Missing nginx, Postgres or Redis fail in CI and skip elsewhere.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from web_helpers import ClientThreads, unavailable

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
REDIS_DB = int(os.environ.get("URBANSOUND_TEST_STACK_REDIS_DB", "13"))
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
TOKEN = "stack-test-token"
BASE = "stack-base-1"


def free_ports(n: int) -> list[int]:
    """``n`` consecutive free ports (nginx, replicas, Flower)."""
    from src.stack import port_free

    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 40000)
        ports = list(range(first, first + n))
        if all(port_free(p) for p in ports):
            return ports
    raise RuntimeError("no free port range")


@dataclass
class Stack:
    tmp: Path
    env: dict[str, str]
    port: int
    replica_ports: list[int]
    flower_port: int
    clips: list[bytes] = field(default_factory=list)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "src.cli", *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, port: int | None = None,
                timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def predict(self, clip: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
        status, headers, body = self.request("POST", "/api/v1/predict", clip,
                                             {"Content-Type": "audio/wav"})
        return status, headers, json.loads(body) if body else {}

    def served_versions(self) -> list[str | None]:
        out = []
        for p in self.replica_ports:
            status, _, body = self.request("GET", "/api/v1/health", port=p, timeout=5)
            out.append(json.loads(body).get("model_version") if status == 200 else None)
        return out


def train_base(data: Path, models: Path, cache: Path) -> None:
    """A tiny model (2 epochs on the synthetic set): seconds to train, good enough to serve."""
    from src import registry
    from src.model import TrainConfig, save_checkpoint
    from src.train import set_threads, train

    set_threads(2)
    result = train(data, None, TrainConfig(epochs=2, patience=2, seed=0), cache_dir=cache,
                   version=BASE, progress=False)
    ckpt = dict(result.checkpoint, torch=str(result.checkpoint["torch"]))
    tmp = save_checkpoint(ckpt, cache / f"{BASE}.pt")
    registry.publish(tmp, BASE, models_dir=models)
    registry.activate(BASE, models_dir=models)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, pg_database_factory) -> Iterator[Stack]:
    from src import stack as stack_mod
    from src import synth

    try:
        stack_mod.find_nginx()
    except stack_mod.StackError as exc:
        unavailable(exc.message)
    import redis

    try:
        r = redis.Redis("127.0.0.1", 6379, db=REDIS_DB, socket_connect_timeout=2)
        r.flushdb()
    except redis.RedisError as exc:
        unavailable(f"Redis not reachable at 127.0.0.1:6379 ({exc})")
    db_url = pg_database_factory()

    tmp = tmp_path_factory.mktemp("stack")
    synth.generate(tmp / "data", per_class=8, test_per_class=3, seed=1, progress=False)
    synth.generate(tmp / "uploads", per_class=2, test_per_class=0, seed=7, progress=False)
    train_base(tmp / "data", tmp / "models", tmp / "cache")
    ports = free_ports(4)
    env = {
        **os.environ,
        "URBANSOUND_STATE_DIR": str(tmp / "state"),
        "URBANSOUND_MODELS_DIR": str(tmp / "models"),
        "URBANSOUND_DATA_DIR": str(tmp / "data"),
        "URBANSOUND_DATABASE_URL": db_url,
        "URBANSOUND_BROKER_URL": REDIS_URL,
        "URBANSOUND_RESULT_BACKEND": REDIS_URL,
        "URBANSOUND_API_TOKEN": TOKEN,
        "URBANSOUND_MAX_UPLOAD_MB": "5",
        "URBANSOUND_MAX_CLIP_MB": "2",  # under the upload limit: a replica refuses a clip over it
        "URBANSOUND_RETRAIN_EPOCHS": "1",
        "URBANSOUND_GATE_MARGIN": "1.0",  # the test is about the swap: always promote
        "URBANSOUND_JOB_HEARTBEAT_S": "1",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("URBANSOUND_DEBUG", None)
    st = Stack(tmp, env, ports[0], ports[1:3], ports[3])
    st.clips = [p.read_bytes() for p in sorted((tmp / "data" / "test").rglob("*.wav"))]
    up = st.cli("stack", "up", "--replicas", "2", "--port", str(st.port), "--base-port",
                str(st.replica_ports[0]), "--flower-port", str(st.flower_port),
                # The test is about the swap, not CPU priorities: on a shared machine a niced
                # worker can take minutes to start (torch imports) and to train.
                "--worker-nice", "0", "--timeout", "240", timeout=400)
    try:
        assert up.returncode == 0, f"stack up failed:\n{up.stdout}\n{up.stderr}\n" + \
            "\n".join(log_tails(tmp))
        yield st
    finally:
        st.cli("stack", "down", timeout=120)
        redis.Redis("127.0.0.1", 6379, db=REDIS_DB).flushdb()


def log_tails(tmp: Path, n: int = 15) -> list[str]:
    out = []
    for log in sorted((tmp / "state" / "stack" / "logs").glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-n:]
        out.append(f"--- {log.name}\n" + "\n".join(lines))
    return out


def test_stack_status_reports_every_part_healthy(stack: Stack) -> None:
    result = stack.cli("stack", "status", "--json", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    info = json.loads(result.stdout)
    assert info["healthy"] and info["url"] == f"http://127.0.0.1:{stack.port}"
    names = {p["name"] for p in info["processes"]}
    assert names == {"web-1", "web-2", "worker", "flower", "nginx"}
    assert {p["model_version"] for p in info["processes"] if p["name"].startswith("web")} \
        == {BASE}


def test_predictions_through_nginx_are_balanced_and_succeed(stack: Stack) -> None:
    upstreams: list[str] = []
    for i in range(40):
        status, headers, out = stack.predict(stack.clips[i % len(stack.clips)])
        assert status == 200, out
        assert out["model_version"] == BASE and out["label"]
        upstreams.append(headers["x-upstream"])
    expected = {f"127.0.0.1:{p}" for p in stack.replica_ports}
    assert set(upstreams) == expected
    for u in expected:
        assert 0.4 <= upstreams.count(u) / len(upstreams) <= 0.6, upstreams

    # Concurrent clients: still all succeed, both replicas busy.
    results: list[tuple[int, str]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for i in range(10):
            status, headers, _ = stack.predict(stack.clips[(k * 10 + i) % len(stack.clips)])
            with lock:
                results.append((status, headers.get("x-upstream", "")))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 40 and all(s == 200 for s, _ in results)
    assert {u for _, u in results} == expected


def test_nginx_serves_static_files_and_json_errors(stack: Stack) -> None:
    status, headers, body = stack.request("GET", "/static/style.css")
    assert status == 200 and body and "x-upstream" not in headers  # no replica involved
    # Over URBANSOUND_MAX_UPLOAD_MB (5 here): refused by nginx, as JSON, before any replica
    # (the path's own limit: a replica refusing it by Content-Length would close the connection
    # while nginx sends the body, and CI once saw a 502 for it that way).
    status, headers, body = stack.request(
        "POST", "/api/v1/uploads", b"\0" * (6 << 20),
        {"Content-Type": "application/zip", "Authorization": f"Bearer {TOKEN}"})
    assert (status, json.loads(body)["error"]["code"]) == (413, "too_large"), (headers, body)
    assert "x-upstream" not in headers and b"5 MiB" in body
    # A recording to analyse may be bigger (URBANSOUND_MAX_ANALYZE_MB, 200 by default): the
    # same body on /api/v1/analyze reaches a replica, which says what is wrong with it.
    status, headers, body = stack.request("POST", "/api/v1/analyze", b"\0" * (6 << 20),
                                          {"Content-Type": "audio/wav"})
    assert status == 415 and headers.get("x-upstream"), (status, headers, body)


def test_a_body_a_replica_refuses_unread_is_its_answer_never_a_502(stack: Stack) -> None:
    """A clip over URBANSOUND_MAX_CLIP_MB (2 here) but under the upload limit passes nginx
    and is refused by a replica by its length; a body of the wrong type is refused before it
    is read. Every client must get that answer: a replica that answered with the body unread
    reset the connection while nginx was still sending it, and nginx said 502 instead (113
    of these 120 oversized clips, before web.request_body)."""
    from concurrent.futures import ThreadPoolExecutor

    def predict(i: int) -> tuple[int, str]:
        ctype = "text/plain" if i % 4 == 3 else "audio/wav"
        status, _, body = stack.request("POST", "/api/v1/predict", b"\0" * (4 << 20),
                                        {"Content-Type": ctype})
        return status, json.loads(body)["error"]["code"]

    with ThreadPoolExecutor(4) as pool:
        answers = Counter(pool.map(predict, range(160)))
    assert answers == {(413, "too_large"): 120, (415, "unsupported_media_type"): 40}, answers


def test_locust_profile_runs_clean_through_nginx(stack: Stack) -> None:
    summary = stack.tmp / "locust-summary.json"
    out = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "locustfile.py"), "--headless",
         "--host", f"http://127.0.0.1:{stack.port}", "-u", "4", "-r", "4", "-t", "8s",
         "--stop-timeout", "5", "--only-summary", "--clips", str(stack.tmp / "data" / "test"),
         "--summary-out", str(summary), "--csv", str(stack.tmp / "locust"), "--exit-code-on-error",
         "1"], cwd=stack.tmp, env=stack.env, capture_output=True, text=True, timeout=90)
    failures = stack.tmp / "locust_failures.csv"
    assert out.returncode == 0, (out.stdout[-2000:] + out.stderr[-2000:]
                                 + (failures.read_text() if failures.exists() else ""))
    import csv

    with open(stack.tmp / "locust_stats.csv", newline="") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert int(rows["POST /api/v1/predict"]["Request Count"]) > 10
    assert "GET /api/v1/health" in rows
    seen = json.loads(summary.read_text())
    assert set(seen["versions"]) == {BASE}
    assert len(seen["upstreams"]) == 2


class Load(ClientThreads):
    """Clients predicting through nginx until stopped, each pausing ``pause_s`` between
    requests; every answer is kept. Bounded: at most ``max_s`` seconds and ``max_requests``
    requests in all."""

    def __init__(self, stack: Stack, clients: int = 4, pause_s: float = 0.0,
                 max_s: float = 240, max_requests: int = 50_000):
        self.stack, self.max_s, self.max_requests = stack, max_s, max_requests
        self.pause_s = pause_s
        self.results: list[dict[str, Any]] = []
        super().__init__(clients)

    def client(self, k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.stack.port, timeout=30)
        i = k
        while not self.stop.is_set() and time.monotonic() - self.started < self.max_s:
            with self.lock:
                if len(self.results) >= self.max_requests:
                    return
            clip = self.stack.clips[i % len(self.stack.clips)]
            i += 7
            t0 = time.monotonic()
            rec: dict[str, Any] = {"t": t0}
            try:
                conn.request("POST", "/api/v1/predict", body=clip,
                             headers={"Content-Type": "audio/wav"})
                r = conn.getresponse()
                body = r.read()
                rec.update(status=r.status, upstream=r.getheader("X-Upstream"))
                rec["version"] = json.loads(body).get("model_version") if r.status == 200 \
                    else body[:200].decode(errors="replace")
            except (OSError, http.client.HTTPException, ValueError) as exc:
                rec.update(status=0, version=repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.stack.port, timeout=30)
            rec["done"] = time.monotonic()
            with self.lock:
                self.results.append(rec)
            if self.pause_s:
                self.stop.wait(self.pause_s)
        conn.close()


def upload_clips(stack: Stack) -> int:
    """The second synthetic set (different seed, so no duplicates) as a folder upload."""
    boundary = "----stacktest"
    parts = []
    for path in sorted((stack.tmp / "uploads" / "train").rglob("*.wav")):
        name = f"{path.parent.name}/{path.name}"
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
                     f"filename=\"{name}\"\r\nContent-Type: audio/wav\r\n\r\n".encode()
                     + path.read_bytes() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    status, _, out = stack.request(
        "POST", "/api/v1/uploads", body,
        {"Content-Type": f"multipart/form-data; boundary={boundary}",
         "Authorization": f"Bearer {TOKEN}"}, timeout=120)
    assert status == 201, out[:500]
    report = json.loads(out)
    assert not report["rejected"], report["rejected"]
    return len(report["accepted"])


def test_retrain_promoted_under_load_fails_no_request(stack: Stack) -> None:
    assert upload_clips(stack) == 20
    # Steady traffic (up to ~60 requests/s offered) rather than saturation, so the retrain
    # (one epoch, seconds when it gets a core) finishes well within the test's time.
    with Load(stack, clients=3, pause_s=0.05) as load:
        time.sleep(2)  # some answers from the base model first
        status, headers, out = stack.request(
            "POST", "/api/v1/retrain", json.dumps({"epochs": 1}).encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
        assert status == 202, out
        job_path = headers["location"]
        deadline = time.monotonic() + 150
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status, _, out = stack.request("GET", job_path)
            assert status == 200, out
            job = json.loads(out)
            if job["done"]:
                break
            time.sleep(0.5)
        assert job.get("status") == "succeeded", (job, log_tails(stack.tmp))
        new = job["result_version"]
        assert new and new != BASE
        # Every replica follows the pointer within a second or two (plus the load time).
        deadline = time.monotonic() + 30
        while stack.served_versions() != [new, new] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stack.served_versions() == [new, new]
        switched_at = time.monotonic()
        time.sleep(3)  # and keep the load on the new model for a while
    results = load.results

    failed = [r for r in results if r["status"] != 200]
    assert not failed, f"{len(failed)} of {len(results)} failed, e.g. {failed[:3]}"
    versions = [r["version"] for r in results]
    assert set(versions) == {BASE, new}, set(versions)
    assert versions.count(BASE) > 10 and versions.count(new) > 10
    # Each replica switches once: after its first answer from the new model, no old one.
    for upstream in {r["upstream"] for r in results}:
        mine = [r["version"] for r in sorted(results, key=lambda r: r["t"])
                if r["upstream"] == upstream]
        first_new = mine.index(new)
        assert all(v == new for v in mine[first_new:]), f"{upstream} went back to {BASE}"
    late = [r for r in results if r["t"] > switched_at]
    assert late and all(r["version"] == new for r in late)


def test_stack_down_leaves_no_processes(stack: Stack) -> None:
    from src.stack import StackState, group_members

    state_file = stack.tmp / "state" / "stack" / "stack.json"
    recorded = json.loads(state_file.read_text())
    state = StackState(**{**recorded, "processes": []})
    pids = [p["pid"] for p in recorded["processes"]]
    assert len(pids) == 5 and state.nginx_port == stack.port
    result = stack.cli("stack", "down", timeout=120)
    assert result.returncode == 0, result.stderr
    assert not state_file.exists()
    assert all(not group_members(pid) for pid in pids)
    for port in [stack.port, *stack.replica_ports, stack.flower_port]:
        status, _, _ = (0, None, None)
        try:
            status = stack.request("GET", "/", port=port, timeout=2)[0]
        except OSError:
            status = 0
        assert status == 0, f"something still answers on port {port}"
    result = stack.cli("stack", "status", timeout=60)
    assert result.returncode == 3 and "not running" in result.stdout
