"""The production topology without Docker: N gunicorn replicas behind a local nginx, a Celery
worker and Flower, against the Postgres and Redis that ``URBANSOUND_DATABASE_URL`` and
``URBANSOUND_BROKER_URL`` name (``urbansound stack up|down|status``).

It is the same shape as ``docker-compose.yml`` (one nginx, ``web`` replicas, ``worker``,
``flower``, a one-shot migration first), built from plain processes so that machines without
a container engine (this project's CI among them) can run and load-test it:

* every process is started in its own session (process group) with its output in
  ``<state_dir>/stack/logs/<name>.log``, and recorded in ``<state_dir>/stack/stack.json``
  (pid + kernel start time, so ``down`` never signals a recycled pid) as soon as it exists,
  so a ``stack up`` that is interrupted half-way can still be stopped by ``stack down``;
* ``up`` returns once every part answers its health check (``/api/v1/health`` with the model
  loaded for each replica, nginx's ``/nginx-health`` and ``/api/v1/health`` through it, the
  worker's "ready" line, Flower's ``/healthcheck``), and stops what it started if one fails;
* ``down`` sends each process group its graceful stop signal (gunicorn: SIGTERM; nginx:
  SIGQUIT; Celery: SIGTERM = warm shutdown), waits, then SIGKILLs what is left, and checks that
  no process of any group survived.

CPU budget: replicas x workers x torch threads = cores (``src/cpu.py``). On
a 2-core machine 1 replica gets 2 workers, 2 replicas get 1 worker each, and 4 replicas run 4
single-threaded workers on 2 cores (oversubscribed on purpose: that is what the load test
measures). The Celery worker runs at a lower CPU priority (``nice`` 5, about a third of a web
worker's scheduler weight): a retrain slows predictions little, yet still progresses when the
replicas keep every core busy (at nice 10+ it can starve for minutes on a saturated box).

Nothing here imports torch, Flask or Celery: this module only starts and watches processes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import cpu, secret_policy
from .errors import UserError, one_line
from .settings import Settings, get_settings

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "nginx.conf.template"
STATIC_DIR = ROOT / "web" / "static"
STATE_FILE = "stack.json"
PLACEHOLDER = re.compile(r"\$\{(NGINX_[A-Z0-9_]+)\}")
DEFAULT_PORT = 8080
DEFAULT_FLOWER_PORT = 5555
WORKER_NICE = 5


class StackError(UserError):
    """A stack operation that cannot be done; ``message`` is one line saying why."""


@dataclass
class StackConfig:
    """What ``stack up`` starts. Ports of 0 mean "derive": replicas use port+1 ... port+N."""

    replicas: int = 2
    port: int = DEFAULT_PORT
    base_port: int = 0
    workers: int = 0  # gunicorn workers per replica; 0 = cores // replicas (at least 1)
    threads: int | None = None  # gthread threads per worker; None = deploy/gunicorn.conf.py
    worker: bool = True
    flower: bool = True
    flower_port: int = DEFAULT_FLOWER_PORT
    timeout_s: float = 180.0
    worker_nice: int = WORKER_NICE

    def replica_ports(self) -> list[int]:
        first = self.base_port or self.port + 1
        return [first + i for i in range(self.replicas)]


@dataclass
class Proc:
    """One started process group, as recorded in ``stack.json``."""

    name: str
    pid: int
    start_time: int
    argv: list[str]
    log: str
    stop_signal: int = int(signal.SIGTERM)
    port: int | None = None


@dataclass
class StackState:
    state_dir: str
    nginx_port: int
    replica_ports: list[int]
    flower_port: int | None
    started_at: float = field(default_factory=time.time)
    processes: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}"


# --------------------------------------------------------------------------- environment

def stack_dir(settings: Settings | None = None) -> Path:
    return (Path((settings or get_settings()).state_dir) / "stack").resolve()


def find_nginx() -> str:
    """The nginx binary: ``URBANSOUND_NGINX``, else ``nginx`` on PATH or in /usr/sbin."""
    explicit = os.environ.get("URBANSOUND_NGINX")
    candidates = [explicit] if explicit else [shutil.which("nginx"), "/usr/sbin/nginx"]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise StackError("nginx not found" + (f" at {explicit}" if explicit else "") +
                     ": install Debian's nginx (apt-get install nginx, or scripts/setup.sh "
                     "--dev) or set URBANSOUND_NGINX to its path.")


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port``. SO_REUSEADDR as gunicorn and nginx use it,
    so a socket in TIME_WAIT from a previous run does not count as taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_ports(named: dict[str, int]) -> None:
    seen: dict[int, str] = {}
    for name, port in named.items():
        if not 1 <= port <= 65535:
            raise StackError(f"{name} port {port} is outside 1-65535.")
        if port in seen:
            raise StackError(f"{name} and {seen[port]} would both use port {port}.")
        seen[port] = name
        if not port_free(port):
            raise StackError(f"port {port} ({name}) is already in use on 127.0.0.1: stop what "
                             "listens there or choose other ports (--port/--base-port/"
                             "--flower-port).")


def child_environment(settings: Settings) -> dict[str, str]:
    """What every child sees: the caller's environment with absolute state paths (children
    run in the repository root), and no inherited Prometheus folder (each replica gets its
    own: one shared folder would be wiped by every replica's master at start)."""
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        URBANSOUND_STATE_DIR=str(Path(settings.state_dir).resolve()),
        URBANSOUND_MODELS_DIR=str(Path(settings.models_dir).resolve()),
        URBANSOUND_DATA_DIR=str(Path(settings.data_dir).resolve()),
        PYTHONUNBUFFERED="1",
    )
    return env


# --------------------------------------------------------------------------- nginx config

def render_template(text: str, values: dict[str, str]) -> str:
    """Substitute ``${NGINX_*}`` placeholders (what the nginx image's envsubst step does with
    the same file); nginx's own ``$variables`` are left alone. Every placeholder must be given."""
    missing = sorted({m for m in PLACEHOLDER.findall(text) if m not in values})
    if missing:
        raise StackError(f"nginx template needs values for {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def upstream_servers(ports: list[int], host: str = "127.0.0.1") -> str:
    return "\n    ".join(f"server {host}:{p} max_fails=3 fail_timeout=10s;" for p in ports)


def _mime_types() -> str:
    for path in ("/etc/nginx/mime.types", "/usr/local/nginx/conf/mime.types"):
        if os.path.isfile(path):
            return f"include {path};"
    return ("types { text/html html; text/css css; application/javascript js; "
            "image/svg+xml svg; image/png png; application/json json; }")


def _user_directive() -> str:
    """As root, nginx would switch its workers to ``nobody``, who cannot enter a private
    state folder (pytest's tmp is 0700): run them as the invoking user, like every other
    process of the stack. As another user the directive is not needed (and not allowed)."""
    if os.geteuid() != 0:
        return ""
    name = pwd.getpwuid(os.geteuid()).pw_name
    return f"user {name};\n"


def write_nginx_config(prefix: Path, listen: str, ports: list[int],
                       worker_processes: int = 1, template: Path = TEMPLATE) -> Path:
    """Render the template into ``prefix`` and wrap it in a main configuration that keeps
    every file nginx writes (pid, logs, temporary bodies) under ``prefix``. Returns the main
    configuration's path (for ``nginx -p prefix -c path``)."""
    prefix = Path(prefix).resolve()
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    settings = get_settings()
    values = {
        "NGINX_LISTEN": listen,
        "NGINX_UPSTREAM_SERVERS": upstream_servers(ports),
        "NGINX_MAX_UPLOAD_MB": str(settings.max_upload_mb),
        "NGINX_MAX_BODY_MB": str(settings.max_body_mb),
        "NGINX_STATIC_ROOT": str(STATIC_DIR),
        "NGINX_ACCESS_LOG": "logs/access.log",
    }
    site = prefix / "urbansound.conf"
    site.write_text(render_template(template.read_text(), values))
    main = prefix / "nginx.conf"
    main.write_text(
        "# Generated by `urbansound stack up` (src/stack.py); edit deploy/nginx.conf.template.\n"
        f"{_user_directive()}"
        f"worker_processes {worker_processes};\n"
        "daemon off;\n"
        "pid nginx.pid;\n"
        "error_log logs/error.log warn;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"    {_mime_types()}\n"
        "    default_type application/octet-stream;\n"
        "    client_body_temp_path tmp/client_body;\n"
        "    proxy_temp_path tmp/proxy;\n"
        "    fastcgi_temp_path tmp/fastcgi;\n"
        "    uwsgi_temp_path tmp/uwsgi;\n"
        "    scgi_temp_path tmp/scgi;\n"
        f"    include {site};\n"
        "}\n")
    return main


def nginx_argv(nginx: str, prefix: Path, conf: Path) -> list[str]:
    # -e: the error log before the configuration is read (else the compiled-in
    # /var/log/nginx/error.log, which a normal user cannot open).
    return [nginx, "-p", f"{prefix}/", "-c", str(conf), "-e", "logs/error.log"]


def nginx_test(nginx: str, prefix: Path, conf: Path) -> None:
    """``nginx -t`` on the rendered configuration; raises with nginx's own complaint."""
    out = subprocess.run([*nginx_argv(nginx, prefix, conf), "-t", "-q"], capture_output=True,
                         text=True, timeout=30)
    if out.returncode != 0:
        lines = [ln for ln in (out.stderr + out.stdout).splitlines() if ln.strip()]
        raise StackError(f"nginx rejects the configuration: {lines[-1] if lines else '?'}")


# --------------------------------------------------------------------------- processes

def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name, or None if there is no process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rfind(")") + 2:].split()


def start_time(pid: int) -> int:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else 0  # field 22 of stat: start time in clock ticks


def alive(proc: Proc) -> bool:
    """The recorded process still runs (and is the same process: same start time; a zombie
    waiting for its parent to reap it does not count)."""
    fields = _proc_stat(proc.pid)
    if not fields:
        return False
    return fields[0] != "Z" and int(fields[19]) == proc.start_time


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


def _signal_group(proc: Proc, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _owned(proc: Proc) -> bool:
    """Ours to signal: the leader is the recorded process, or it exited but its group (which
    only our children can be in) still has members."""
    return alive(proc) or (_proc_stat(proc.pid) is None and bool(group_members(proc.pid)))


def stop_processes(procs: list[Proc], grace_s: float = 20.0,
                   say: Callable[[str], None] = lambda _m: None) -> list[str]:
    """Graceful stop signal to each group, SIGKILL after ``grace_s``; returns the names of
    groups that still had live members at the end (empty = clean)."""
    mine = [p for p in procs if _owned(p)]
    for p in mine:
        say(f"stopping {p.name} (pid {p.pid})")
        _signal_group(p, p.stop_signal)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(group_members(p.pid) for p in mine):
        time.sleep(0.1)
    for p in mine:
        if group_members(p.pid):
            say(f"{p.name} did not stop within {grace_s:g} s: SIGKILL")
            _signal_group(p, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(group_members(p.pid) for p in mine):
        time.sleep(0.1)
    return [p.name for p in mine if group_members(p.pid)]


def _spawn(name: str, argv: list[str], env: dict[str, str], logs: Path, *, port: int | None = None,
           stop_signal: int = signal.SIGTERM, nice: int = 0) -> Proc:
    log = logs / f"{name}.log"
    with open(log, "ab") as out:
        out.write(f"\n==> {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        popen = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
    return Proc(name=name, pid=popen.pid, start_time=start_time(popen.pid), argv=argv,
                log=str(log), stop_signal=int(stop_signal), port=port)


# --------------------------------------------------------------------------- state file

def load_state(settings: Settings | None = None) -> StackState | None:
    path = stack_dir(settings) / STATE_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StackError(f"{path} is unreadable ({exc}); remove it once the processes it "
                         "lists are stopped.") from None
    procs = [Proc(**p) for p in raw.pop("processes", [])]
    return StackState(**raw, processes=procs)


def save_state(state: StackState, settings: Settings | None = None) -> None:
    """Written after every start (atomically), so an interrupted ``up`` can be stopped."""
    path = stack_dir(settings) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    data = asdict(state)
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(settings: Settings) -> Iterator[None]:
    """One ``stack up``/``down`` at a time per state folder."""
    d = stack_dir(settings)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise StackError(f"another `urbansound stack` command is running on {d}") \
                    from None
            raise
        yield


# --------------------------------------------------------------------------- health

def http_get(url: str, timeout: float = 3.0) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers); status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers or {})
    except (OSError, urllib.error.URLError):
        return 0, b"", {}


def _replica_ok(port: int, need_model: bool) -> bool:
    status, body, _ = http_get(f"http://127.0.0.1:{port}/api/v1/health")
    if status != 200:
        return False
    if not need_model:
        return True
    try:
        return bool(json.loads(body).get("model_loaded"))
    except ValueError:
        return False


def _log_text(proc: Proc) -> str:
    try:
        return Path(proc.log).read_text(errors="replace")
    except OSError:
        return ""


def _last_line(proc: Proc) -> str:
    lines = [ln.strip() for ln in _log_text(proc).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _worker_ready(proc: Proc) -> bool:
    return " ready." in _log_text(proc).rsplit("==> ", 1)[-1]


def wait_until(checks: dict[str, Callable[[], bool]], procs: dict[str, Proc],
               deadline: float) -> None:
    """Poll until every check passes; raise (naming the part and its last log line) when one
    of the watched processes exits or the deadline passes."""
    pending = dict(checks)
    while pending:
        for name in list(pending):
            proc = procs.get(name)
            if proc is not None and not alive(proc):
                raise StackError(f"{name} exited during start-up: {_last_line(proc)} "
                                 f"(log: {proc.log})")
            if pending[name]():
                del pending[name]
        if not pending:
            return
        if time.monotonic() > deadline:
            name = sorted(pending)[0]
            where = f" (log: {procs[name].log}; last line: {_last_line(procs[name])})" \
                if name in procs else ""
            raise StackError(f"{', '.join(sorted(pending))} not healthy in time{where}")
        time.sleep(0.25)


# --------------------------------------------------------------------------- up / down

def _preflight(settings: Settings, say: Callable[[str], None]) -> bool:
    """Migrate the database and check the broker before starting anything; returns whether a
    model exists to serve (replicas are then awaited until it is loaded)."""
    from . import db, jobs, registry

    say(f"database: {db.normalise_url(settings.db_url).render_as_string(True)} (migrating)")
    db.upgrade(settings.db_url)
    try:
        jobs.check_broker(settings)
    except Exception as exc:
        raise StackError(f"broker not reachable: {one_line(exc)}") from None
    try:
        version, _ = registry.current(settings.models_dir)
        say(f"model: {version} from {Path(settings.models_dir).resolve()}")
        return True
    except registry.RegistryError as exc:
        say(f"warning: {exc.message} Replicas start anyway; predictions answer 503.")
        return False


def up(cfg: StackConfig, settings: Settings | None = None,
       say: Callable[[str], None] = print) -> StackState:
    """Start the topology and wait until it is healthy; on failure stop what was started."""
    settings = settings or get_settings()
    if cfg.replicas < 1:
        raise StackError("--replicas must be at least 1.")
    nginx = find_nginx()
    ports = cfg.replica_ports()
    named = {"nginx": cfg.port, **{f"web-{i + 1}": p for i, p in enumerate(ports)}}
    if cfg.flower:
        named["flower"] = cfg.flower_port
    with _locked(settings):
        previous = load_state(settings)
        if previous is not None:
            running = [p.name for p in previous.processes if _owned(p)]
            if running:
                raise StackError(f"the stack is already up ({', '.join(running)}); run "
                                 "`urbansound stack down` first.")
        check_ports(named)
        d = stack_dir(settings)
        logs = d / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for old in logs.glob("*.log"):
            old.unlink()
        for line in secret_policy.check(settings, "127.0.0.1"):  # nginx listens on loopback
            say(line)
        need_model = _preflight(settings, say)

        cores = cpu.usable_cores(settings)
        workers = cfg.workers or cpu.workers_per_replica(cfg.replicas, cores)
        env = child_environment(settings)
        web_env = dict(env)
        if not env.get("URBANSOUND_TORCH_THREADS"):
            web_env["URBANSOUND_TORCH_THREADS"] = str(
                cpu.torch_threads(cfg.replicas, workers, cores, settings))
        state = StackState(state_dir=str(Path(settings.state_dir).resolve()),
                           nginx_port=cfg.port, replica_ports=ports,
                           flower_port=cfg.flower_port if cfg.flower else None)
        procs: dict[str, Proc] = {}

        def start(name: str, argv: list[str], child_env: dict[str, str], **kw: Any) -> None:
            procs[name] = _spawn(name, argv, child_env, logs, **kw)
            state.processes.append(procs[name])
            save_state(state, settings)

        try:
            say(f"starting {cfg.replicas} replica(s) x {workers} worker(s), torch threads "
                f"{web_env.get('URBANSOUND_TORCH_THREADS', '?')}")
            py = sys.executable
            for i, port in enumerate(ports):
                argv = [py, "-m", "src.cli", "serve", "--host", "127.0.0.1", "--port",
                        str(port), "--workers", str(workers)]
                if cfg.threads:
                    argv += ["--threads", str(cfg.threads)]
                start(f"web-{i + 1}", argv,
                      {**web_env, "URBANSOUND_PROC_NAME": f"urbansound-web-{i + 1}"}, port=port)
            if cfg.worker:
                start("worker", [py, "-m", "src.cli", "worker", "--hostname",
                                 f"stack-worker@{socket.gethostname()}"], env,
                      nice=cfg.worker_nice)
            if cfg.flower:
                start("flower", [py, "-m", "celery", "-A", "worker.make_celery", "flower",
                                 f"--port={cfg.flower_port}", "--address=127.0.0.1"], env,
                      port=cfg.flower_port)
            deadline = time.monotonic() + cfg.timeout_s
            wait_until({f"web-{i + 1}": functools.partial(_replica_ok, p, need_model)
                        for i, p in enumerate(ports)}, procs, deadline)

            prefix = d / "nginx"
            conf = write_nginx_config(prefix, f"127.0.0.1:{cfg.port}", ports)
            nginx_test(nginx, prefix, conf)
            start("nginx", nginx_argv(nginx, prefix, conf), env, port=cfg.port,
                  stop_signal=signal.SIGQUIT)
            base = f"http://127.0.0.1:{cfg.port}"
            checks: dict[str, Callable[[], bool]] = {
                "nginx": lambda: http_get(f"{base}/nginx-health")[0] == 200
                and http_get(f"{base}/api/v1/health")[0] == 200}
            if cfg.worker:
                checks["worker"] = lambda: _worker_ready(procs["worker"])
            if cfg.flower:
                checks["flower"] = lambda: http_get(
                    f"http://127.0.0.1:{cfg.flower_port}/healthcheck")[0] == 200
            wait_until(checks, procs, deadline)
        except BaseException:
            say("start-up failed: stopping what was started")
            stop_processes(list(reversed(state.processes)), grace_s=10)
            (d / STATE_FILE).unlink(missing_ok=True)
            raise
    return state


def down(settings: Settings | None = None, grace_s: float = 20.0,
         say: Callable[[str], None] = print) -> list[str]:
    """Stop everything ``up`` recorded: nginx first (no new requests), then the replicas
    (they finish what they have), Flower, and the worker last (a warm shutdown waits for a
    running retrain up to ``grace_s``; its message is redelivered if it is killed)."""
    settings = settings or get_settings()
    with _locked(settings):
        state = load_state(settings)
        if state is None:
            say("the stack is not running (no state file)")
            return []
        order = {"nginx": 0, "flower": 2, "worker": 3}
        procs = sorted(state.processes, key=lambda p: order.get(p.name, 1))
        nginx = [p for p in procs if p.name == "nginx"]
        rest = [p for p in procs if p.name != "nginx"]
        left = stop_processes(nginx, grace_s, say) + stop_processes(rest, grace_s, say)
        if left:
            raise StackError(f"could not stop: {', '.join(left)}")
        (stack_dir(settings) / STATE_FILE).unlink(missing_ok=True)
        say(f"stopped {len(procs)} process group(s)")
        return [p.name for p in procs]


def status(settings: Settings | None = None) -> dict[str, Any]:
    """Each recorded process: alive or not, and its health check's answer."""
    state = load_state(settings)
    if state is None:
        return {"running": False, "processes": []}
    rows = []
    for p in state.processes:
        row: dict[str, Any] = {"name": p.name, "pid": p.pid, "alive": alive(p), "port": p.port,
                               "log": p.log}
        if p.name.startswith("web-") and p.port:
            code, body, _ = http_get(f"http://127.0.0.1:{p.port}/api/v1/health")
            row["health"] = code
            with contextlib.suppress(ValueError):
                row["model_version"] = json.loads(body).get("model_version") if code else None
        elif p.name == "nginx":
            row["health"] = http_get(f"{state.url}/api/v1/health")[0]
        elif p.name == "flower" and p.port:
            row["health"] = http_get(f"http://127.0.0.1:{p.port}/healthcheck")[0]
        rows.append(row)
    healthy = all(r["alive"] and r.get("health", 200) == 200 for r in rows)
    return {"running": any(r["alive"] for r in rows), "healthy": healthy, "url": state.url,
            "started_at": state.started_at, "processes": rows}
