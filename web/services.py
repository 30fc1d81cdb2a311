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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flask import current_app

from src.errors import one_line
from src.monitoring import Monitor
from src.settings import Settings

if TYPE_CHECKING:
    from src.prediction import LivePredictor, PointerState

log = logging.getLogger(__name__)

_predictors: dict[tuple[str, float, str], LivePredictorHolder] = {}
_predictors_lock = threading.Lock()


class LivePredictorHolder:
    """Creates the process's ``LivePredictor`` on first use and retries while no model loads."""

    def __init__(self, models_dir: Path, poll_s: float, precision: str = "auto"):
        self.models_dir = Path(models_dir)
        self.poll_s = poll_s
        self.precision = precision
        self._live: LivePredictor | None = None
        self._lock = threading.Lock()
        self._last_try = 0.0
        self.error: str | None = None
        #: set by the app (AppState): ``LivePredictor``'s ``on_change``, forwarded
        self.on_change: Callable[[str, PointerState], None] | None = None

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
            self._live = LivePredictor(self.models_dir, self.poll_s, watch=True,
                                       precision=self.precision, on_change=self._changed)
            self.error = None
            log.info("serving model %s from %s", self._live.current.version, self.models_dir)
        except Exception as exc:  # any failure to load means "not ready", never a crash
            self.error = one_line(exc)
            log.warning("no model to serve yet: %s", self.error)

    def _changed(self, version: str, pointer: PointerState) -> None:
        if self.on_change is not None:
            self.on_change(version, pointer)

    @property
    def current_version(self) -> str | None:
        """The loaded version, without loading or polling (for page chrome)."""
        return self._live.current.version if self._live is not None else None

    @property
    def loaded_at(self) -> float | None:
        return self._live.loaded_at if self._live is not None else None

    @property
    def pointer(self):
        """The loaded model's ``PointerState`` (is it the version the pointer names, and if
        not why), or None while no model is loaded (the model check says why)."""
        return self._live.pointer if self._live is not None else None

    def refresh(self) -> None:
        """After an activation through this process: swap now, not at the next poll."""
        if self._live is not None:
            self._live.refresh(background=False)
        else:
            self._last_try = 0.0
            self.get()


def predictor_holder(settings: Settings) -> LivePredictorHolder:
    key = (str(Path(settings.models_dir).resolve()), float(settings.model_poll_s),
           settings.inference_precision)
    with _predictors_lock:
        if key not in _predictors:
            _predictors[key] = LivePredictorHolder(Path(key[0]), key[1], key[2])
        return _predictors[key]


@dataclass
class AppState:
    """Hung on ``app.extensions["urbansound"]``: everything a view needs besides the request."""

    settings: Settings
    monitor: Monitor
    predictors: LivePredictorHolder
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        # the model gauges follow a swap or a pointer problem when the watcher sees it: a
        # worker that keep-alive connections never reach would otherwise go on reporting
        # what it saw at its last request
        self.predictors.on_change = self._report

    def _report(self, version: str | None, pointer: PointerState | None) -> None:
        self.monitor.set_served_version(version)
        self.monitor.set_pointer_state(pointer.state if pointer is not None else None)

    def predictor(self):
        predictor = self.predictors.get()  # None only while no model has ever loaded
        self._report(predictor.version if predictor is not None else None,
                     self.predictors.pointer)
        return predictor


def state() -> AppState:
    return current_app.extensions["urbansound"]


def configure_torch_threads(settings: Settings) -> None:
    """Apply ``URBANSOUND_TORCH_THREADS`` when set: under gunicorn the config's ``post_fork``
    sets it to this worker's share of the cores (``src/cpu.py``), since torch's default (all
    cores per process) oversubscribes as soon as there are two workers. Elsewhere (tests, a
    single process) torch keeps its default."""
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
        error = one_line(exc)[:300]
    with _probe_lock:
        _probe_cache[key] = (time.monotonic(), error)
    return error


def database_error(settings: Settings) -> str | None:
    from src import db

    return _cached_probe(f"db:{settings.db_url}", lambda: db.check_connection(settings.db_url))


def broker_error(settings: Settings) -> str | None:
    from src import jobs

    return _cached_probe(f"broker:{settings.celery_broker}",
                         lambda: jobs.check_broker(settings))


def reset_probe_cache() -> None:
    with _probe_lock:
        _probe_cache.clear()


# --------------------------------------------------------------------------- uploads

def list_uploads(limit: int = 50, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    from src import ingest
    from src.db import session_scope

    with session_scope(state().settings.db_url) as session:
        return ingest.list_uploads(session, limit, offset)


def get_upload(upload_id: int) -> dict[str, Any] | None:
    from src import ingest
    from src.db import session_scope

    with session_scope(state().settings.db_url) as session:
        return ingest.get_upload(session, upload_id)


def upload_stats() -> dict[str, Any]:
    from src import ingest
    from src.db import session_scope
    from src.registry import served_lineage

    settings = state().settings
    with session_scope(settings.db_url) as session:
        return ingest.upload_stats(session, served_lineage(settings.models_dir))




# --------------------------------------------------------------------------- analyses

#: The Celery task that analyses a long recording (``worker.tasks.analyze``); sent by name,
#: so the web package never imports the worker.
ANALYZE_TASK = "urbansound.analyze"


def queue_analysis(job_id: str, settings: Settings) -> None:
    """Send the analysis of job ``job_id`` to a worker (raises when the broker is down; the
    caller marks the job failed). Celery task id = ``analysis-<job id>``."""
    from .celery_app import QUEUE, sender_app

    sender_app(settings).send_task(ANALYZE_TASK, args=[job_id], task_id=f"analysis-{job_id}",
                                   queue=QUEUE)


def analysis_options(predictor: Any, params: dict[str, Any]):
    """The settings' analysis options with a request's ``window_s``, ``hop_s`` and
    ``min_confidence``, checked against the served model (``AnalysisError``, a 422, when it
    cannot use them)."""
    from src.analysis import Options

    options = Options.from_settings(window_s=params.get("window_s"),
                                    hop_s=params.get("hop_s"), config=predictor.config,
                                    min_confidence=params.get("min_confidence"))
    options.check(predictor.config)
    return options
