"""Shared CLI plumbing: the one place that turns expected failures into one-line errors."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from .errors import UserError

__all__ = ["UserError", "fail", "friendly_errors", "print_json"]

F = TypeVar("F", bound=Callable[..., Any])



def fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def friendly_errors(fn: F) -> F:
    """Wrap a command so that any error becomes ``error: <reason>`` on stderr and exit 1.

    Unexpected exceptions are reported by type and message too: a CLI user is never helped by a
    traceback, and ``URBANSOUND_DEBUG=1`` re-raises for developers.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import os

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as exc:  # the whole point is to catch everything
            if os.environ.get("URBANSOUND_DEBUG"):
                raise
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            fail(" ".join(str(message).split()))

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
