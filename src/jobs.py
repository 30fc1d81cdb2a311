"""Retraining jobs: request one, run one, follow one. The service behind ``POST /retrain``,
``urbansound retrain`` and the Celery task; it knows nothing of Flask or Celery.

Life of a job (a row of ``training_jobs``)::

    queued ──(worker claims it)──> running ──> succeeded   new version promoted and served
                                          ├──> rejected    the quality gate kept the old model
                                          └──> failed      an error, a time limit, a dead worker

* **One at a time.** ``request_retrain`` returns the queued/running job when there is one. The
  database settles races between web replicas: a partial unique index allows one active row
  (``get_or_create_job``), on Postgres and on SQLite alike.
* **Idempotent by job id.** The worker claims a job with one conditional UPDATE
  (queued → running); a redelivered message for a finished or running job does nothing, so
  ``acks_late`` redelivery can never train (or promote) twice.
* **A dead worker never blocks retraining.** A running job has a heartbeat (a thread touches
  the row every ``job_heartbeat_s``). Jobs whose worker restarted (``recover_orphaned_jobs``,
  called when a worker starts), whose worker process is gone, or whose heartbeat is older
  than ``job_stale_after_s`` are marked failed; so are queued jobs no worker picked up within
  ``job_queue_timeout_s``. The served model is only ever changed by the registry's atomic
  pointer swap at the very end, so a job that dies at any earlier point changes nothing.
* **Nothing half-written.** The candidate is published (file + ``candidate`` row) only after a
  database round trip that proves the job is still ours; the pointer swap, the job's outcome
  and the uploads it consumed are then recorded in one transaction.
* **Broker down.** Sending the task is the last step of ``request_retrain``; if it fails, the
  job is marked failed (so it blocks nothing) and ``BrokerUnavailable`` says what to fix.
  Accepted uploads are untouched: they wait for the next job.

Data for a retrain (``src.retrain_data``): the unused accepted uploads merged with the base
training data, graded on the base model's fixed test set (its test folds, ``data/test``, or
with no data set a held-out slice of the uploads), so the gate compares the candidate and the
served model on exactly the same clips.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import CursorResult

from .db import (
    ACTIVE_JOB_STATUSES,
    DatabaseUnavailable,
    JobStatus,
    TrainingJob,
    session_scope,
    utcnow,
)
from .errors import Unavailable, UserError, one_line
from .settings import Settings, get_settings
from .testset import RetrainError, recorded_scores, spec_of

if TYPE_CHECKING:
    from .datasets import Clip

log = logging.getLogger(__name__)

Sender = Callable[[str], object]  # queues job <id>; raises when the broker is unreachable
BrokerCheck = Callable[[Settings], None]  # raises unless the broker answers
ProgressCallback = Callable[[dict[str, Any]], None]

PARAM_LIMITS: dict[str, tuple[type, float, float]] = {
    "epochs": (int, 1, 200),
    "lr": (float, 1e-6, 1.0),
}
# how a running job names its process: "<celery node> (pid <pid> on <host>)"
_WORKER_PID = re.compile(r"^(?P<node>.*) \(pid (?P<pid>\d+) on (?P<host>[^)]*)\)$")


class BrokerUnavailable(Unavailable):
    """The job could not be queued (Redis or the embedded broker is unreachable); ``job`` is
    the job it was recorded as (failed, so it blocks nothing), when there is one."""

    code = "broker_unavailable"

    def __init__(self, message: str, job: dict[str, Any] | None = None):
        extra: dict[str, Any] = {"job": job} if job else {}
        super().__init__(message, **extra)
        self.job = job


class JobParamsError(UserError, ValueError):
    """Bad retrain parameters (unknown name, wrong type, out of range)."""

    code, status = "invalid_params", 422


class RetrainNotReady(UserError):
    """A retrain asked for while it could only fail (nothing new to learn, no test set):
    refused before any job exists, with what is missing and the command that fixes it."""

    code, status = "not_ready", 409

    def __init__(self, message: str, plan: dict[str, Any]):
        super().__init__(message, plan=plan)
        self.plan = plan


# --------------------------------------------------------------------------- settings

def validate_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """Only ``epochs`` and ``lr`` may be overridden per job; anything else is refused."""
    clean: dict[str, Any] = {}
    for key, value in (params or {}).items():
        if value is None:
            continue
        if key not in PARAM_LIMITS:
            raise JobParamsError(
                f"Unknown retrain parameter {key!r}; allowed: {', '.join(PARAM_LIMITS)}.")
        kind, low, high = PARAM_LIMITS[key]
        wanted = (f"Retrain parameter {key} must be {'a whole' if kind is int else 'a'} number "
                  f"from {low:g} to {high:g}, not {value!r}.")
        try:
            number = kind(value)
            if isinstance(value, bool) or (kind is int and number != float(value)):
                raise ValueError
        except (TypeError, ValueError):
            raise JobParamsError(wanted) from None
        if not low <= number <= high:
            raise JobParamsError(wanted)
        clean[key] = number
    return clean


# --------------------------------------------------------------------------- the active job

def active_job(session: Any) -> TrainingJob | None:
    job: TrainingJob | None = session.scalars(
        sa.select(TrainingJob).where(TrainingJob.status.in_(ACTIVE_JOB_STATUSES))
    ).first()
    return job


def get_or_create_job(
    session: Any, params: dict[str, Any] | None = None, requested_by: str = ""
) -> tuple[TrainingJob, bool]:
    """The queued/running job if there is one, else a new queued job (committed).

    Returns ``(job, created)``. The unique index settles races between processes: the loser
    of a concurrent insert gets an IntegrityError, rolls back and returns the winner's job.
    """
    for _ in range(3):
        job = active_job(session)
        if job is not None:
            return job, False
        job = TrainingJob(params=params or {}, requested_by=requested_by)
        session.add(job)
        try:
            session.commit()
        except sa.exc.IntegrityError:
            session.rollback()  # another process won; its job is returned on the next turn
            continue
        return job, True
    raise RuntimeError("Could not create or find the active training job; retry.")


# --------------------------------------------------------------------------- reading jobs

def job_to_dict(job: TrainingJob) -> dict[str, Any]:
    """JSON-ready view of a job; ``done`` tells pollers when to stop."""
    def iso(value: datetime | None) -> str | None:
        return value.isoformat(timespec="seconds") if value else None

    end = job.finished_at or (utcnow() if job.started_at else None)
    promoted: dict[str, bool] = {JobStatus.succeeded: True, JobStatus.rejected: False}
    return {
        "id": job.id,
        "status": job.status,
        "done": job.status not in ACTIVE_JOB_STATUSES,
        "promoted": promoted.get(job.status),
        "requested_at": iso(job.requested_at),
        "requested_by": job.requested_by,
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "heartbeat_at": iso(job.heartbeat_at),
        "duration_s": round((end - job.started_at).total_seconds(), 1)
        if job.started_at and end else None,
        "worker": job.worker,
        "celery_task_id": job.celery_task_id,
        "params": dict(job.params or {}),
        "progress": dict(job.progress or {}),
        "base_version": job.base_version,
        "result_version": job.result_version,
        "metrics": job.metrics,
        "n_new_clips": job.n_new_clips,
        "message": job.message,
        "error": job.error,
    }


def get_job(job_id: str, settings: Settings | None = None) -> dict[str, Any] | None:
    """The job, or None. A stale active job is marked failed first, so a poller following a
    job whose worker died sees it end instead of waiting forever."""
    settings = settings or get_settings()
    with session_scope(settings.db_url) as s:
        job = s.get(TrainingJob, str(job_id))
        if job is None:
            return None
        if job.status in ACTIVE_JOB_STATUSES and _stale_reason(job, settings):
            sweep_stale_jobs(s, settings)
            s.refresh(job)
        return job_to_dict(job)


def list_jobs(limit: int = 20, settings: Settings | None = None) -> list[dict[str, Any]]:
    """Newest first."""
    settings = settings or get_settings()
    with session_scope(settings.db_url) as s:
        rows = s.scalars(sa.select(TrainingJob).order_by(TrainingJob.requested_at.desc())
                         .limit(max(1, int(limit))))
        return [job_to_dict(j) for j in rows]


def wait_for_job(
    job_id: str, timeout_s: float | None = None, poll_s: float = 1.0,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Poll until the job is done; ``on_update`` sees each new progress state. Raises
    ``TimeoutError`` after ``timeout_s`` (the job goes on) and ``KeyError`` if it vanished."""
    deadline = time.monotonic() + timeout_s if timeout_s else None
    last: tuple[Any, ...] | None = None
    while True:
        job = get_job(job_id, settings)
        if job is None:
            raise KeyError(f"No retrain job {job_id}.")
        state = (job["status"], job["progress"].get("stage"), job["progress"].get("epoch"))
        if on_update and state != last:
            on_update(job)
        last = state
        if job["done"]:
            return job
        if deadline and time.monotonic() > deadline:
            raise TimeoutError(f"Job {job_id} is still {job['status']} after {timeout_s:.0f} s.")
        time.sleep(poll_s)


# --------------------------------------------------------------------------- stale jobs

def _age_s(when: datetime | None) -> float | None:
    return None if when is None else (utcnow() - when).total_seconds()


def _stale_reason(job: TrainingJob, settings: Settings) -> str | None:
    if job.status == JobStatus.running:
        age = _age_s(job.heartbeat_at or job.started_at)
        limit = settings.job_stale_after_s
        if age is not None and age > limit:
            return (f"The worker running this job ({job.worker or 'unknown'}) stopped sending "
                    f"heartbeats {age:.0f} s ago: it was killed or crashed mid-job. The served "
                    "model was not changed; request a new retrain.")
    elif job.status == JobStatus.queued:
        age = _age_s(job.requested_at)
        limit = settings.job_queue_timeout_s
        if age is not None and age > limit:
            return (f"No worker picked this job up within {limit:.0f} s. Is a worker running "
                    "(`urbansound worker`) against the same broker? Request a new retrain.")
    return None


def sweep_stale_jobs(session: Any, settings: Settings | None = None) -> list[str]:
    """Fail active jobs whose worker is gone (see ``_stale_reason``); flushes, caller commits."""
    settings = settings or get_settings()
    failed = []
    query = sa.select(TrainingJob).where(TrainingJob.status.in_(ACTIVE_JOB_STATUSES))
    for job in session.scalars(query):
        reason = _stale_reason(job, settings)
        if reason:
            _mark_failed(job, reason)
            failed.append(job.id)
            log.warning("retrain job %s marked failed: %s", job.id, reason)
    session.flush()
    return failed


def recover_orphaned_jobs(worker: str, settings: Settings | None = None) -> list[str]:
    """Run when a worker starts: any job this worker node was running died with its previous
    incarnation (a starting worker runs nothing yet), so it is marked failed now rather than
    after the heartbeat timeout. Jobs of other, live workers are left alone."""
    settings = settings or get_settings()
    failed = []
    with session_scope(settings.db_url) as s:
        running = s.scalars(sa.select(TrainingJob).where(TrainingJob.status == JobStatus.running))
        for job in running:
            if _node_of(job.worker) == worker:
                _mark_failed(job, (
                    f"The worker {worker} restarted while running this job: it was killed or "
                    "crashed mid-job. The served model was not changed; request a new retrain."))
                failed.append(job.id)
        failed += sweep_stale_jobs(s, settings)
    for job_id in failed:
        log.warning("retrain job %s marked failed at the start of worker %s", job_id, worker)
    return failed


def _node_of(worker: str | None) -> str | None:
    match = _WORKER_PID.match(worker or "")
    return match.group("node") if match else worker


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mark_failed(job: TrainingJob, reason: str) -> None:
    job.status = JobStatus.failed
    job.finished_at = utcnow()
    job.error = reason
    job.message = f"Failed: {reason}"


# --------------------------------------------------------------------------- requesting

# How a job reaches a worker is the adapter's business: the process that starts (the web app
# factory, the ``urbansound retrain`` command) installs a sender and a broker check; the core
# never imports Celery. ``set_sender`` lets a test stand in for the broker.
_installed: tuple[Sender, BrokerCheck] | None = None
_sender: Sender | None = None


def install(send: Sender, broker_check: BrokerCheck) -> None:
    """How this process queues a job and probes the broker (called once at start-up)."""
    global _installed
    _installed = (send, broker_check)


def set_sender(send: Sender | None) -> None:
    """Queue jobs with ``send`` instead (tests); None restores the installed sender."""
    global _sender
    _sender = send


def _installed_or_fail() -> tuple[Sender, BrokerCheck]:
    if _installed is None:
        raise BrokerUnavailable(
            "No task broker is configured in this process: it was started without the web "
            "app or the `urbansound retrain` command, which connect it.")
    return _installed


def _broker_name(settings: Settings) -> str:
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", settings.celery_broker)


def check_broker(settings: Settings | None = None) -> None:
    """Readiness probe: raises ``BrokerUnavailable`` unless the task broker answers within a
    few seconds (no message is sent)."""
    settings = settings or get_settings()
    try:
        _installed_or_fail()[1](settings)
    except BrokerUnavailable:
        raise
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise BrokerUnavailable(
            f"The task broker at {_broker_name(settings)} is unreachable ({reason}); "
            "retraining cannot be queued until it is back.") from exc


def retrain_plan(settings: Settings | None = None) -> dict[str, Any]:
    """What a retrain would use now, or what is missing (see ``retrain_data.plan``)."""
    from .retrain_data import plan

    return plan(settings or get_settings())


def request_retrain(
    requested_by: str = "", params: dict[str, Any] | None = None, *,
    send: Sender | None = None, settings: Settings | None = None,
) -> tuple[dict[str, Any], bool]:
    """Queue a retrain, or return the one already queued/running: ``(job, created)``.

    Raises ``RetrainNotReady`` when no job is active and a new one could only fail (nothing
    new to learn, no test set: the plan says what to do), ``JobParamsError`` for bad
    ``params`` (``epochs``, ``lr``), ``DatabaseUnavailable``
    when the database is down (nothing written, nothing sent) and ``BrokerUnavailable`` when
    the task cannot be queued (the job is then recorded as failed so it blocks nothing).
    """
    settings = settings or get_settings()
    clean = validate_params(params)
    with session_scope(settings.db_url) as s:
        sweep_stale_jobs(s, settings)
        idle = active_job(s) is None
    if idle:
        plan = retrain_plan(settings)
        if not plan["ready"]:
            raise RetrainNotReady(plan["summary"] + " " + " ".join(
                f"To fix: {m['fix']}." for m in plan["missing"]), plan)
    with session_scope(settings.db_url) as s:
        job, created = get_or_create_job(s, clean, (requested_by or "")[:200])
        if created:  # the Celery task id is the job id: set it before anything can run
            job.celery_task_id = job.id
        data = job_to_dict(job)
    if not created:
        return data, False
    try:
        (send or _sender or _installed_or_fail()[0])(job.id)
    except Exception as exc:  # any failure to queue means the job cannot run
        reason = " ".join(str(exc).split()) or type(exc).__name__
        message = (f"Could not queue the retrain job: the task broker at {_broker_name(settings)}"
                   f" is unreachable ({reason}). Start Redis (or the configured broker) and "
                   "try again; accepted uploads are kept.")
        data = _fail_unqueued(job.id, message, settings) or data
        raise BrokerUnavailable(message, data) from exc
    log.info("queued retrain job %s (requested by %s)", job.id, requested_by or "-")
    return data, True


def _fail_unqueued(job_id: str, message: str, settings: Settings) -> dict[str, Any] | None:
    try:
        with session_scope(settings.db_url) as s:
            job = s.get(TrainingJob, job_id)
            if job is not None and job.status == JobStatus.queued:
                _mark_failed(job, message)
            return job_to_dict(job) if job is not None else None
    except DatabaseUnavailable:  # the queued row then times out via job_queue_timeout_s
        log.exception("could not mark unqueued job %s failed", job_id)
        return None


# --------------------------------------------------------------------------- running

def run_retrain(
    job_id: str, on_progress: ProgressCallback | None = None, *, worker: str = "",
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Run job ``job_id`` to its end and return it (``status`` succeeded/rejected/failed).

    Safe to call again with the same id: a finished job, or one running in a live process, is
    returned untouched with ``skipped`` saying why. ``worker`` names the Celery node (for the
    restart recovery); ``on_progress`` receives each progress dict (the task forwards it to
    Celery's task state). Raises only if the outcome cannot be recorded (database down).
    """
    settings = settings or get_settings()
    host = socket.gethostname()
    me = f"{worker or host} (pid {os.getpid()} on {host})"
    skipped: dict[str, Any] | None = _db_retry(_claim, job_id, me, settings, attempts=3)
    if skipped is not None:
        return skipped
    log.info("retrain job %s started on %s", job_id, me)
    heartbeat = _Heartbeat(job_id, settings)
    heartbeat.start()
    try:
        _execute(job_id, me, on_progress, settings)
    except BaseException as exc:
        reason = _failure_reason(exc, settings)
        log.error("retrain job %s failed: %s", job_id, reason, exc_info=not _expected(exc))
        if not _record_failure(job_id, me, reason, settings) or not isinstance(exc, Exception):
            raise
    finally:
        heartbeat.stop()
    return get_job(job_id, settings) or {"id": job_id}


def _claim(job_id: str, me: str, settings: Settings) -> dict[str, Any] | None:
    """queued → running in one conditional UPDATE; None if claimed, else why not (a dict)."""
    now = utcnow()
    with session_scope(settings.db_url) as s:
        claimed = cast(CursorResult[Any], s.execute(
            sa.update(TrainingJob)
            .where(TrainingJob.id == job_id, TrainingJob.status == JobStatus.queued)
            .values(status=JobStatus.running, started_at=now, heartbeat_at=now, worker=me,
                    progress={"stage": "starting"})
        )).rowcount
        if claimed == 1:
            return None
        job = s.get(TrainingJob, job_id)
        if job is None:
            return {"id": job_id, "status": None, "skipped": "no such job"}
        if job.status == JobStatus.running and job.worker == me:
            _mark_failed(job, (
                "An earlier attempt of this job in this worker process ended without recording "
                "its outcome (the database was unreachable at the end?). The served model was "
                "not changed; request a new retrain."))
            why = "an earlier attempt in this process ended unrecorded; job marked failed"
        elif job.status == JobStatus.running and _orphaned(job, settings):
            _mark_failed(job, (
                f"The worker process running this job ({job.worker}) died mid-job (killed or "
                "out of memory); its task was redelivered, but a crashed job is not retried "
                "automatically. The served model was not changed; request a new retrain."))
            why = "the previous attempt died; job marked failed"
        elif job.status == JobStatus.running:
            why = f"already running on {job.worker}"
        else:
            why = f"already {job.status}"
        log.warning("retrain job %s not run: %s", job_id, why)
        return {**job_to_dict(job), "skipped": why}


def _orphaned(job: TrainingJob, settings: Settings) -> bool:
    """A redelivered running job is dead if its heartbeat is stale, or if it ran on this host
    in a process that no longer exists (a pool child killed by the OOM killer)."""
    if _stale_reason(job, settings):
        return True
    match = _WORKER_PID.match(job.worker or "")
    if match is None or match.group("host") != socket.gethostname():
        return False
    return not _pid_alive(int(match.group("pid")))


class _Heartbeat:
    """Touches ``heartbeat_at`` from a thread, so a long epoch is not mistaken for death."""

    def __init__(self, job_id: str, settings: Settings):
        self.job_id, self.url = job_id, settings.db_url
        self.interval = settings.job_heartbeat_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id[:8]}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with session_scope(self.url) as s:
                    s.execute(sa.update(TrainingJob)
                              .where(TrainingJob.id == self.job_id,
                                     TrainingJob.status == JobStatus.running)
                              .values(heartbeat_at=utcnow()))
            except Exception as exc:  # a missed beat is not fatal
                log.warning("heartbeat of job %s failed: %s", self.job_id, exc)


def _report(job_id: str, progress: dict[str, Any], on_progress: ProgressCallback | None,
            settings: Settings) -> None:
    """Progress goes to the job row and to ``on_progress``; neither failing stops training
    (a database blip mid-job is survivable: the outcome is written at the end)."""
    try:
        with session_scope(settings.db_url) as s:
            s.execute(sa.update(TrainingJob)
                      .where(TrainingJob.id == job_id, TrainingJob.status == JobStatus.running)
                      .values(progress=progress, heartbeat_at=utcnow()))
    except Exception as exc:
        log.warning("could not record progress of job %s: %s", job_id, exc)
    if on_progress is not None:
        try:
            on_progress(dict(progress, job_id=job_id))
        except Exception as exc:
            log.warning("progress callback of job %s failed: %s", job_id, exc)


def _update(job_id: str, settings: Settings, **values: Any) -> None:
    with session_scope(settings.db_url) as s:
        s.execute(sa.update(TrainingJob).where(TrainingJob.id == job_id).values(**values))


def _failure_reason(exc: BaseException, settings: Settings) -> str:
    name = type(exc).__name__
    if name == "SoftTimeLimitExceeded":  # Celery's, matched by name: src does not import it
        return (f"The retrain exceeded its time limit ({settings.retrain_soft_limit_s} s, "
                "URBANSOUND_RETRAIN_SOFT_LIMIT_S) and was stopped; the served model was not "
                "changed. Lower retrain_base_clips/epochs or raise the limit.")
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        return "The worker was shut down mid-job; the served model was not changed."
    message = one_line(exc)
    if _expected(exc):
        return message
    return f"{name}: {message}" if message != name else name


def _expected(exc: BaseException) -> bool:
    """Failures that explain themselves (every ``UserError``: ours, the registry's, the
    checkpoint loader's, an outage); anything else is a bug, logged with its traceback."""
    return isinstance(exc, UserError)


def _record_failure(job_id: str, me: str, reason: str, settings: Settings) -> bool:
    """Mark our job failed; False if the database cannot be reached (the stale sweep will)."""
    try:
        with session_scope(settings.db_url) as s:
            job = s.get(TrainingJob, job_id)
            if job is not None and job.status == JobStatus.running and job.worker == me:
                _mark_failed(job, reason)
        return True
    except Exception:
        log.exception("could not record the failure of job %s", job_id)
        return False


def _execute(job_id: str, me: str, on_progress: ProgressCallback | None,
             settings: Settings) -> None:
    """The retrain proper; every early exit raises, and nothing is served until the end."""
    from . import registry, retrain_data
    from .model import load_checkpoint, save_checkpoint
    from .train import retrain

    with session_scope(settings.db_url) as s:
        params = dict(s.get_one(TrainingJob, job_id).params or {})
    epochs = int(params.get("epochs") or settings.retrain_epochs)
    lr = float(params.get("lr") or settings.retrain_lr)
    _report(job_id, {"stage": "loading data", "epoch": 0, "epochs": epochs}, on_progress, settings)

    base_version, base_path = registry.current(settings.models_dir)
    base = load_checkpoint(base_path)
    data = retrain_data.prepare(base, settings)
    _update(job_id, settings, base_version=base_version, n_new_clips=len(data.new))

    _report(job_id, {"stage": "evaluating the served model", "epoch": 0, "epochs": epochs},
            on_progress, settings)
    served = evaluate_checkpoint(base, data.test.clips, settings.cache_dir)

    curve = TrainingCurve(epochs)

    def on_epoch(record: dict[str, Any]) -> None:
        _report(job_id, {"stage": "training", **curve.add(record)}, on_progress, settings)

    version = registry.new_version_name()
    result = retrain(base, data.new, data.base, data.test.clips, version, epochs=epochs, lr=lr,
                     cache_dir=settings.cache_dir, on_epoch=on_epoch, carried_spec=data.spec,
                     test_how=data.test.description,
                     learn_without_forgetting=data.test.kind == "uploads")
    _report(job_id, {"stage": "publishing", **curve.finish()}, on_progress, settings)
    tmp = save_checkpoint(result.checkpoint, settings.state_dir / "tmp" / f"{version}.pt")
    try:
        _db_retry(_publish, job_id, me, tmp, version, settings)
    finally:
        tmp.unlink(missing_ok=True)
    extra = {"test": data.test.description, "test_kind": data.test.kind,
             "n_test": len(data.test.clips), "n_train_base": len(data.base),
             "n_new": len(data.new), "n_left_out": data.dropped,
             "epochs_run": len(result.history), "epochs": epochs, "lr": lr,
             "stopped_early": curve.stopped_early}
    recorded = recorded_scores(base)
    if data.test.kind == "uploads" and recorded:
        extra["served_recorded"] = recorded | {
            "test": spec_of(base).get("description") or "its own test set"}
    _db_retry(_decide, job_id, me, version, base_version, result.test_metrics, served,
              data.new_ids, extra, settings)


class TrainingCurve:
    """The per-epoch progress a job page draws live: loss and validation F1 of every epoch so
    far, an ETA from the mean epoch time, and whether early stopping ended the run."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.history: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> dict[str, Any]:
        point = _epoch_progress(record)
        self.history.append({k: point.get(k) for k in ("epoch", "loss", "val_f1", "seconds")})
        seconds = [h["seconds"] for h in self.history if h.get("seconds") is not None]
        left = self.epochs - int(point.get("epoch") or len(self.history))
        eta = round(sum(seconds) / len(seconds) * left, 1) if seconds else None
        return {**point, "epochs": self.epochs, "history": list(self.history), "eta_s": eta,
                "stopped_early": False, "stop_reason": None}

    @property
    def stopped_early(self) -> bool:
        return 0 < len(self.history) < self.epochs

    def finish(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        reason = None
        if self.stopped_early:
            scores = [h["val_f1"] if h.get("val_f1") is not None else -(h.get("loss") or 0)
                      for h in self.history]
            best = scores.index(max(scores)) + 1
            reason = (f"Early stopping ended training after epoch {len(self.history)} of "
                      f"{self.epochs}: no gain in validation since epoch {best}, whose "
                      "weights were kept.")
        return {**last, "epoch": len(self.history), "epochs": self.epochs,
                "history": list(self.history), "eta_s": 0.0,
                "stopped_early": self.stopped_early, "stop_reason": reason}


def _db_retry(fn: Callable[..., Any], *args: Any, attempts: int = 4) -> Any:
    """Run a unit of work again after a short wait if the database was unreachable: after a
    long training, a database restart of a few seconds must not throw the result away. Each
    unit starts with a read, so a failed attempt has written nothing."""
    for attempt in range(attempts):
        try:
            return fn(*args)
        except DatabaseUnavailable as exc:
            if attempt == attempts - 1:
                raise
            log.warning("database unavailable (%s); retrying in %d s", exc.message, 2**attempt)
            time.sleep(2**attempt)
    raise AssertionError("unreachable")


def _publish(job_id: str, me: str, tmp: Path, version: str, settings: Settings) -> None:
    """Copy the candidate into the registry (file + ``candidate`` row), if the job is still
    ours: the round trip comes first, so a down database stops us before any file is written.
    Publishing the same bytes twice is a no-op, so a retry is harmless."""
    from . import registry

    with session_scope(settings.db_url) as s:
        _still_ours(s, job_id, me)
        registry.publish(tmp, version, models_dir=settings.models_dir, session=s,
                         job_id=job_id)


def _epoch_progress(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("epoch", "epochs", "loss", "val_f1", "val_accuracy", "val_loss", "seconds")
    return {k: (round(v, 5) if isinstance(v, float) else v) for k in keys
            if (v := record.get(k)) is not None}


def _still_ours(session: Any, job_id: str, me: str) -> TrainingJob:
    job: TrainingJob | None = session.get(TrainingJob, job_id, with_for_update=True)
    if job is None or job.status != JobStatus.running or job.worker != me:
        raise RetrainError(
            f"Job {job_id} was {'deleted' if job is None else 'marked ' + job.status} while it "
            "trained (its heartbeat was taken for dead?); the candidate was discarded.")
    return job


def _decide(job_id: str, me: str, version: str, base_version: str, cand: dict[str, Any],
            served: dict[str, Any], clip_ids: list[int], extra: dict[str, Any],
            settings: Settings) -> None:
    """The quality gate, then one transaction: pointer swap or rejection marker, job outcome,
    uploads marked with the job that used them."""
    from . import registry
    from .ingest import mark_used

    margin = float(settings.gate_margin)
    c_f1, s_f1 = float(cand["macro_f1"]), float(served["macro_f1"])
    scores = (f"macro-F1 {c_f1:.4f} (accuracy {cand['accuracy']:.3f}) vs {s_f1:.4f} (accuracy "
              f"{served['accuracy']:.3f}) for the served {base_version}, on the test set "
              f"{extra['test']} (n={cand['n']}); gate: candidate >= served - {margin:g}")
    recorded = extra.get("served_recorded")
    if recorded and recorded.get("macro_f1") is not None:
        by = "" if recorded.get("version") == base_version else \
            f", measured on {recorded.get('version')}, its ancestor"
        scores += (f"; the served line's recorded macro-F1 on {recorded['test']} is "
                   f"{recorded['macro_f1']:.3f}{by} (not re-checked here: install the data set "
                   "to gate on it)")
    if extra.get("n_left_out"):
        scores += f"; {extra['n_left_out']} upload(s) of the test set were left out of training"
    promote = c_f1 >= s_f1 - margin
    with session_scope(settings.db_url) as s:
        job = _still_ours(s, job_id, me)
        now_served = registry.current(settings.models_dir)[0]
        if promote and now_served not in (base_version, version):  # (version: a retry)
            promote = False
            scores += (f"; but the served model changed to {now_served} during the job, so the "
                       "comparison no longer holds")
        if promote:
            registry.activate(version, models_dir=settings.models_dir, session=s)
            job.status, job.message = JobStatus.succeeded, f"Promoted {version}: {scores}."
        else:
            registry.reject(version, f"quality gate: {scores}", models_dir=settings.models_dir,
                            session=s)
            job.status = JobStatus.rejected
            job.message = f"Rejected {version}; {base_version} stays served: {scores}."
        mark_used(s, clip_ids, job_id)
        job.result_version = version
        job.finished_at = utcnow()
        job.metrics = {"candidate": _summary(cand), "served": _summary(served),
                       "gate_margin": margin, "promoted": promote, **extra}
        job.progress = dict(job.progress or {}, stage="done")
    log.info("retrain job %s: %s", job_id, job.message)


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("n", "accuracy", "macro_f1", "loss", "precision", "recall")
    return {k: metrics[k] for k in keys if k in metrics}


# --------------------------------------------------------------------------- data

def evaluate_checkpoint(ckpt: dict[str, Any], clips: list[Clip], cache_dir: Path | None
                        ) -> dict[str, Any]:
    """Metrics of a checkpoint on ``clips``: the served side of the gate."""
    from .model import build_model, evaluate_model
    from .train import Split, set_threads

    set_threads()
    model = build_model(ckpt)
    split = Split.load(clips, model.config, cache_dir, progress=False)
    if not len(split.clips):
        raise RetrainError("None of the test clips could be decoded; the gate cannot run.")
    return evaluate_model(model, split.x, split.y, tuple(ckpt["classes"]))


__all__ = [
    "BrokerUnavailable",
    "JobParamsError",
    "RetrainError",
    "RetrainNotReady",
    "active_job",
    "check_broker",
    "evaluate_checkpoint",
    "get_job",
    "get_or_create_job",
    "install",
    "job_to_dict",
    "list_jobs",
    "recover_orphaned_jobs",
    "request_retrain",
    "retrain_plan",
    "run_retrain",
    "set_sender",
    "sweep_stale_jobs",
    "validate_params",
    "wait_for_job",
]
