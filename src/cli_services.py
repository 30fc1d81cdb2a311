"""Commands that start or talk to services, each group in its own module.

``cli_worker`` (worker, retrain), ``cli_web`` (serve, up) and ``cli_stack`` (stack up/down)
import Flask/Celery only inside their commands, so the rest of the CLI stays fast.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from . import cli_stack, cli_web, cli_worker

    for module in (cli_worker, cli_web, cli_stack):
        module.register(app)
