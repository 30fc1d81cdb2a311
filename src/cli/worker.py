"""``urbansound worker`` (a Celery worker) and ``urbansound retrain [--wait]`` (queue a job).

``retrain`` exit codes: 0 when the job was queued (without ``--wait``) or ended ``succeeded``
(new version served) or ``rejected`` (the quality gate kept the served model: the system did
its job); 1 when it ``failed``, could not be queued or the wait timed out. Scripts that must
know whether a new model is served read ``status`` from ``--json``.
"""

from __future__ import annotations

import getpass
import os
import sys
from typing import Any

import typer

from .common import connect_broker, fail, friendly_errors, print_json

CELERY_APP = "worker.make_celery"


def register(app: typer.Typer) -> None:
    """Attach this module's commands to the root app."""
    app.command("worker")(worker)
    app.command("retrain")(retrain)


@friendly_errors
def worker(
    concurrency: int = typer.Option(
        2, min=1, help="Jobs this worker runs at once. Retrains stay one at a time whatever "
        "this says (the database allows one active retrain); the second slot is there so the "
        "analysis of a long recording does not wait behind a retrain that takes minutes."),
    loglevel: str = typer.Option("info", help="Celery log level."),
    hostname: str = typer.Option(None, "--hostname", "-n",
                                 help="Node name (default celery@<host>); keep it stable "
                                 "across restarts so orphaned jobs are recovered at once."),
) -> None:
    """Start a Celery worker for retraining and analysis jobs (Ctrl-C stops it after the
    current jobs).

    Runs ``celery -A worker.make_celery worker``; Flower watches the same broker with
    ``celery -A worker.make_celery flower --port=5555``.
    """
    argv = [sys.executable, "-m", "celery", "-A", CELERY_APP, "worker",
            f"--concurrency={concurrency}", f"--loglevel={loglevel}", "--pool=prefork"]
    if hostname:
        argv.append(f"--hostname={hostname}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)  # signals (Ctrl-C, SIGTERM) go straight to Celery


@friendly_errors
def retrain(
    wait: bool = typer.Option(False, "--wait", help="Follow the job until it ends."),
    json: bool = typer.Option(False, "--json", help="Print the job as one JSON object."),
    epochs: int = typer.Option(None, min=1, help="Fine-tuning epochs (default: setting)."),
    lr: float = typer.Option(None, help="Peak learning rate (default: setting)."),
    timeout: float = typer.Option(0, min=0, help="With --wait: give up after this many "
                                  "seconds (0 = no limit); the job goes on."),
) -> None:
    """Queue a retrain on the accepted, not yet used uploads (or show the one in progress)."""
    from .. import jobs

    connect_broker()
    job, created = jobs.request_retrain(f"cli:{_user()}", {"epochs": epochs, "lr": lr})
    say = _stderr if json else typer.echo
    say(f"{'queued' if created else 'already ' + job['status']}: job {job['id']}")
    if wait:
        try:
            job = jobs.wait_for_job(job["id"], timeout_s=timeout or None,
                                    on_update=lambda j: say(describe(j)))
        except TimeoutError as exc:
            fail(str(exc))
    if json:
        print_json(job)
        if job["status"] == "failed":
            raise typer.Exit(1)
    elif job["status"] == "failed":
        fail(job["error"] or job["message"] or "the retrain failed")
    elif job["done"]:
        typer.echo(job["message"] or job["status"])


def describe(job: dict[str, Any]) -> str:
    """One progress line: ``running: epoch 3/8  loss 1.234  val F1 0.456``."""
    p = job.get("progress") or {}
    parts = [job["status"]]
    if p.get("stage") and p.get("stage") != "training":
        parts.append(str(p["stage"]))
    if p.get("epoch"):
        parts.append(f"epoch {p['epoch']}/{p.get('epochs', '?')}")
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.3f}")
    if p.get("val_f1") is not None:
        parts.append(f"val F1 {p['val_f1']:.3f}")
    return "  ".join(parts)


def _stderr(text: str) -> None:
    typer.echo(text, err=True)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
