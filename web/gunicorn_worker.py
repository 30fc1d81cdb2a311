"""gunicorn workers whose own error answers are the API's JSON envelope, not gunicorn's HTML.

gunicorn answers some requests before the app ever sees them: a request line over
``limit_request_line`` (414), headers over ``limit_request_field_size`` or too many of them
(431), a request it cannot parse (400), a transfer coding it does not support (501)... It
writes those from the worker's ``handle_error`` as a small HTML page. A client of
``/api/v1`` must get ``{"error": {"code", "message"}}`` whichever layer refuses it, so these
workers keep gunicorn's decision (status, reason, what was wrong, the warning and access-log
line) and only rewrite the bytes it sends: ``handle_error`` hands gunicorn a socket wrapper
that turns the HTML answer into the envelope. JSON for every path: a request refused here may
not have a readable path at all.

Why here (``web/``) and not ``deploy/``: gunicorn loads ``worker_class`` by dotted path, and
the error format is the web layer's (``web.errors.envelope`` and ``STATUS_CODES``, one
definition). Importing it in the master imports Flask but neither torch nor the app, which
each worker still builds after the fork (``preload_app = False``).

``deploy/gunicorn.conf.py`` selects ``ThreadWorker`` for ``gthread`` (the default) and
``SyncWorker`` for ``sync``.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

from gunicorn.workers.gthread import ThreadWorker as _GThreadWorker
from gunicorn.workers.sync import SyncWorker as _SyncWorker

from .errors import STATUS_CODES, envelope

_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3}) ([^\r\n]*)\r\n")
_HTML_MESSAGE = re.compile(r"</h1>\s*(.*?)\s*</body>", re.S)

MESSAGES = {
    400: "The request could not be parsed as HTTP",
    403: "The request is forbidden",
    414: "The URL is too long",
    417: "The Expect header cannot be met",
    431: "The request headers are too large or too many",
    500: "Something went wrong on our side; it has been logged.",
    501: "The request uses a transfer coding this server does not support",
}


def json_error_response(status: int, reason: str, detail: str = "") -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response carrying the JSON envelope."""
    code = STATUS_CODES.get(status, "bad_request" if 400 <= status < 500 else "error")
    message = MESSAGES.get(status, reason or code.replace("_", " "))
    if detail and status != 500:
        message = f"{message}: {detail}"
    body = json.dumps(envelope(status, code, message)).encode() + b"\n"
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "X-Content-Type-Options: nosniff\r\n\r\n")
    return head.encode("latin-1") + body


def rewrite(data: bytes) -> bytes:
    """gunicorn's HTML error answer (``gunicorn.util.write_error``) as the JSON envelope;
    anything else unchanged."""
    match = _STATUS_LINE.match(data)
    head, sep, body = data.partition(b"\r\n\r\n")
    if not match or not sep or b"content-type: text/html" not in head.lower():
        return data
    status, reason = int(match.group(1)), match.group(2).decode("latin-1")
    if status < 400:
        return data
    found = _HTML_MESSAGE.search(body.decode("latin-1"))
    detail = html.unescape(found.group(1)).strip() if found else ""
    return json_error_response(status, reason, detail)


class _JsonErrorSocket:
    """What ``handle_error`` writes to: the real client socket, except that a complete
    gunicorn error page is sent as JSON (everything else is passed through)."""

    def __init__(self, sock: Any):
        self._sock = sock

    def sendall(self, data: bytes, *args: Any) -> None:
        self._sock.sendall(rewrite(bytes(data)), *args)

    def send(self, data: bytes, *args: Any) -> int:
        self.sendall(data, *args)
        return len(data)

    def __getattr__(self, name: str) -> Any:  # gettimeout, setblocking, fileno...
        return getattr(self._sock, name)


class JsonErrorsMixin:
    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        super().handle_error(req, _JsonErrorSocket(client), addr, exc)  # type: ignore[misc]


class ThreadWorker(JsonErrorsMixin, _GThreadWorker):
    """gunicorn's ``gthread`` worker, errors as JSON."""


class SyncWorker(JsonErrorsMixin, _SyncWorker):
    """gunicorn's ``sync`` worker, errors as JSON."""


WORKER_CLASSES = {"gthread": f"{__name__}.ThreadWorker", "sync": f"{__name__}.SyncWorker"}
