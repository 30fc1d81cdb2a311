"""Every response leaves the request body read to its end (up to ``max_body_mb``).

Why: a view that answers before reading the body — a 413 by ``Content-Length``, a 415 for the
wrong type, a 401 for a wrong token, a rate limit — makes gunicorn close a socket with unread
bytes, and the kernel resets the connection. nginx, still sending the body it buffered, sees
``sendfile() failed (32: Broken pipe) while sending request to upstream`` and tells the
client 502 "No web replica could answer" instead of our answer (113 of 120 oversized clips
four at once; 13 of 30 wrong-type clips and 14 of 30 wrong-token uploads; CI failed on one
6 MiB upload). Reading the rest, after the answer is decided, lets every client get it. A
body past ``max_body_mb`` — bigger than any endpoint takes, and than nginx lets through — is
not read: the reset is the cheaper answer then. Behind nginx the body is already buffered,
so the read is a loopback copy; served directly, a slow client holds a thread while it
sends, as any upload does.
"""

from __future__ import annotations

import contextlib

from flask import Flask, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from src.settings import get_settings
from src.upload_checks import CHUNK, MIB


def discard_rest() -> None:
    """Read and drop what is left of this request's body. A body already read (a form,
    ``read_body``) costs one empty read."""
    left = get_settings().max_body_mb * MIB
    length = request.content_length
    terminated = request.environ.get("wsgi.input_terminated")
    if (length or 0) > left or not (length or terminated):
        return  # too big to be worth reading, or no body at all
    if terminated:
        # The server ends the stream (gunicorn: at Content-Length or the last chunk; werkzeug:
        # a de-chunked body): read it raw, past werkzeug's cap for this request too.
        stream = request.environ["wsgi.input"]
    else:
        try:
            stream = request.stream  # bounded by Content-Length: never past this request
        except RequestEntityTooLarge:  # over this request's own cap: not worth reading
            return
    # A client gone mid-body: the answer stands, and there is nothing left to drop.
    with contextlib.suppress(Exception):
        while left > 0 and (block := stream.read(min(CHUNK, left))):
            left -= len(block)


def register(app: Flask) -> None:
    @app.after_request
    def _read_the_rest(response: Response) -> Response:
        discard_rest()
        return response
