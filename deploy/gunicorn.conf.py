"""The gunicorn settings, the only ones: ``urbansound serve`` and ``urbansound up`` use this
file, and so do the Docker image, ``urbansound stack up`` and the tests.

Every value can be overridden from the environment (``URBANSOUND_WEB_*``) or, as usual, on the
gunicorn command line (``urbansound serve --workers N`` passes ``--workers``, which wins).

Why these choices, for a CPU-bound model on a few cores:

* **Processes x torch threads = cores.** Each worker process holds one copy of the model and
  runs it with ``URBANSOUND_TORCH_THREADS`` intra-op threads; ``post_fork`` sets that (and
  ``OMP_NUM_THREADS``) to ``cores // workers`` before the worker imports torch, unless the
  operator set it. torch's default (every core in every process) oversubscribes the CPU as
  soon as there are two workers: each forward pass then fights the others for the same cores
  and p95 latency doubles. The cores are counted by ``src/cpu.py`` (the project's one CPU
  policy): ``URBANSOUND_CPU_CORES`` when set (a container's CPU limit, or a replica's share
  when several replicas share one machine), else the cores this process may run on.
* **gthread workers, a few threads each.** Predictions spend most of their time in torch and
  the audio decoder, which release the GIL, while uploads and job polls mostly wait on I/O. A
  few threads let one worker overlap them and keep a slow upload from blocking predictions.
  More threads than that only queue CPU work inside the process, where nothing can steal it.
* **No preload_app.** Each worker loads torch and the model after the fork: forking a process
  that has started OpenMP/oneDNN thread pools can deadlock, and a copy-on-write model would be
  copied soon anyway. ``post_worker_init`` loads the model and runs two dummy predictions
  before the worker accepts its first request, so a worker's first real request is not the
  slow one.
* **Timeouts.** ``timeout`` (a worker silent that long is killed) is generous because a bulk
  upload is checked inside its request; nginx's ``proxy_read_timeout`` is a little longer, so
  gunicorn, not nginx, decides. ``keepalive`` is longer than nginx's upstream
  ``keepalive_timeout`` (60 s): the side that closes an idle kept-alive connection must be
  nginx, or nginx may send a request down a connection gunicorn just closed (a 502 that nginx
  cannot retry for a POST).
* **Graceful restarts.** ``max_requests`` (+ jitter, so the workers do not all restart at
  once) bounds slow leaks in native libraries; the worker finishes its requests first and
  ``graceful_timeout`` bounds how long that may take. SIGHUP reloads workers one by one.
* **Access log with latency.** One line per request with ``%(M)s`` (milliseconds) and the
  client address nginx forwarded, so slow requests are visible without a profiler.
* **Prometheus multiprocess mode.** The master wipes ``PROMETHEUS_MULTIPROC_DIR`` when it starts
  (a previous run's counters must not leak in) and marks dead workers (``child_exit``) so their
  live gauges disappear; their counters stay, so totals never go backwards.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the hooks import ``src`` and ``web`` from the checkout
    sys.path.insert(0, str(ROOT))

from src import cpu  # noqa: E402  (after the path fix above)
from src.settings import Settings, get_settings  # noqa: E402


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def available_cores() -> int:
    """Cores this server may use (``src/cpu.py``); the environment read afresh, not cached."""
    return cpu.usable_cores(Settings())


def torch_threads_for(workers: int, cores: int | None = None) -> int:
    """Intra-op threads per worker so that workers x threads = cores (at least one)."""
    return cpu.torch_threads(1, workers, cores or available_cores())


# --------------------------------------------------------------------------- server socket
bind = os.environ.get("URBANSOUND_BIND", "127.0.0.1:8000")
backlog = 256  # connections waiting for a worker; nginx retries elsewhere when this is full

# --------------------------------------------------------------------------- workers
workers = _env_int("URBANSOUND_WEB_WORKERS", min(available_cores(), 4))
# gthread (or sync) as subclasses whose own error answers (414 URL too long, 431 headers too
# large, 400 unparsable...) are the API's JSON envelope instead of gunicorn's HTML page
# (web/gunicorn_worker.py); any other class named here is used as it is.
_worker_class = os.environ.get("URBANSOUND_WEB_WORKER_CLASS", "gthread")
worker_class = {"gthread": "web.gunicorn_worker.ThreadWorker",
                "sync": "web.gunicorn_worker.SyncWorker"}.get(_worker_class, _worker_class)
threads = _env_int("URBANSOUND_WEB_THREADS", 4)
worker_connections = 1000
# The heartbeat file lives in RAM when it can: on a container's overlay file system a
# blocked disk write can make a healthy worker look dead.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
    else None
preload_app = False
wsgi_app = "web:create_app()"
proc_name = os.environ.get("URBANSOUND_PROC_NAME", "urbansound-web")

# --------------------------------------------------------------------------- timeouts
timeout = _env_int("URBANSOUND_WEB_TIMEOUT", 120)
graceful_timeout = _env_int("URBANSOUND_WEB_GRACEFUL_TIMEOUT", 30)
keepalive = _env_int("URBANSOUND_WEB_KEEPALIVE", 75)

# --------------------------------------------------------------------------- restarts
max_requests = _env_int("URBANSOUND_WEB_MAX_REQUESTS", 20000)
max_requests_jitter = _env_int("URBANSOUND_WEB_MAX_REQUESTS_JITTER", max_requests // 10)

# --------------------------------------------------------------------------- logging
accesslog = os.environ.get("URBANSOUND_ACCESS_LOG", "-") or None
access_log_format = ('%(h)s "%(r)s" %(s)s %(b)sB %(M)sms pid=%(p)s '
                     'fwd="%({x-forwarded-for}i)s" req=%({x-request-id}i)s "%(a)s"')
errorlog = "-"
loglevel = os.environ.get("URBANSOUND_LOG_LEVEL", "info")
capture_output = False

# --------------------------------------------------------------------------- proxying
# Trust X-Forwarded-* only from the proxy in front (nginx on this host, or the compose
# network when FORWARDED_ALLOW_IPS says so).
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
# Longer request lines get 414, bigger or more header fields 431 (as JSON, see above).
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
# gunicorn >= 24 opens a control socket at one fixed path per user: several servers on one
# machine (the stack's replicas, tests) would fight over it, and nothing here uses it.
control_socket_disable = True


# --------------------------------------------------------------------------- hooks

def on_starting(server) -> None:
    """Master, once: a clean Prometheus folder (a previous run's counters must not leak in)."""
    from src.monitoring import ENV, reset_directory

    path = os.environ.get(ENV)
    if path:
        reset_directory(path)
    server.log.info("urbansound: %d worker(s) x %d thread(s), %d torch thread(s) each, "
                    "%d core(s)", server.cfg.workers, server.cfg.threads,
                    _torch_threads(server.cfg.workers), available_cores())


def _torch_threads(workers: int) -> int:
    """The operator's ``URBANSOUND_TORCH_THREADS`` when set, else cores // workers."""
    return cpu.torch_threads(1, workers, settings=Settings())


def post_fork(server, worker) -> None:
    """Worker, before it imports torch: size its thread pools so workers x threads = cores."""
    n = str(_torch_threads(server.cfg.workers))
    os.environ["URBANSOUND_TORCH_THREADS"] = n
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, n)
    get_settings.cache_clear()  # the app's settings must see the value just set


def post_worker_init(worker) -> None:
    """Load the model and run two dummy predictions before the first request."""
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


def child_exit(server, worker) -> None:
    """Master: a worker died or was restarted; drop its live Prometheus gauges."""
    from src.monitoring import ENV, mark_process_dead

    if os.environ.get(ENV):
        mark_process_dead(worker.pid)


def worker_abort(worker) -> None:
    """A worker killed for silence (``timeout``): say so loudly, it means a stuck request."""
    worker.log.warning("worker %s aborted after %ss without a heartbeat", worker.pid, timeout)
