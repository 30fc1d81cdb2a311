"""Who may change things: a bearer token for programs, a login session for people.

The API authenticates every mutating call with ``Authorization: Bearer <api_token>`` and is
exempt from CSRF (a token in a header is not sent by a browser on its own, so cross-site
forgery cannot ride on it). Pages use a session cookie set by logging in with the admin
password (or the API token), and every form carries a CSRF token (Flask-WTF). Secrets are
compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from apiflask import HTTPTokenAuth
from flask import flash, redirect, request, session, url_for
from flask_wtf.csrf import CSRFProtect

csrf = CSRFProtect()
token_auth = HTTPTokenAuth(
    scheme="Bearer", security_scheme_name="BearerToken",
    description="The value of URBANSOUND_API_TOKEN. Needed for uploads, retraining and "
                "model activation; predictions and reads are open.",
)


def _matches(given: str | None, secret: str) -> bool:
    """Constant-time comparison; an empty configured secret never matches (locked, not open)."""
    if not given or not secret:
        return False
    return hmac.compare_digest(given.encode(), secret.encode())


@token_auth.verify_token
def _verify(token: str) -> str | None:
    from .services import state

    return "api" if _matches(token, state().settings.api_token) else None


def check_admin_secret(given: str) -> bool:
    from .services import state

    settings = state().settings
    return _matches(given, settings.admin_password) or _matches(given, settings.api_token)


def is_admin() -> bool:
    return bool(session.get("admin"))


def safe_next(target: str | None) -> str:
    """Only same-site paths after login: an open redirect would help phishing."""
    if not target:
        return url_for("ui.index")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return url_for("ui.index")
    return target


def admin_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """Pages that change state: send people to the login page, then back."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not is_admin():
            flash("Log in as administrator to do that.", "warning")
            back = request.referrer if request.method == "POST" else request.full_path
            return redirect(url_for("ui.login", next=safe_next(urlsplit(back or "").path
                                                               if back else None)))
        return view(*args, **kwargs)

    return wrapper
