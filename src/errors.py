"""The one base class for failures a person can fix.

Every module's own error (bad audio, a bad data folder, a registry, ingest or job problem, a
database or broker outage...) derives from ``UserError``, so each adapter reports any of them
in one place without knowing where it came from: the CLI as one line (``message``), the web
app as ``{"error": {"code", "message", ...extra}}`` with HTTP status ``status``
(``web/errors.py``). ``code`` is stable (clients branch on it); ``message`` is for people.
"""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """``message`` is one line: what went wrong and, where possible, what to do.

    Subclasses set the default ``code`` and ``status``; an instance may refine both, and
    carry ``extra`` facts for the answer (the job a failed request created, a plan...)."""

    code: str = "bad_request"
    status: int = 400

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 **extra: Any):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.extra = extra


class Unavailable(UserError):
    """A service this needs is down (database, broker): retrying later may work."""

    code = "unavailable"
    status = 503


def one_line(exc: BaseException) -> str:
    """Any exception as one line for a person: a ``UserError``'s message, else the exception's
    own text (or its type when it has none), whitespace folded."""
    text = exc.message if isinstance(exc, UserError) else (str(exc) or type(exc).__name__)
    return " ".join(text.split())
