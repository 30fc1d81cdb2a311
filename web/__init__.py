"""The Flask app: Jinja pages for people (``ui``, at ``/``) and a REST API for programs
(``api``, at ``/api/v1``), over the ML core in ``src``.

``create_app`` is the only entry point (gunicorn: ``web:create_app()``; Celery's worker builds
it too, to run tasks inside the app context). Settings come from ``src.settings`` (the
``URBANSOUND_*`` environment); Flask's own keys can be overridden with ``FLASK_*`` variables
(``app.config.from_prefixed_env()``), and tests pass ``test_config``.
"""

from __future__ import annotations

import logging
import time
from importlib import metadata
from typing import Any

from apiflask import APIFlask
from flask import g, request

from src import secret_policy
from src.monitoring import Monitor
from src.settings import get_settings

from . import errors, request_body, services
from .errors import ERROR_SCHEMA
from .security import csrf, init_rate_limits

log = logging.getLogger(__name__)
MIB = 1 << 20


def package_version() -> str:
    try:
        return metadata.version("urbansound")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


def create_app(test_config: dict[str, Any] | None = None) -> APIFlask:
    settings = get_settings()
    app = APIFlask(
        __name__, title="urbansound API", version=package_version(),
        spec_path="/api/v1/openapi.json", docs_path=None,  # our own docs page: no CDN
    )
    app.config.update(
        SECRET_KEY=settings.secret_key,
        MAX_CONTENT_LENGTH=settings.max_upload_mb * MIB,
        # A folder upload is one multipart part per file; allow as many as a zip may hold.
        MAX_FORM_PARTS=max(1000, settings.max_archive_members + 50),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=8 * 3600,
        WTF_CSRF_TIME_LIMIT=None,  # the token lives as long as the session
        HTTP_ERROR_SCHEMA=ERROR_SCHEMA,
        VALIDATION_ERROR_SCHEMA=ERROR_SCHEMA,
        AUTO_404_RESPONSE=True,
        DESCRIPTION=(
            "Classify urban sound clips (UrbanSound8K's ten classes), upload labelled clips, "
            "retrain and roll back models. Errors are always "
            '`{"error": {"code": "...", "message": "..."}}`. Mutating calls need '
            "`Authorization: Bearer <URBANSOUND_API_TOKEN>`."),
        TAGS=[{"name": "API", "description": "urbansound REST API v1"},
              {"name": "Operations", "description": "Monitoring"}],
        CELERY_INIT=True,
    )
    app.config.from_prefixed_env()
    if test_config:
        app.config.update(test_config)

    _route_logs_to_gunicorn()
    secret_policy.enforce(settings)  # default secrets: refused beyond loopback, else a warning
    started = time.time()
    app.extensions["urbansound"] = services.AppState(
        settings=settings, monitor=Monitor(settings.state_dir, started),
        predictors=services.predictor_holder(settings), started_at=started)
    services.configure_torch_threads(settings)

    csrf.init_app(app)
    init_rate_limits(app, settings)
    errors.register(app)
    request_body.register(app)  # answers that come before the body reach the client
    _register_blueprints(app)
    _instrument(app)
    if app.config["CELERY_INIT"]:
        _init_celery(app, settings)
    return app


def _route_logs_to_gunicorn() -> None:
    """Under gunicorn, send our own loggers' records (model loads and swaps, pointer problems,
    secret warnings) to gunicorn's error log with its format and level. Without this, Python's
    last-resort handler prints warnings bare and drops every info line, so a swap that went
    wrong could not be read from the server log. Outside gunicorn nothing changes."""
    server = logging.getLogger("gunicorn.error")
    if not server.handlers:
        return
    for name in ("src", "web"):
        ours = logging.getLogger(name)
        if not ours.handlers:
            ours.handlers = list(server.handlers)
            ours.setLevel(server.level)
            ours.propagate = False


def _register_blueprints(app: APIFlask) -> None:
    from .api import add_request_bodies, api, register_prometheus
    from .ui import ui

    csrf.exempt(api)  # bearer-token API: no cookies, so no CSRF
    app.register_blueprint(api)
    app.register_blueprint(ui)
    register_prometheus(app)
    app.spec_processor(add_request_bodies)


def _init_celery(app: APIFlask, settings: Any) -> None:
    """Flask's documented Celery pattern; and this process queues retrains through it."""
    from .celery_app import celery_config, celery_init_app, install

    app.config.setdefault("CELERY", celery_config(settings))
    celery_init_app(app)
    install()


def _instrument(app: APIFlask) -> None:
    """Count and time every request (by route pattern, so ids do not explode the label set)
    and add the security headers every page should carry."""

    @app.before_request
    def _start_timer() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def _after(response):
        if request.endpoint != "static":
            rule = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
            elapsed = time.perf_counter() - g.get("request_started", time.perf_counter())
            try:
                services.state().monitor.observe_request(rule, request.method,
                                                         response.status_code, elapsed)
            except Exception:  # metrics must never break a response
                log.exception("could not record request metrics")
        headers = response.headers
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("Referrer-Policy", "same-origin")
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data: blob:; media-src 'self' data: blob:; "
            "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'self'; "
            "frame-ancestors 'none'; form-action 'self'")
        return response
