"""Web benchmark: the served model behind real gunicorn, on this machine. Prints:

1. server-side predict latency (``latency_ms``: decode + features + CNN, measured inside the
   worker) p50/p95 for a 4-s real clip, per worker, sending one request at a time so nothing
   queues (gunicorn, ``--workers 1``);
2. requests/s through gunicorn with 2 workers, ``--clients`` concurrent keep-alive clients
   posting the same clip for ``--duration`` seconds, with client-side p50/p95 and failures.

    .venv/bin/python benchmarks/bench_web.py [--requests 200] [--duration 30] [--clients 4]

Serves the repository's model (``models/``) when there is one, else an untrained network of
the same architecture (inference cost does not depend on the weights). Everything (registry
copy, SQLite database, metrics) lives in a temporary folder; nothing in ``var/`` or
``models/`` is touched. The clip is a real UrbanSound8K slice from ``../shared/us8k``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from web_helpers import TOKEN, US8K, Gunicorn  # noqa: E402


def four_second_clip() -> Path:
    import soundfile as sf

    for path in sorted((US8K / "audio").glob("fold*/*.flac")):
        if sf.info(path).duration >= 3.999:
            return path
    sys.exit(f"no 4-s clip under {US8K}")


def model_registry(root: Path) -> tuple[Path, str]:
    """A registry copy serving the committed model, or an untrained one of the same shape."""
    from src import registry
    from src.model import AudioCNN, make_checkpoint, save_checkpoint
    from src.preprocessing import CLASSES

    models = root / "models"
    try:
        version, path = registry.current(ROOT / "models")
        tmp = path
        note = f"committed model {version}"
    except registry.RegistryError:
        version = "bench-untrained"
        ckpt = make_checkpoint(AudioCNN().eval(), CLASSES, version, None, {}, {})
        ckpt["torch"] = str(ckpt["torch"])
        tmp = save_checkpoint(ckpt, root / f"{version}.pt")
        note = "untrained network of the default architecture (no committed model yet)"
    registry.publish(tmp, version, models_dir=models)
    registry.activate(version, models_dir=models)
    return models, note


def environment(root: Path, models: Path) -> dict[str, str]:
    from src import db

    state = root / "var"
    db.upgrade(f"sqlite:///{state / 'urbansound.db'}")
    return {"URBANSOUND_STATE_DIR": str(state), "URBANSOUND_MODELS_DIR": str(models),
            "URBANSOUND_DATABASE_URL": "", "URBANSOUND_BROKER_URL": "",
            "URBANSOUND_RESULT_BACKEND": "", "URBANSOUND_API_TOKEN": TOKEN,
            "URBANSOUND_ACCESS_LOG": ""}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def sequential(url: str, clip: bytes, n: int) -> tuple[list[float], list[float]]:
    session = requests.Session()
    server, client = [], []
    for i in range(n + 10):
        start = time.perf_counter()
        r = session.post(f"{url}/api/v1/predict", data=clip,
                         headers={"Content-Type": "audio/flac"}, timeout=60)
        r.raise_for_status()
        if i >= 10:  # warm-up requests are not counted
            client.append(1000 * (time.perf_counter() - start))
            server.append(r.json()["latency_ms"])
    return server, client


def throughput(url: str, clip: bytes, clients: int, duration: float) -> dict:
    stop = threading.Event()
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()

    def run() -> None:
        session = requests.Session()
        while not stop.is_set():
            start = time.perf_counter()
            try:
                ok = session.post(f"{url}/api/v1/predict", data=clip, timeout=60,
                                  headers={"Content-Type": "audio/flac"}).status_code == 200
            except requests.RequestException:
                ok = False
            with lock:
                if ok:
                    latencies.append(1000 * (time.perf_counter() - start))
                else:
                    failures[0] += 1

    threads = [threading.Thread(target=run, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(min(5.0, duration / 4))  # ramp-up, not counted
    with lock:
        latencies.clear()
        failures[0] = 0
    started = time.perf_counter()
    time.sleep(duration)
    with lock:
        done, failed, lat = len(latencies), failures[0], list(latencies)
    elapsed = time.perf_counter() - started
    stop.set()
    for t in threads:
        t.join(timeout=60)
    return {"rps": done / elapsed, "requests": done, "failures": failed,
            "p50": pct(lat, 50) if lat else float("nan"),
            "p95": pct(lat, 95) if lat else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="sequential requests")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    args = parser.parse_args()

    path = four_second_clip()
    clip = path.read_bytes()
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        root = Path(tmp)
        models, note = model_registry(root)
        env = environment(root, models)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"load average {os.getloadavg()[0]:.1f} at start")
        print(f"model: {note}; clip: {path.name} (4.0 s FLAC, {len(clip) / 1024:.0f} KiB)")

        with Gunicorn(env, root / "one.log", workers=1) as server:
            server_ms, client_ms = sequential(server.url, clip, args.requests)
        print(f"\n1 worker, one request at a time, {args.requests} requests:")
        print(f"  server-side predict latency  p50 {pct(server_ms, 50):6.1f} ms   "
              f"p95 {pct(server_ms, 95):6.1f} ms   (decode + features + CNN, in the worker)")
        print(f"  client round trip            p50 {pct(client_ms, 50):6.1f} ms   "
              f"p95 {pct(client_ms, 95):6.1f} ms")

        with Gunicorn(env, root / "two.log", workers=2) as server:
            version = requests.get(f"{server.url}/api/v1/health", timeout=10).json()
            server.wait_workers(version["model_version"])  # both workers warm
            result = throughput(server.url, clip, args.clients, args.duration)
            summary = requests.get(f"{server.url}/api/v1/metrics", timeout=10).json()
        lat = summary["latency_ms"]["predict"]
        print(f"\n2 workers, {args.clients} concurrent clients, {args.duration:.0f} s:")
        print(f"  throughput {result['rps']:6.1f} requests/s  ({result['requests']} ok, "
              f"{result['failures']} failed)")
        print(f"  client latency p50 {result['p50']:6.1f} ms   p95 {result['p95']:6.1f} ms")
        print(f"  server-side (all workers, /api/v1/metrics) p50 {lat['p50']} ms   "
              f"p95 {lat['p95']} ms   p99 {lat['p99']} ms")
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end (other work on the machine "
              "skews these numbers)")


if __name__ == "__main__":
    main()
