"""Shared CLI plumbing: the one place that turns expected failures into one-line errors."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from ..errors import UserError, one_line

if TYPE_CHECKING:
    from ..model import TrainConfig

__all__ = ["UserError", "fail", "friendly_errors", "print_json"]

F = TypeVar("F", bound=Callable[..., Any])

#: Exit status of a command whose reader went away (``... | head``): 128 + SIGPIPE, what a Unix
#: tool killed by SIGPIPE reports to the shell.
EXIT_BROKEN_PIPE = 141


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reading end is closed.

    A ``BrokenPipeError`` may come from any pipe a command writes to (a child process, a
    socket); only a closed *stdout* means "the reader has all it wanted". On Linux ``poll``
    reports ``POLLERR`` on the writing end of a pipe without readers.
    """
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        events = poller.poll(0)
    except (AttributeError, OSError, ValueError):  # no real stdout: assume it was the one
        return True
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in events)


def exit_quietly_on_closed_stdout() -> None:
    """What the Python docs recommend for SIGPIPE: point stdout at /dev/null (so the flush at
    exit cannot fail again and print "Exception ignored ...") and exit at once, silently,
    with status 141 (128 + SIGPIPE) as ``yes | head -1`` does."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass
    raise typer.Exit(EXIT_BROKEN_PIPE)


KEEP_HELP = ("Weights a run ends with: best (the best validation epoch's; stops after "
             "--patience epochs without gain) or last (the whole schedule's final averaged "
             "weights). Default: best.")


VALIDATION_HELP = ("Share of the training side's recordings held out for early stopping; 0 "
                   "trains on all of them (a refit, which needs --keep last). Default: 0.15.")


TIME_POOL_HELP = ("How the head summarises time beside the max: attention (a learned weighting "
                  "of the frames) or meanmax (their plain mean). Default: attention.")
RESIDUAL_HELP = ("Skips over the last two stages' same-width convolution (residual blocks). "
                 "Default: off.")


def with_choices(cfg: TrainConfig, keep: str | None = None, validation: float | None = None,
                 time_pool: str | None = None, residual: bool | None = None,
                 envelope: bool | None = None) -> TrainConfig:
    """``cfg`` with the recipe options given on the command line (unset: TrainConfig's
    default, kept in one place). TrainConfig checks them, together (no held-out clips leave no
    best epoch to keep), so a bad choice is a usage error before any training."""
    from dataclasses import replace

    given = {"keep": keep, "validation": validation, "time_pool": time_pool,
             "residual": residual, "envelope": envelope}
    changes: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    try:
        return replace(cfg, **changes)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def friendly_errors(fn: F) -> F:
    """Wrap a command so that any error becomes ``error: <reason>`` on stderr and exit 1.

    A reader that closed stdout (``urbansound predict --json ... | head -3``) ends the command
    at once, without a message, with status 141 (``exit_quietly_on_closed_stdout``).

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
        except BrokenPipeError:
            if stdout_reader_gone():
                exit_quietly_on_closed_stdout()
            if os.environ.get("URBANSOUND_DEBUG"):
                raise
            fail("broken pipe (a process or connection this command wrote to went away)")
        except Exception as exc:  # the whole point is to catch everything
            if os.environ.get("URBANSOUND_DEBUG"):
                raise
            fail(one_line(exc))

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    """One JSON object per line, flushed: a reader sees each line as soon as it is computed,
    and a closed pipe is noticed at the next line, not a buffer (many lines) later."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def connect_broker() -> None:
    """Connect ``src.jobs`` to the task queue, as the web app does at start-up: the commands
    that queue a job or probe the broker (``retrain``, ``stack up``) call this first. The
    adapter registers itself as an ``urbansound.job_queue`` entry point (pyproject.toml), so
    nothing in ``src`` imports it; without one installed, ``jobs`` says no broker is set."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="urbansound.job_queue"):
        entry.load()()
