"""gunicorn settings for ``urbansound serve`` (``deploy/gunicorn.conf.py``, when present, is
used instead and can ``from web.gunicorn_conf import *`` to keep these hooks).

Why these choices:

* ``gthread`` workers with a few threads: predictions are CPU-bound but short (torch releases
  the GIL inside the model), while uploads and job polls mostly wait on I/O; threads keep a slow
  upload from blocking a worker. Each worker holds one model copy, so workers ≈ cores.
* No ``preload_app``: each worker loads torch and the model after the fork. Forking a process
  that has started OpenMP/oneDNN threads can deadlock, and a copy-on-write model is soon
  copied anyway.
* Prometheus multiprocess hooks: the master wipes the metrics folder when it starts (a previous
  run's counters must not leak in) and tells the collector when a worker dies (its live
  gauges go away; its counters stay, so totals never go backwards).
* ``post_worker_init`` loads the model and runs two dummy predictions, so the first real
  request of a worker is not the slow one.
"""

from __future__ import annotations

import os

bind = os.environ.get("URBANSOUND_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("URBANSOUND_WEB_WORKERS", "2"))
worker_class = "gthread"
threads = int(os.environ.get("URBANSOUND_WEB_THREADS", "4"))
timeout = 120  # a bulk upload of many clips is checked inside the request
graceful_timeout = 20
keepalive = 5
accesslog = os.environ.get("URBANSOUND_ACCESS_LOG", "-") or None
errorlog = "-"
loglevel = os.environ.get("URBANSOUND_LOG_LEVEL", "info")
wsgi_app = "web:create_app()"
proc_name = "urbansound-web"
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
# gunicorn >= 24 opens a control socket at one fixed path per user: several servers on one
# machine (the stack's replicas, tests) would fight over it, and nothing here uses it.
control_socket_disable = True


def on_starting(server) -> None:
    from src.monitoring import ENV, reset_directory

    path = os.environ.get(ENV)
    if path:
        reset_directory(path)


def child_exit(server, worker) -> None:
    from src.monitoring import ENV, mark_process_dead

    if os.environ.get(ENV):
        mark_process_dead(worker.pid)


def post_worker_init(worker) -> None:
    import numpy as np

    app = getattr(worker, "wsgi", None)
    state = getattr(app, "extensions", {}).get("urbansound") if app is not None else None
    if state is None:
        return
    predictor = state.predictor()
    if predictor is None:
        worker.log.warning("no model to serve yet: %s", state.predictors.error)
        return
    silence = np.zeros((1, predictor.config.n_samples), dtype=np.float32)
    for _ in range(2):
        predictor.probabilities(silence)
    worker.log.info("worker %s serves model %s", worker.pid, predictor.version)
