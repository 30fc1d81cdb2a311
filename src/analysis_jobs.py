"""Analysis jobs: a recording too long to analyse inside an HTTP request, analysed by a worker
and polled like a retrain (``GET /api/v1/analyses/<id>``).

Why files and not the ``training_jobs`` table: that table's one-active-job index *is* the
"one retrain at a time" rule, and analyses must neither wait for a retrain nor block one. A job
needs its recording on disk anyway (a 200 MB upload does not travel through the broker), so
its state lives beside it, under ``state_dir/analyses/<id>/`` (shared by web and worker, as
uploads are)::

    audio        the recording, as uploaded
    state.json   status (queued → running → succeeded | failed), progress, timestamps, error
    result.json  the analysis (``Analysis.to_dict(envelope=True)``) once it succeeded

Every file is replaced atomically (``files.replace_atomically``): a poller never reads half a
state. A worker claims a job by creating ``claimed`` with ``O_EXCL``, so a redelivered message
(``acks_late``) never analyses twice. A job whose worker went silent (no heartbeat within
``job_stale_after_s``) or that no worker took (``job_queue_timeout_s``) is reported failed, as
retrain jobs are. Jobs older than ``analysis_keep_s`` are deleted when a new one is created.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from .errors import UserError, one_line
from .files import replace_atomically, tmp_name
from .settings import Settings, get_settings

_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
ACTIVE = ("queued", "running")
PROGRESS_EVERY_S = 1.0


class AnalysisJobNotFound(UserError):
    code, status = "not_found", 404


def _root(settings: Settings) -> Path:
    return settings.state_dir / "analyses"


def job_dir(job_id: str, settings: Settings | None = None) -> Path:
    """The job's folder; an id that cannot be one of ours is a 404, never a path."""
    if not _ID.match(job_id or ""):
        raise AnalysisJobNotFound(f"No analysis {job_id!r}.")
    return _root(settings or get_settings()) / job_id


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    replace_atomically(folder / "state.json", json.dumps(state).encode())


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return None


def create(recording: IO[bytes] | Path, name: str | None, params: dict[str, Any],
           settings: Settings | None = None, keep_audio: bool = False) -> dict[str, Any]:
    """Store the recording and a queued state; returns the job. ``recording`` is copied (a
    file object from its current position) or, for a path, moved into the job's folder.
    ``keep_audio``: keep the recording after the analysis (the page plays stretches of it);
    otherwise only the result stays (an API client has its own copy)."""
    settings = settings or get_settings()
    sweep(settings)
    job_id = secrets.token_urlsafe(16)
    folder = _root(settings) / job_id
    folder.mkdir(parents=True)
    target = folder / "audio"
    if isinstance(recording, Path):
        shutil.move(recording, target)
    else:
        tmp = tmp_name(target)
        with open(tmp, "wb") as out:
            shutil.copyfileobj(recording, out, 1 << 20)
        os.replace(tmp, target)
    state = {"id": job_id, "status": "queued", "file": name, "params": params,
             "requested_at": _now(), "requested_ts": time.time(), "started_at": None,
             "finished_at": None, "heartbeat_ts": None, "progress": {}, "error": None,
             "keep_audio": keep_audio}
    _write_state(folder, state)
    return public(state)


def fail(job_id: str, reason: str, settings: Settings | None = None) -> dict[str, Any]:
    """Mark a job failed (the broker refused it, no worker took it in time, its worker went
    silent or hit an error). Failed is final: the claim is taken too, so a message delivered
    late never runs a job its poller was already told had failed."""
    folder = job_dir(job_id, settings)
    os.close(os.open(folder / "claimed", os.O_CREAT | os.O_WRONLY))
    state = _read_json(folder / "state.json") or {"id": job_id}
    state.update(status="failed", error=reason, finished_at=_now())
    _write_state(folder, state)
    return public(state)


def _stale(state: dict[str, Any], settings: Settings) -> str | None:
    now = time.time()
    if state.get("status") == "running":
        beat = state.get("heartbeat_ts") or state.get("requested_ts") or now
        if now - beat > settings.job_stale_after_s:
            return (f"The worker analysing this recording went silent {now - beat:.0f} s ago "
                    "(killed or crashed); send the recording again.")
    elif state.get("status") == "queued":
        age = now - (state.get("requested_ts") or now)
        if age > settings.job_queue_timeout_s:
            return (f"No worker picked this analysis up within {age:.0f} s. Is a worker "
                    "running (`urbansound worker`) against the same broker?")
    return None


def get(job_id: str, settings: Settings | None = None, result: bool = True) -> dict[str, Any]:
    """The job as pollers see it (``done`` says when to stop); with ``result``, the analysis
    once it succeeded. Raises ``AnalysisJobNotFound``."""
    settings = settings or get_settings()
    folder = job_dir(job_id, settings)
    state = _read_json(folder / "state.json")
    if state is None:
        raise AnalysisJobNotFound(f"No analysis {job_id!r} (or it expired).")
    reason = _stale(state, settings)
    if reason:
        state = fail(job_id, reason, settings)
    out = public(state)
    if result and out["status"] == "succeeded":
        out["result"] = _read_json(folder / "result.json")
    return out


def public(state: dict[str, Any]) -> dict[str, Any]:
    keep = ("id", "status", "file", "params", "requested_at", "started_at", "finished_at",
            "progress", "error")
    return {**{k: state.get(k) for k in keep}, "done": state.get("status") not in ACTIVE}


def audio_path(job_id: str, settings: Settings | None = None) -> Path:
    path = job_dir(job_id, settings) / "audio"
    if not path.is_file():
        raise AnalysisJobNotFound(f"No recording for analysis {job_id!r} (or it expired).")
    return path


def run(job_id: str, analyse: Callable[[Path, Callable[[float, float], None]], dict[str, Any]],
        settings: Settings | None = None) -> dict[str, Any]:
    """The worker's side: claim the job (once: a redelivery of a claimed job does nothing),
    run ``analyse(path, on_progress)``, record the result or the error."""
    settings = settings or get_settings()
    folder = job_dir(job_id, settings)
    try:
        os.close(os.open(folder / "claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return {**get(job_id, settings, result=False), "skipped": True}
    except FileNotFoundError:
        raise AnalysisJobNotFound(f"No analysis {job_id!r} (or it expired).") from None
    state = _read_json(folder / "state.json") or {"id": job_id}
    state.update(status="running", started_at=_now(), heartbeat_ts=time.time())
    _write_state(folder, state)
    last = 0.0

    def progress(done_s: float, total_s: float) -> None:
        nonlocal last
        if time.monotonic() - last >= PROGRESS_EVERY_S:
            last = time.monotonic()
            state.update(heartbeat_ts=time.time(),
                         progress={"done_s": round(done_s, 1), "total_s": round(total_s, 1)})
            _write_state(folder, state)

    try:
        result = analyse(folder / "audio", progress)
    except Exception as exc:  # the job's answer, not a crash: the poller reads why
        if not state.get("keep_audio"):
            (folder / "audio").unlink(missing_ok=True)
        return fail(job_id, one_line(exc), settings)
    replace_atomically(folder / "result.json", json.dumps(result).encode())
    duration = result.get("duration_s") or 0.0
    state.update(status="succeeded", finished_at=_now(), heartbeat_ts=time.time(),
                 progress={"done_s": duration, "total_s": duration})
    _write_state(folder, state)
    if not state.get("keep_audio"):
        (folder / "audio").unlink(missing_ok=True)
    return public(state)


def sweep(settings: Settings | None = None, now: float | None = None) -> list[str]:
    """Delete jobs (recording and result) older than ``analysis_keep_s``."""
    settings = settings or get_settings()
    root = _root(settings)
    if not root.is_dir():
        return []
    cutoff = (now or time.time()) - settings.analysis_keep_s
    removed = []
    for folder in root.iterdir():
        try:
            if folder.is_dir() and folder.stat().st_mtime < cutoff and \
                    (folder / "state.json").stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        except OSError:
            continue
    return removed
