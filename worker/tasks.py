"""The tasks: thin adapters from a Celery message to ``src.jobs.run_retrain`` (retrain) and
``src.analysis_jobs.run`` (the analysis of a long recording).

All decisions (idempotency, the quality gate, the atomic swap, stale-job recovery) live in
``src.jobs`` and ``src.analysis_jobs`` so they are tested without Celery; this module adds only
what is Celery's: the time limits, task state for Flower/``AsyncResult`` and the worker-start
recovery hook. Analyses never touch the retrain table, so "one retrain at a time" is unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from celery.signals import worker_process_init, worker_ready

from src import jobs
from src.db import DatabaseUnavailable
from src.settings import get_settings
from web.celery_app import RETRAIN_TASK
from web.services import ANALYZE_TASK

log = logging.getLogger(__name__)
_settings = get_settings()
DB_RETRY_COUNTDOWN_S = 30  # a database restart; the job is claimed (or found dead) on retry
DB_MAX_RETRIES = 10


def _long_task(name: str) -> Any:
    """Retrain and analysis alike: acknowledged only once finished (a worker killed mid-job
    has its message redelivered, and the job's own record makes the rerun a no-op) and held
    to the same time limits."""
    return shared_task(bind=True, name=name, acks_late=True,
                       soft_time_limit=_settings.retrain_soft_limit_s,
                       time_limit=_settings.retrain_hard_limit_s)


class RetrainFailed(Exception):
    """Raised after the job row says ``failed``, so Celery (and Flower) agree: FAILURE."""


@_long_task(RETRAIN_TASK)
def retrain(self: Task, job_id: str) -> dict[str, Any]:
    """Run retrain job ``job_id``; redeliveries of a finished or running job are no-ops."""

    def progress(meta: dict[str, Any]) -> None:
        self.update_state(state="PROGRESS", meta=meta)

    try:
        job = jobs.run_retrain(job_id, on_progress=progress,
                               worker=self.request.hostname or "")
    except DatabaseUnavailable as exc:  # down before the outcome could be recorded: try later
        raise self.retry(exc=exc, countdown=DB_RETRY_COUNTDOWN_S,
                         max_retries=DB_MAX_RETRIES) from exc
    if job.get("status") == "failed" and not job.get("skipped"):
        raise RetrainFailed(job.get("error") or job.get("message") or "retrain failed")
    keys = ("id", "status", "message", "result_version", "base_version", "skipped")
    return {k: job.get(k) for k in keys}


_live: Any = None


def served_predictor() -> Any:
    """This worker process's ``LivePredictor``: created on first use, it follows the
    registry's pointer, so an analysis uses the version being served when it starts."""
    global _live
    settings = get_settings()
    if _live is None or _live.models_dir != settings.models_dir:
        from src.prediction import LivePredictor

        _live = LivePredictor(settings.models_dir, settings.model_poll_s)
    return _live.get()


@_long_task(ANALYZE_TASK)
def analyze(self: Task, job_id: str) -> dict[str, Any]:
    """Analyse the recording of analysis job ``job_id`` (a redelivery does nothing)."""
    from src import analysis, analysis_jobs

    params = analysis_jobs.get(job_id, result=False).get("params") or {}

    def work(path: Any, on_progress: Any) -> dict[str, Any]:
        predictor = served_predictor()
        options = analysis.Options.from_settings(
            window_s=params.get("window_s"), hop_s=params.get("hop_s"),
            config=predictor.config, min_confidence=params.get("min_confidence"))
        name = analysis_jobs.get(job_id, result=False).get("file")
        return analysis.analyse(path, predictor, options, on_progress,
                                name=name).to_dict(envelope=True)

    job = analysis_jobs.run(job_id, work)
    return {k: job.get(k) for k in ("id", "status", "error", "skipped")}


@worker_process_init.connect
def allow_child_processes(**_: Any) -> None:
    """Celery's prefork pool children are daemonic, and Python forbids daemonic processes to
    start processes; the ML core decodes clips with a process pool (``src.features``), which
    it joins before returning. Clearing the flag in the pool child is the usual remedy
    (celery#4525); a hard time limit or ``kill -9`` of the worker's group ends them all."""
    import multiprocessing

    multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]


@worker_ready.connect
def fail_jobs_of_previous_run(sender: Any = None, **_: Any) -> None:
    """A worker that starts runs nothing yet: jobs its node was running died with it."""
    hostname = getattr(sender, "hostname", None)
    if not hostname:
        return
    try:
        failed = jobs.recover_orphaned_jobs(hostname)
    except Exception:  # never stop a worker from starting because of this
        log.exception("could not check for retrain jobs orphaned by a previous run")
        return
    if failed:
        log.warning("marked %d orphaned retrain job(s) failed: %s", len(failed), failed)
