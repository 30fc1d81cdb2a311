"""Fixtures and helpers for the Celery worker tests (imported by ``test_worker.py``).

Everything is real: a fresh Postgres database, Redis db ``URBANSOUND_TEST_REDIS_DB`` (9,
flushed at the start), and a ``urbansound worker`` subprocess (Celery, prefork, two slots)
that sees the same ``URBANSOUND_*`` environment as the test process. Data are real
UrbanSound8K clips from ``../shared/us8k``, read in place (a small UrbanSound8K-layout folder of
symlinks is built under tmp): base training = the few clips of folds 4-9 plus 10 per class of
fold 1, fixed test set = 6 per class of fold 3, uploads = clips of fold 2. The base model is
small and trained here (see ``train_base``), so every retrain takes seconds.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from web_helpers import build_us8k, clip_path, pick, unavailable, us8k_rows

ROOT = Path(__file__).resolve().parents[2]
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_DB = int(os.environ.get("URBANSOUND_TEST_REDIS_DB", "9"))
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
# Batches of 8, no weight EMA and no augmentation: on ~150 clips, batches of 32 give too few
# optimiser steps, and an EMA (decay 0.995) of so few steps stays near the random start.
BASE_TRAIN: dict[str, Any] = {
    "epochs": 15, "patience": 15, "seed": 0, "widths": (8, 16, 32, 64), "batch_size": 8,
    "ema_decay": 0.0, "mixup_alpha": 0.0, "specaugment": False, "waveform_augment": False,
}
BASE_MIN_F1 = 0.4
BASE_FEATURES: dict[str, Any] = {"sample_rate": 16_000, "clip_seconds": 2.0, "fmax": 8_000.0}
APP_TABLES = ("clips", "upload_rejects", "uploads", "training_jobs", "model_versions")
WORKER_NODE = f"wtest@{socket.gethostname()}"

# Small and fast: one torch thread (the machine is shared), two gentle fine-tuning epochs,
# and a wide gate margin (0.2). The tests show the gate's mechanics: a sane candidate passes,
# a wrecked one (macro-F1 ~0.02) is refused; with 60 test clips and ~150 training clips a
# fine threshold would measure noise.
WORKER_ENV = {
    "URBANSOUND_RETRAIN_EPOCHS": "2",
    "URBANSOUND_RETRAIN_LR": "0.0001",
    "URBANSOUND_RETRAIN_BASE_CLIPS": "80",
    "URBANSOUND_GATE_MARGIN": "0.2",
    "URBANSOUND_TORCH_THREADS": "1",
    "URBANSOUND_JOB_HEARTBEAT_S": "1",
}


def require_redis() -> None:
    import redis

    try:
        redis.Redis(REDIS_HOST, REDIS_PORT, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        unavailable(f"Redis not reachable at {REDIS_HOST}:{REDIS_PORT} ({exc})")


def redis_client():
    import redis

    return redis.Redis(REDIS_HOST, REDIS_PORT, db=REDIS_DB, socket_connect_timeout=2)


# --------------------------------------------------------------------------- real clips

def upload_items(rows: list[dict[str, str]], label: str | None = None) -> list[tuple[str, Path]]:
    """(``"<label>/<file>"``, path) pairs, as a browser folder upload names them; ``label``
    overrides the true class (to build deliberately mislabelled uploads)."""
    return [(f"{label or r['class']}/{r['slice_file_name']}", clip_path(r)) for r in rows]


# --------------------------------------------------------------------------- the environment

@dataclass
class Stack:
    """Paths and URLs shared by the test process and the worker."""

    tmp: Path
    db_url: str
    env: dict[str, str]
    base_version: str = ""
    rows: list[dict[str, str]] = field(default_factory=list)

    @property
    def models_dir(self) -> Path:
        return self.tmp / "models"

    @property
    def base_models(self) -> Path:
        return self.tmp / "models-base"

    @property
    def state_dir(self) -> Path:
        return self.tmp / "state"

    def settings(self, **overrides: Any):
        """Fresh settings from the environment (the cached object is reset too)."""
        from src.settings import Settings, get_settings

        get_settings.cache_clear()
        return Settings(**overrides) if overrides else get_settings()

    def reset(self) -> None:
        """Empty tables, no uploads, the base model served again, an empty task queue."""
        from src import db

        with db.get_engine(self.db_url).begin() as conn:
            conn.exec_driver_sql(f"TRUNCATE {', '.join(APP_TABLES)} RESTART IDENTITY CASCADE")
        shutil.rmtree(self.state_dir / "uploads", ignore_errors=True)
        shutil.rmtree(self.models_dir, ignore_errors=True)
        shutil.copytree(self.base_models, self.models_dir)
        redis_client().flushdb()


def make_stack(tmp: Path, db_url: str, cache: Path | None = None) -> Stack:
    """Data folder, database schema, base model, and the environment for both processes."""
    from src import db

    rows = us8k_rows()
    test_rows = pick(rows, 3, 6)
    data_rows = [r for r in rows if int(r["fold"]) >= 4] + pick(rows, 1, 10) + test_rows
    data_dir = build_us8k(tmp / "data", data_rows)
    env = {
        "URBANSOUND_STATE_DIR": str(tmp / "state"),
        "URBANSOUND_DATA_DIR": str(data_dir),
        "URBANSOUND_MODELS_DIR": str(tmp / "models"),
        "URBANSOUND_DATABASE_URL": db_url,
        "URBANSOUND_BROKER_URL": REDIS_URL,
        "URBANSOUND_RESULT_BACKEND": REDIS_URL,
        **WORKER_ENV,
    }
    os.environ.update(env)
    stack = Stack(tmp, db_url, env, rows=rows)
    db.upgrade(db_url)
    # The base also trains on the test clips (as a "fold 10" copy): see train_base.
    base_data = build_us8k(tmp / "base-data", data_rows)
    add_fold_copy(base_data, test_rows, 10)
    stack.base_version = train_base(stack, base_data, cache)
    stack.reset()
    return stack


def add_fold_copy(root: Path, rows: list[dict[str, str]], fold: int) -> None:
    """List ``rows`` a second time as fold ``fold`` (symlinks to the same shared files)."""
    with open(root / "metadata" / "UrbanSound8K.csv", "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        for r in rows:
            writer.writerow(dict(r, fold=str(fold)))
            link = root / "audio" / f"fold{fold}" / r["slice_file_name"]
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(clip_path(r))


def _base_key(base_data: Path) -> str:
    """Inputs of the base model: the clips, the recipe and the code that trains it."""
    import hashlib

    h = hashlib.sha256(repr((BASE_TRAIN, BASE_FEATURES, BASE_MIN_F1)).encode())
    for name in ("model.py", "train.py", "preprocessing.py", "features.py"):
        h.update((ROOT / "src" / name).read_bytes())
    h.update((base_data / "metadata" / "UrbanSound8K.csv").read_bytes())
    return h.hexdigest()[:16]


def train_base(stack: Stack, base_data: Path, cache: Path | None = None) -> str:
    """The served model of these tests: clearly better than chance on the fixed test set,
    whatever the dynamics of training ~150 clips from scratch, so that the gate tests show
    mechanics, not luck. To be sure of that it has also trained on the test clips (it is
    evaluated on fold 3, and fold 3 is copied into its training data as fold 10), and seeds
    are tried until its test macro-F1 reaches ``BASE_MIN_F1``. Small and fast: a narrow CNN
    on 2-s clips at 16 kHz. Kept in pytest's cache between runs (keyed by its inputs)."""
    from src import registry
    from src.model import TrainConfig, load_checkpoint, save_checkpoint
    from src.preprocessing import FeatureConfig
    from src.train import set_threads, train

    cached = cache / f"base-{_base_key(base_data)}.pt" if cache else None
    if cached is None or not cached.is_file():
        settings = stack.settings()
        set_threads(2)
        scores = []
        for seed in range(3):
            result = train(base_data, {3}, TrainConfig(**{**BASE_TRAIN, "seed": seed}),
                           config=FeatureConfig(**BASE_FEATURES),
                           cache_dir=settings.cache_dir, version="base-1", progress=False)
            scores.append(round(result.test_metrics["macro_f1"], 3))
            if scores[-1] >= BASE_MIN_F1:
                break
        else:
            pytest.fail(f"the base model did not reach test macro-F1 {BASE_MIN_F1} with three "
                        f"seeds ({scores}): the ML core's training changed", pytrace=False)
        cached = save_checkpoint(result.checkpoint, cached or stack.tmp / "base-1.pt")
    assert load_checkpoint(cached)["metrics"]["test_folds"] == [3]
    registry.publish(cached, "base-1", models_dir=stack.base_models)
    registry.activate("base-1", models_dir=stack.base_models)
    return "base-1"


# --------------------------------------------------------------------------- the worker

class Worker:
    """``urbansound worker`` as a subprocess in its own process group (so ``kill -9`` takes
    the Celery main process and its pool child together, like a lost machine)."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.proc: subprocess.Popen | None = None
        self.log = stack.tmp / "worker.log"
        self.starts = 0
        self.cwd = ROOT

    def start(self, timeout: float = 90) -> None:
        env = {**os.environ, **self.stack.env, "PYTHONUNBUFFERED": "1"}
        env.pop("URBANSOUND_DEBUG", None)
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "src.cli", "worker", "--hostname", WORKER_NODE],
                cwd=self.cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            if " ready." in self.text(offset):
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout} s:\n{self.tail()}")

    def text(self, offset: int = 0) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # warm shutdown
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def stack(request, tmp_path_factory, pg_database_factory) -> Iterator[Stack]:
    require_redis()
    saved = dict(os.environ)
    tmp = tmp_path_factory.mktemp("worker")
    pytest_cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    cache = pytest_cache.mkdir("urbansound-worker-base") if pytest_cache else None
    try:
        yield make_stack(tmp, pg_database_factory(), cache)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        from src.settings import get_settings

        get_settings.cache_clear()


@pytest.fixture(scope="module")
def worker(stack: Stack) -> Iterator[Worker]:
    w = Worker(stack)
    w.start()
    yield w
    w.stop()


@pytest.fixture()
def clean(stack: Stack) -> Stack:
    """Each test starts from the base model, no uploads, no jobs; the env is restored."""
    stack.reset()
    os.environ.update(stack.env)
    stack.settings()
    return stack


def job_row(db_url: str, job_id: str) -> dict[str, Any]:
    """The raw row, read without the stale-job sweep that ``jobs.get_job`` applies."""
    from src import db

    with db.get_engine(db_url).connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM training_jobs WHERE id = :id"),
                           {"id": job_id}).mappings().one()
        return dict(row)


def version_row(db_url: str, version: str) -> dict[str, Any] | None:
    from src import db

    with db.get_engine(db_url).connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM model_versions WHERE version = :v"),
                           {"v": version}).mappings().first()
        return dict(row) if row else None


def model_files(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.glob("*.pt"))
