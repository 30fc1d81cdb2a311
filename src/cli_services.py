"""Commands that start or talk to services: serve, worker, up, stack, retrain."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach the service commands to the root app (kept apart: they import Flask/Celery)."""
