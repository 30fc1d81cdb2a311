"""``urbansound stack up|down|status``: nginx + N gunicorn replicas + Celery worker + Flower
as local processes (no Docker), against the Postgres and Redis the settings name.

The work is in ``src.stack``; this module is only the command line. ``up`` returns once
everything is healthy (or, with ``--foreground``, stays and stops the stack on Ctrl-C).
"""

from __future__ import annotations

import signal
import time

import typer

from .common import connect_broker, fail, friendly_errors, print_json

app = typer.Typer(help="The production topology without Docker: nginx in front of N web "
                  "replicas, a Celery worker and Flower (state under URBANSOUND_STATE_DIR/stack).",
                  no_args_is_help=True)


def register(root: typer.Typer) -> None:
    """Attach this module's commands to the root app."""
    root.add_typer(app, name="stack")


@app.command("up")
@friendly_errors
def up(
    replicas: int = typer.Option(2, min=1, max=32, help="gunicorn replicas behind nginx."),
    port: int = typer.Option(8080, min=1, max=65535, help="nginx port (127.0.0.1)."),
    base_port: int = typer.Option(0, min=0, max=65535,
                                  help="First replica port (default: --port + 1)."),
    workers: int = typer.Option(0, min=0, help="gunicorn workers per replica (0: cores / "
                                "replicas, at least 1)."),
    threads: int = typer.Option(None, min=1, help="Threads per gunicorn worker (default: "
                                "deploy/gunicorn.conf.py)."),
    flower_port: int = typer.Option(5555, min=1, max=65535),
    no_worker: bool = typer.Option(False, "--no-worker", help="No Celery worker."),
    no_flower: bool = typer.Option(False, "--no-flower", help="No Flower."),
    worker_nice: int = typer.Option(5, min=0, max=19, help="CPU niceness of the Celery worker: "
                                    "a retrain uses idle CPU, predictions keep priority."),
    timeout: float = typer.Option(180, min=1, help="Seconds to wait for everything healthy."),
    foreground: bool = typer.Option(False, "--foreground",
                                    help="Stay in the foreground; Ctrl-C stops the stack."),
) -> None:
    """Migrate the database, start the replicas, nginx, the worker and Flower; wait until
    all of them answer their health checks."""
    from .. import stack

    cfg = stack.StackConfig(replicas=replicas, port=port, base_port=base_port, workers=workers,
                            threads=threads, worker=not no_worker, flower=not no_flower,
                            flower_port=flower_port, timeout_s=timeout,
                            worker_nice=worker_nice)
    connect_broker()
    try:
        state = stack.up(cfg, say=typer.echo)
    except stack.StackError as exc:
        fail(exc.message)
    parts = [f"{len(state.replica_ports)} replica(s) on ports "
             f"{', '.join(map(str, state.replica_ports))}"]
    if state.flower_port:
        parts.append(f"Flower http://127.0.0.1:{state.flower_port}/")
    typer.echo(f"stack up: {state.url}/ ({'; '.join(parts)}). Stop it with "
               "`urbansound stack down`.")
    if foreground:
        _wait_for_signal()
        down()


def _wait_for_signal() -> None:
    stop = {"now": False}

    def handler(_signum: int, _frame: object) -> None:
        stop["now"] = True

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)
    while not stop["now"]:
        time.sleep(0.2)


@app.command("down")
@friendly_errors
def down(timeout: float = typer.Option(20, min=0, help="Seconds each part may take to stop "
                                       "gracefully before SIGKILL.")) -> None:
    """Stop every process `stack up` started (graceful first, then SIGKILL)."""
    from .. import stack

    try:
        stack.down(grace_s=timeout, say=typer.echo)
    except stack.StackError as exc:
        fail(exc.message)


@app.command("status")
@friendly_errors
def status(json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Which parts run and whether they answer. Exit 0 when all are healthy, 1 when some
    part is down or unhealthy, 3 when the stack is not running."""
    from .. import stack

    info = stack.status()
    if json:
        print_json(info)
    elif not info["processes"]:
        typer.echo("the stack is not running")
    else:
        typer.echo(f"{info['url']}/  ({'healthy' if info['healthy'] else 'NOT healthy'})")
        for p in info["processes"]:
            state = "running" if p["alive"] else "STOPPED"
            port = "" if p["port"] is None else f"port {p['port']}"
            health = "" if p.get("health") is None else f"health {p['health']}"
            model = f"model {p['model_version']}" if p.get("model_version") else ""
            typer.echo(f"  {p['name']:<8} pid {p['pid']:<7} {state:<8} {port:<10} {health:<10}"
                       f" {model}".rstrip())
    if not info["processes"]:
        raise typer.Exit(3)
    if not info.get("healthy"):
        raise typer.Exit(1)
