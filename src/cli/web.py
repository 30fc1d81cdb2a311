"""``urbansound serve`` (the web app under gunicorn) and ``urbansound up`` (the embedded
default: database migrated, web app and Celery worker started together, Ctrl-C stops both).

Flask and gunicorn are not imported here: ``serve`` replaces this process with gunicorn (so
signals reach gunicorn directly) and ``up`` supervises two child processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer

from ..settings import Settings, get_settings
from .common import fail, friendly_errors

ROOT = Path(__file__).resolve().parents[2]
STOP_GRACE_S = 15.0


def register(app: typer.Typer) -> None:
    """Attach this module's commands to the root app."""
    app.command("serve")(serve)
    app.command("up")(up)


def gunicorn_config() -> Path:
    """The one gunicorn config (it sizes torch threads per worker in ``post_fork``)."""
    return ROOT / "deploy" / "gunicorn.conf.py"


def serve_environment(port: int, workers: int) -> dict[str, str]:
    """What gunicorn and its workers need in the environment before any import."""
    settings = get_settings()
    env = dict(os.environ)
    # One metrics folder per server (port): the master wipes it at start, and two servers on
    # one state folder (the stack's replicas) must not wipe each other's.
    env.setdefault("PROMETHEUS_MULTIPROC_DIR",
                   str((settings.state_dir / "prometheus" / f"web-{port}").resolve()))
    Path(env["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)
    # Torch threads per worker are not set here: the gunicorn config's post_fork sizes them
    # from the real worker count (src/cpu.py).
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def check_secrets(host: str, port: int, env: dict[str, str]) -> None:
    """Refuse (a one-line error) to listen beyond loopback with a default or placeholder
    secret unless allowed (``src/secret_policy.py``); warn on loopback. The bind goes into the
    environment too, so the app factory in each worker applies the same rule."""
    from ..secret_policy import check

    for line in check(get_settings(), host):
        typer.echo(line, err=True)
    env["URBANSOUND_BIND"] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def gunicorn_argv(host: str, port: int, workers: int, threads: int | None = None) -> list[str]:
    argv = [sys.executable, "-m", "gunicorn", "--config", str(gunicorn_config()),
            "--bind", f"{host}:{port}", "--workers", str(workers), "--chdir", str(ROOT)]
    if threads:
        argv += ["--threads", str(threads)]
    return [*argv, "web:create_app()"]


@friendly_errors
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0: all)."),
    port: int = typer.Option(8000, min=1, max=65535),
    workers: int = typer.Option(2, min=1, help="gunicorn worker processes (≈ CPU cores; each "
                                "holds one copy of the model)."),
    threads: int = typer.Option(None, min=1, help="Threads per worker (default 4)."),
) -> None:
    """Run the web app (pages + REST API) under gunicorn.

    Beyond loopback (``--host 0.0.0.0``) it refuses to start with a default or placeholder
    secret unless ``URBANSOUND_ALLOW_DEFAULT_SECRETS=true``."""
    env = serve_environment(port, workers)
    check_secrets(host, port, env)
    argv = gunicorn_argv(host, port, workers, threads)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)  # gunicorn gets Ctrl-C/SIGTERM itself


# --------------------------------------------------------------------------- up

NO_DATA_FIX = "run `urbansound data import DIR` / `urbansound data download`, or upload clips"


def mask_url(url: str) -> str:
    """``scheme://user:***@host/...``: a URL fit to print (the password hidden)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.password:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def fold_ranges(folds: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3,5"."""
    runs: list[list[int]] = []
    for f in folds:
        if runs and f == runs[-1][-1] + 1:
            runs[-1].append(f)
        else:
            runs.append([f])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs)


def describe_data(data_dir: Path) -> str:
    """One phrase for what sits in the data folder: how many clips, which layout, synthetic
    or not, or "none" and the commands that fill it."""
    from ..datasets import DatasetError, is_us8k, read_dataset, summarise

    try:
        clips = read_dataset(data_dir)
    except DatasetError as exc:
        if not data_dir.is_dir() or "no audio found" in exc.message:
            return f"none in {data_dir} — {NO_DATA_FIX}"
        return f"unusable: {exc.message}"
    summary = summarise(clips)
    if is_us8k(data_dir):
        layout = "UrbanSound8K layout"
    else:
        parts = [f"{part} {sum(1 for c in clips if part in c.path.relative_to(data_dir).parts[:1])}"
                 for part in ("train", "test") if (data_dir / part).is_dir()]
        layout = ", ".join(parts) or "class-per-folder"
    if summary["folds"]:
        layout += f", folds {fold_ranges(summary['folds'])}"
    if "synthetic" in summary["sources"]:
        layout += "; SYNTHETIC demo set, not UrbanSound8K"
    return f"{summary['n']:,} clips in {data_dir} ({layout})"


def startup_report(settings: Settings | None = None) -> list[str]:
    """What ``urbansound up`` found, one line each: model, data set, database, broker."""
    from .. import db, registry

    settings = settings or get_settings()
    try:
        version, _ = registry.current(settings.models_dir)
        model = f"serving {version} (from {settings.models_dir})"
        check = registry.check_pointer(settings.models_dir)
        if not check.ok:
            model += (f"; the pointer cannot be trusted ({check.message}): /api/v1/ready says "
                      "not ready until `urbansound models activate VERSION` fixes it")
    except registry.RegistryError as exc:
        model = (f"none — {exc.message} The app starts anyway; /api/v1/ready says 'not ready' "
                 "until a model exists (`urbansound train`).")
    embedded = " (embedded)"
    database = db.normalise_url(settings.db_url).render_as_string(hide_password=True)
    return [
        f"model:    {model}",
        f"data set: {describe_data(settings.data_dir)}",
        f"database: {database}{'' if settings.database_url else embedded}",
        f"broker:   {mask_url(settings.celery_broker)}{'' if settings.broker_url else embedded}",
    ]


def _prepare() -> None:
    """Say what was found, then migrate the database, before starting anything."""
    from .. import db

    settings = get_settings()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    for line in startup_report(settings):
        typer.echo(line)
    db.upgrade(settings.db_url)


def _stop(procs: dict[str, subprocess.Popen[bytes]], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM each child's process group (gunicorn: graceful; Celery: warm shutdown), then
    SIGKILL whatever is still there after ``grace`` seconds."""
    for proc in procs.values():
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@friendly_errors
def up(
    host: str = typer.Option("127.0.0.1", help="Interface the web app listens on."),
    port: int = typer.Option(8000, min=1, max=65535),
    workers: int = typer.Option(2, min=1, help="gunicorn worker processes."),
    no_worker: bool = typer.Option(False, "--no-worker", help="Web app only (no retraining)."),
) -> None:
    """Embedded default: migrate the database, run the web app and a Celery worker.

    Ctrl-C (or SIGTERM) stops both: gunicorn gracefully, Celery with a warm shutdown, then
    anything still running after 15 s is killed (a second Ctrl-C kills at once). Beyond
    loopback it refuses default or placeholder secrets, as ``serve`` does."""
    from ..secret_policy import check

    check(get_settings(), host)  # before anything is migrated or started
    _prepare()
    env = serve_environment(port, workers)
    check_secrets(host, port, env)
    commands = {"web": gunicorn_argv(host, port, workers)}
    if not no_worker:
        commands["worker"] = [sys.executable, "-m", "src.cli", "worker"]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stopping: dict[str, int | None] = {"signal": None}

    def on_signal(signum: int, _frame: object) -> None:
        if stopping["signal"] is not None:  # a second Ctrl-C: no more patience
            for proc in procs.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
        stopping["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for name, argv in commands.items():
            # Own session: the terminal's Ctrl-C reaches only us, and we stop children in order.
            procs[name] = subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True)
        typer.echo(f"urbansound is up: http://{host}:{port}/ (web pid {procs['web'].pid}"
                   + (f", worker pid {procs['worker'].pid}" if "worker" in procs else "")
                   + "). Ctrl-C stops it.")
        exited = None
        while stopping["signal"] is None and exited is None:
            exited = next((n for n, p in procs.items() if p.poll() is not None), None)
            time.sleep(0.2)
        if exited is not None and stopping["signal"] is None:
            code = procs[exited].returncode
            typer.echo(f"{exited} exited with status {code}; stopping the rest", err=True)
        else:
            typer.echo("stopping web app and worker ...")
        _stop(procs)
    finally:
        _stop(procs, grace=2)
        for s, handler in previous.items():
            signal.signal(s, handler)
    if exited is not None and stopping["signal"] is None:
        fail(f"the {exited} process stopped unexpectedly (exit status {procs[exited].returncode})")
    typer.echo("stopped.")
