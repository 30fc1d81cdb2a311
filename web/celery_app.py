"""The app's side of Celery, wired the way Flask documents it (``celery_init_app``).

Flask's pattern (its ``examples/celery``): the app factory calls ``celery_init_app(app)``, which
builds a Celery app whose tasks run inside ``app.app_context()``, configured from
``app.config["CELERY"]`` (the dict ``celery_config(settings)`` returns) and stored in
``app.extensions["celery"]``; the worker's entry point builds the Flask app and takes that Celery
app (``worker/make_celery.py``: ``celery -A worker.make_celery worker``). So the dependency runs
one way, worker → web, as in Flask's example, and the web package never imports the worker.

Queuing a job needs no task code: ``send_retrain`` sends by task name. ``install()`` hands the
sender and the broker check to ``src.jobs`` when a process starts (the app factory, the
``urbansound retrain`` command), so the core never imports Celery. ``standalone_app()`` is the
same configuration without Flask, for processes that only read task results (tests, scripts).

Why each setting (the retrain task is long, rare and must never run twice at once):

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after the
  task ends, so a worker that dies mid-job does not silently lose it; the task itself is
  idempotent by job id (``src.jobs.run_retrain``), so a redelivery cannot train twice.
* ``worker_prefetch_multiplier = 1``: a worker busy with a 10-minute retrain must not hoard the
  next message.
* ``visibility_timeout`` above the hard time limit: Redis redelivers an unacknowledged message
  after the visibility timeout, *even while the first worker still runs it* (celery#5935). The
  default is one hour; a retrain allowed to run longer would be started a second time.
* Short connect timeouts and a small publish retry budget: when Redis is down, queuing a job
  fails in a few seconds with a clear error instead of hanging an HTTP request. The worker
  itself keeps retrying its broker connection (``broker_connection_retry_on_startup``).
* Task events on, so Flower (``celery -A worker.make_celery flower``) shows the jobs live.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING, Any

from celery import Celery, Task

from src.settings import Settings, get_settings

if TYPE_CHECKING:  # Flask is only needed by the web process, which already imported it
    from flask import Flask

RETRAIN_TASK = "urbansound.retrain"
QUEUE = "urbansound"
TASK_MODULES = ("worker.tasks",)
PUBLISH_TIMEOUT_S = 3.0  # connect timeout when queuing a job: "Redis down" must fail fast
VISIBILITY_SLACK_S = 600  # visibility timeout = hard time limit + this

_lock = threading.Lock()
_standalone: dict[tuple[str, str], Celery] = {}
_senders: dict[tuple[str, str], Celery] = {}


def celery_config(settings: Settings | None = None) -> dict[str, Any]:
    """``app.config["CELERY"]``: everything the web app, the worker and senders must agree on."""
    settings = settings or get_settings()
    connect_timeout = float(settings.broker_timeout_s)
    visibility = int(settings.retrain_hard_limit_s) + VISIBILITY_SLACK_S
    config: dict[str, Any] = {
        "broker_url": settings.celery_broker,
        "result_backend": settings.celery_backend,
        "task_default_queue": QUEUE,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_track_started": True,
        "result_extended": True,
        "result_expires": 7 * 24 * 3600,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": connect_timeout,
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1,
        },
    }
    # Transport options are handed to the transport as they are: the SQLAlchemy transport of
    # the embedded default passes them to create_engine(), which refuses Redis's.
    if _is_redis(settings.celery_broker):
        config["broker_transport_options"] = {
            "visibility_timeout": visibility,
            "socket_connect_timeout": connect_timeout,
        }
    if _is_redis(settings.celery_backend):
        config["redis_socket_connect_timeout"] = connect_timeout
        config["result_backend_transport_options"] = {
            "visibility_timeout": visibility,
            "retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.5,
                             "interval_max": 1, "timeout": connect_timeout},
        }
    return config


def _is_redis(url: str) -> bool:
    return url.split(":", 1)[0] in ("redis", "rediss", "sentinel")


def celery_init_app(app: Flask) -> Celery:
    """Flask's documented pattern; ``app.config["CELERY"]`` defaults to ``celery_config()``."""

    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    app.config.setdefault("CELERY", celery_config())
    celery_app = Celery(app.name, task_cls=FlaskTask, include=list(TASK_MODULES))
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


def standalone_app(settings: Settings | None = None) -> Celery:
    """A Celery app without Flask, for processes that only queue jobs; one per broker URL."""
    config = celery_config(settings)
    key = (config["broker_url"], config["result_backend"])
    with _lock:
        if key not in _standalone:
            celery_app = Celery("urbansound", include=list(TASK_MODULES))
            celery_app.config_from_object(config)
            _standalone[key] = celery_app
        return _standalone[key]


def sender_app(settings: Settings | None = None) -> Celery:
    """The app used to queue jobs: the web app's configuration (or the settings') *without* a
    result backend. Senders never wait on Celery results (progress and outcome live in the
    database), and the Redis result backend subscribes on every send: with Redis down that
    fails with a misleading "restart the application" error and can leave the web process's
    result consumer broken. The worker still stores results (Flower, ``AsyncResult``)."""
    config = celery_config(settings)
    config.pop("result_backend", None)
    key = (str(config["broker_url"]), repr(sorted(config.items(), key=lambda kv: kv[0])))
    with _lock:
        if key not in _senders:
            celery_app = Celery("urbansound-sender", set_as_current=False)
            celery_app.config_from_object(config)
            _senders[key] = celery_app
        return _senders[key]


def send_retrain(job_id: str, settings: Settings | None = None) -> str:
    """Queue the retrain task for ``job_id`` (Celery task id = job id: one name to look up in
    Flower, the logs and the database). Raises whatever the broker raised, after the short
    retry budget of ``task_publish_retry_policy``."""
    result = sender_app(settings).send_task(
        RETRAIN_TASK, args=[job_id], task_id=job_id, queue=QUEUE,
    )
    return str(result.id)


def ping_broker(settings: Settings | None = None) -> None:
    """Connect to the broker once, with the short publish timeout; raises if it cannot."""
    conf = sender_app(settings).conf
    with sender_app(settings).connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=conf.broker_connection_timeout)


def install() -> None:
    """Give ``src.jobs`` this process's way to queue a job and to probe the broker; both read
    the settings when called, so a process whose settings change never sends to a stale
    broker."""
    from src import jobs

    jobs.install(send_retrain, ping_broker)


def safe_url(url: str) -> str:
    """A broker URL fit for messages and logs: the password is replaced by ``***``."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)
