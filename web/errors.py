"""One error format for the API and readable error pages for people.

Every API error is ``{"error": {"code": "...", "message": "..."}}`` with the right status:
``code`` is stable (clients branch on it), ``message`` is for people. Validation errors add
``details`` (which field, what was wrong). Nothing unexpected reaches a client: exceptions are
logged with their traceback and answered with a generic 500. UI routes get the same
information as an HTML page.
"""

from __future__ import annotations

import logging
from typing import Any

from apiflask import APIFlask, HTTPError
from flask import Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from src.errors import UserError

log = logging.getLogger(__name__)

STATUS_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 409: "conflict", 411: "length_required",
    413: "too_large", 414: "uri_too_long", 415: "unsupported_media_type", 417: "expectation_failed",
    422: "validation_error", 429: "too_many_requests", 431: "headers_too_large",
    500: "internal_error", 501: "not_implemented", 503: "unavailable",
}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "Stable machine-readable code."},
                "message": {"type": "string", "description": "What went wrong, for people."},
                "details": {"type": "object", "description": "Per-field validation errors."},
            },
        },
    },
    "additionalProperties": True,
}


def api_error(status: int, code: str, message: str, headers: dict | None = None,
              **extra: Any) -> HTTPError:
    """An exception that ends the request with the JSON envelope (``raise api_error(...)``)."""
    return HTTPError(status, message, headers=headers, extra_data={"code": code, **extra})


def wants_json() -> bool:
    """API paths always get JSON; pages get HTML unless the client asks for JSON only."""
    if request.path.startswith("/api/") or request.path == "/metrics":
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json" and not request.accept_mimetypes.accept_html


def _validation_message(detail: dict) -> str:
    parts = []
    for location, fields in (detail or {}).items():
        if isinstance(fields, dict):
            for name, problems in fields.items():
                text = "; ".join(str(p) for p in problems) if isinstance(problems, list) \
                    else str(problems)
                parts.append(f"{location}.{name}: {text}")
    return "Invalid request: " + (", ".join(parts) if parts else "see details.")


def envelope(status: int, code: str, message: str, details: Any = None,
             extra: dict | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if details:
        body["error"]["details"] = details
    body.update(extra or {})
    return body


def respond(status: int, code: str, message: str, headers: Any = None, details: Any = None,
            extra: dict | None = None) -> Response | tuple:
    if wants_json():
        response = jsonify(envelope(status, code, message, details, extra))
        response.status_code = status
    else:
        response = Response(render_template("error.html", status=status, code=code,
                                            message=message), status=status)
    for key, value in dict(headers or {}).items():
        if key.lower() != "content-type":
            response.headers[key] = value
    return response


def register(app: APIFlask) -> None:
    @app.error_processor
    def _http_error(error: HTTPError):
        extra = dict(error.extra_data or {})
        code = extra.pop("code", None)
        if error.status_code == 422 and error.detail and code is None:
            return respond(422, "validation_error", _validation_message(error.detail),
                           error.headers, details=error.detail)
        code = code or STATUS_CODES.get(error.status_code, "error")
        message = error.message or code.replace("_", " ")
        if error.status_code == 401 and code == "unauthorized" and message == "Unauthorized":
            message = "A valid 'Authorization: Bearer <token>' header is required."
        return respond(error.status_code, code, message, error.headers, extra=extra)

    @app.errorhandler(HTTPException)
    def _werkzeug_error(error: HTTPException):
        status = error.code or 500
        message = error.description or error.name
        if status == 413:
            from src.settings import get_settings

            message = (f"The request is too large (limit {get_settings().max_upload_mb} MiB "
                       "per request).")
        elif status == 404:
            message = f"Nothing at {request.path}."
        elif status == 405:
            message = f"{request.method} is not allowed on {request.path}."
        elif status == 400 and request.is_json and error.__class__.__name__ == "BadRequest":
            return respond(400, "invalid_json", "The request body is not valid JSON.")
        elif status == 429:  # a rate limit (Flask-Limiter): say when to come back
            from .security import rate_limit_message, retry_after_seconds

            headers = dict(error.get_headers())
            headers["Retry-After"] = str(retry_after_seconds())
            return respond(429, "too_many_requests", rate_limit_message(), headers)
        code = "csrf_failed" if error.__class__.__name__ == "CSRFError" else \
            STATUS_CODES.get(status, "error")
        return respond(status, code, message, error.get_headers())

    @app.errorhandler(UserError)
    def _user_error(error: UserError):
        """Every error a person can fix, from any layer of the core, mapped in one place."""
        extra = {k: v for k, v in error.extra.items() if v is not None}
        return respond(error.status, error.code, error.message, extra=extra)

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        if isinstance(error, HTTPError):  # pragma: no cover - routed above by Flask
            return _http_error(error)
        log.exception("unhandled error on %s %s", request.method, request.path)
        return respond(500, "internal_error",
                       "Something went wrong on our side; it has been logged.")
