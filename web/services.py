"""What the views need from the core, wrapped once: the served model, readiness probes, upload
records and retraining jobs. The views stay about HTTP; this module stays about the system.

One ``LivePredictor`` per process (per models folder): gunicorn workers each load the model
after they fork, and every request in a worker shares it. It is created lazily so that an app
without any model yet still starts (``/api/v1/ready`` says why it is not ready, predictions
answer 503), and it keeps trying every ``model_poll_s`` until a model appears.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import current_app

from src.monitoring import Monitor
from src.settings import Settings

log = logging.getLogger(__name__)

_predictors: dict[tuple[str, float], LivePredictorHolder] = {}
_predictors_lock = threading.Lock()


class LivePredictorHolder:
    """Creates the process's ``LivePredictor`` on first use and retries while no model loads."""

    def __init__(self, models_dir: Path, poll_s: float):
        self.models_dir = Path(models_dir)
        self.poll_s = poll_s
        self._live = None
        self._lock = threading.Lock()
        self._last_try = 0.0
        self.error: str | None = None

    def get(self):
        """The ``Predictor`` serving right now, or None (``self.error`` says why)."""
        live = self._live
        if live is not None:
            return live.get()
        now = time.monotonic()
        with self._lock:
            if self._live is None and now - self._last_try >= self.poll_s:
                self._last_try = now
                self._create()
        return self._live.get() if self._live is not None else None

    def _create(self) -> None:
        from src.prediction import LivePredictor

        try:
            self._live = LivePredictor(self.models_dir, self.poll_s)
            self.error = None
            log.info("serving model %s from %s", self._live.current.version, self.models_dir)
        except Exception as exc:  # any failure to load means "not ready", never a crash
            self.error = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            log.warning("no model to serve yet: %s", self.error)

    @property
    def current_version(self) -> str | None:
        """The loaded version, without loading or polling (for page chrome)."""
        return self._live.current.version if self._live is not None else None

    @property
    def loaded_at(self) -> float | None:
        return self._live.loaded_at if self._live is not None else None

    def refresh(self) -> None:
        """After an activation through this process: swap now, not at the next poll."""
        if self._live is not None:
            self._live.refresh(background=False)
        else:
            self._last_try = 0.0
            self.get()


def predictor_holder(settings: Settings) -> LivePredictorHolder:
    key = (str(Path(settings.models_dir).resolve()), float(settings.model_poll_s))
    with _predictors_lock:
        if key not in _predictors:
            _predictors[key] = LivePredictorHolder(Path(key[0]), key[1])
        return _predictors[key]


@dataclass
class AppState:
    """Hung on ``app.extensions["urbansound"]``: everything a view needs besides the request."""

    settings: Settings
    monitor: Monitor
    predictors: LivePredictorHolder
    started_at: float = field(default_factory=time.time)

    def predictor(self):
        predictor = self.predictors.get()
        if predictor is not None:
            self.monitor.set_served_version(predictor.version)
        return predictor


def state() -> AppState:
    return current_app.extensions["urbansound"]


def configure_torch_threads(settings: Settings) -> None:
    """One intra-op thread per worker unless told otherwise: with several gunicorn workers on a
    few cores, torch's default (all cores per process) oversubscribes and slows everyone."""
    import torch

    n = settings.torch_threads or int(os.environ.get("URBANSOUND_TORCH_THREADS", "0") or 0)
    if n:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------- readiness

_probe_cache: dict[str, tuple[float, str | None]] = {}
_probe_lock = threading.Lock()
PROBE_TTL_S = 2.0


def _cached_probe(key: str, check) -> str | None:
    """Readiness probes hit every few seconds from every balancer: answer from a 2-s cache so
    a probe storm cannot become a database or broker storm."""
    now = time.monotonic()
    with _probe_lock:
        hit = _probe_cache.get(key)
        if hit is not None and now - hit[0] < PROBE_TTL_S:
            return hit[1]
    try:
        check()
        error = None
    except Exception as exc:
        error = " ".join((getattr(exc, "message", None) or str(exc) or type(exc).__name__)
                         .split())[:300]
    with _probe_lock:
        _probe_cache[key] = (time.monotonic(), error)
    return error


def database_error(settings: Settings) -> str | None:
    from src import db

    return _cached_probe(f"db:{settings.db_url}", lambda: db.check_connection(settings.db_url))


def broker_error(settings: Settings) -> str | None:
    def check() -> None:
        try:
            from src import jobs
        except ImportError:
            jobs = None
        if jobs is not None and hasattr(jobs, "check_broker"):
            jobs.check_broker(settings)
            return
        from kombu import Connection

        with Connection(settings.celery_broker, connect_timeout=2,
                        transport_options={"max_retries": 0}) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    return _cached_probe(f"broker:{settings.celery_broker}", check)


def reset_probe_cache() -> None:
    with _probe_lock:
        _probe_cache.clear()


# --------------------------------------------------------------------------- uploads

def _iso(value: Any) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def upload_summary(row: Any) -> dict[str, Any]:
    return {"id": row.id, "created_at": _iso(row.created_at), "source": row.source,
            "client": row.client, "n_files": row.n_files, "n_accepted": row.n_accepted,
            "n_rejected": row.n_rejected}


def list_uploads(limit: int = 50, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    import sqlalchemy as sa

    from src.db import Upload, session_scope

    with session_scope(state().settings.db_url) as session:
        total = session.scalar(sa.select(sa.func.count()).select_from(Upload)) or 0
        rows = session.scalars(sa.select(Upload).order_by(Upload.id.desc())
                               .limit(limit).offset(offset)).all()
        return [upload_summary(r) for r in rows], total


def get_upload(upload_id: int) -> dict[str, Any] | None:
    from src.db import Upload, session_scope

    with session_scope(state().settings.db_url) as session:
        row = session.get(Upload, upload_id)
        if row is None:
            return None
        out = upload_summary(row)
        out["accepted"] = [
            {"clip_id": c.id, "name": c.original_name, "label": c.label, "sha256": c.sha256,
             "duration_s": c.duration_s, "sample_rate": c.sample_rate, "channels": c.channels,
             "size_bytes": c.size_bytes, "used_in_job_id": c.used_in_job_id}
            for c in sorted(row.clips, key=lambda c: c.id)]
        out["rejected"] = [
            {"name": r.original_name, "code": r.reason_code, "message": r.message}
            for r in sorted(row.rejects, key=lambda r: r.id)]
        return out


def upload_stats() -> dict[str, Any]:
    from src import ingest
    from src.db import session_scope

    with session_scope(state().settings.db_url) as session:
        return ingest.upload_stats(session)


# --------------------------------------------------------------------------- jobs

def jobs_module():
    """``src.jobs`` (the Celery engineer's service layer); 503 if it is not installed."""
    try:
        from src import jobs
    except ImportError as exc:
        from .errors import api_error

        raise api_error(503, "jobs_unavailable",
                        f"Retraining is not available in this build ({exc}).") from None
    return jobs
