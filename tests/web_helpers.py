"""Helpers shared by the tests (code, model, integration, browser): audio bytes and tones, a
small model registry, free ports, a real gunicorn, real clips. Plain functions, importable as
``web_helpers`` (``tests/`` is on ``sys.path`` because it holds the root ``conftest.py``); one
copy of each, so every test writes audio and picks ports the same way."""

from __future__ import annotations

import csv
import io
import os
import socket
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Self

import numpy as np
import pytest
import soundfile as sf

TOKEN = "test-token-0123456789"
US8K = Path(__file__).resolve().parents[1].parent / "shared" / "us8k"
PASSWORD = "test-admin-password"


def audio_bytes(y: np.ndarray, sr: int = 22050, subtype: str | None = "PCM_16",
                format: str = "WAV") -> bytes:
    """``y`` (floats in [-1, 1]; ``(frames,)`` or ``(frames, channels)``) encoded in memory,
    16-bit WAV unless ``subtype``/``format`` (soundfile's names) say otherwise."""
    buf = io.BytesIO()
    sf.write(buf, y, sr, format=format, subtype=subtype)
    return buf.getvalue()


def tone_samples(seconds: float = 1.0, freq: float = 440.0, sr: int = 22050, seed: int = 0,
                 channels: int | None = None) -> np.ndarray:
    """A noisy sine, float32: ``(frames,)``, or ``(frames, channels)`` when ``channels`` is
    given (the same signal in each)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    y = (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size))
    y = y.astype(np.float32)
    return y if channels is None else np.repeat(y[:, None], channels, axis=1)


def tone(seconds: float = 1.0, freq: float = 440.0, sr: int = 22050, seed: int = 0) -> bytes:
    """A noisy sine as WAV bytes: decodable, not silent, different bytes for each (freq, seed)."""
    return audio_bytes(tone_samples(seconds, freq, sr, seed), sr)


def build_registry(checkpoint: dict, root: Path) -> Path:
    """``root/models`` holding quick-1 (served), quick-2 (a candidate: same weights, new
    name), quick-bad (rejected by the gate) and broken (a corrupt file)."""
    from src import registry
    from src.model import save_checkpoint

    models = root / "models"
    base = dict(checkpoint, torch=str(checkpoint["torch"]))  # weights_only-safe
    for version, parent in (("quick-1", None), ("quick-2", "quick-1"), ("quick-bad", "quick-1")):
        tmp = save_checkpoint(dict(base, version=version, parent=parent), root / f"{version}.pt")
        registry.publish(tmp, version, models_dir=models)
    registry.activate("quick-1", models_dir=models)
    registry.reject("quick-bad", "quality gate: worse than quick-1", models_dir=models)
    (models / "broken.pt").write_bytes(b"not a checkpoint")
    return models


def app_env(state: Path, models: Path, data: Path, **extra: str) -> dict[str, str]:
    """The environment a test server (``Gunicorn``) runs the app with: its own state folder and
    SQLite database, the given registry and data, the test token, one torch thread."""
    return {
        "URBANSOUND_STATE_DIR": str(state), "URBANSOUND_MODELS_DIR": str(models),
        "URBANSOUND_DATA_DIR": str(data), "URBANSOUND_DATABASE_URL": "",
        "URBANSOUND_BROKER_URL": "", "URBANSOUND_RESULT_BACKEND": "",
        "URBANSOUND_API_TOKEN": TOKEN, "URBANSOUND_TORCH_THREADS": "1",
        "URBANSOUND_MODEL_POLL_S": "0.5", "URBANSOUND_ACCESS_LOG": "", **extra,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClientThreads:
    """``clients`` threads each running ``client(k)`` until ``stop`` is set, as a context
    manager: the one shape of the load and fault tests' traffic, so both start, stop and join
    their clients the same way. ``lock`` guards what the clients record; ``started`` is when
    they began (``time.monotonic``); ``join_timeout_s`` bounds the wait for a client stuck in a
    request when the test ends."""

    join_timeout_s: float = 60

    def __init__(self, clients: int):
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.started = 0.0
        self.threads = [threading.Thread(target=self.client, args=(k,), daemon=True)
                        for k in range(clients)]

    def client(self, k: int) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.started = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=self.join_timeout_s)


def unavailable(reason: str) -> None:
    """Missing services or tools fail in CI (``CI`` set) and skip elsewhere, saying why."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must provide it)", pytrace=False)
    pytest.skip(f"{reason}; CI runs this test")


PG_ADMIN_URL = os.environ.get(
    "URBANSOUND_TEST_PG_ADMIN", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)


def pg_admin_engine():
    """An autocommit engine on the test Postgres server (it creates and drops databases), or
    ``unavailable`` saying why it cannot be reached."""
    import sqlalchemy as sa

    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT",
                              connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        engine.dispose()
        unavailable(f"Postgres at {engine.url.render_as_string(hide_password=True)} refused: "
                    f"{' '.join(str(exc.orig).split())[:300]}")
    return engine


# --------------------------------------------------------------------------- a real server

ROOT = Path(__file__).resolve().parents[1]


class Gunicorn:
    """``urbansound``'s web app under real gunicorn (the config ``urbansound serve`` uses), in
    its own process group, logging to a file; ``wait_ready`` polls ``/api/v1/ready``."""

    def __init__(self, env: dict[str, str], log: Path, workers: int = 2, port: int | None = None):
        self.env, self.log, self.workers = env, Path(log), workers
        self.port = port or free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300) -> Gunicorn:
        import subprocess
        import sys

        from src.cli.web import gunicorn_config

        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        # Its own metrics folder, always: the test process may have one in its environment
        # (set by an in-process app), and the master wipes the folder when it starts.
        env["PROMETHEUS_MULTIPROC_DIR"] = str(
            Path(env["URBANSOUND_STATE_DIR"]) / "prometheus" / f"web-{self.port}")
        Path(env["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn",
                 "--config", str(gunicorn_config()),
                 "--bind", f"127.0.0.1:{self.port}", "--workers", str(self.workers),
                 "web:create_app()"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 300) -> None:
        import time

        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/api/v1/ready", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"gunicorn not ready after {timeout} s:\n{self.tail()}")

    def wait_workers(self, version: str, timeout: float = 300) -> None:
        """Until every worker has loaded ``version`` (the model-served gauge, all workers)."""
        import time

        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = requests.get(f"{self.url}/metrics", timeout=5).text
            if f'urbansound_model_served{{version="{version}"}} {float(self.workers)}' in text:
                return
            time.sleep(0.5)
        raise RuntimeError(f"workers did not all load {version} within {timeout} s")

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> Gunicorn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- real clips

def us8k_rows() -> list[dict[str, str]]:
    meta = US8K / "metadata" / "UrbanSound8K.csv"
    if not meta.is_file():
        unavailable(f"the UrbanSound8K subset is not at {US8K}")
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if clip_path(r).is_file()]


def clip_path(row: dict[str, str]) -> Path:
    return US8K / "audio" / f"fold{row['fold']}" / row["slice_file_name"]


def pick(rows: list[dict[str, str]], fold: int, per_class: int, skip: int = 0) -> list[dict]:
    by_class: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["slice_file_name"]):
        if int(r["fold"]) == fold:
            by_class[r["class"]].append(r)
    return [r for c in sorted(by_class) for r in by_class[c][skip:skip + per_class]]


def build_us8k(dst: Path, rows: list[dict[str, str]]) -> Path:
    """UrbanSound8K layout, symlinks to the shared clips (nothing copied)."""
    (dst / "metadata").mkdir(parents=True)
    with open(dst / "metadata" / "UrbanSound8K.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow(r)
            link = dst / "audio" / f"fold{r['fold']}" / r["slice_file_name"]
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(clip_path(r))
    return dst
