"""Who may change things: a bearer token for programs, a login session for people.

The API authenticates every mutating call with ``Authorization: Bearer <api_token>`` and is
exempt from CSRF (a token in a header is not sent by a browser on its own, so cross-site
forgery cannot ride on it). Pages use a session cookie set by logging in with the admin
password (or the API token), and every form carries a CSRF token (Flask-WTF). Secrets are
compared in constant time.

Rate limits (Flask-Limiter; ``init_rate_limits``), per client address:

* **Lock-out after failed authentication.** Wrong bearer tokens and wrong admin passwords are
  counted (``rate_limit_auth_failures``, e.g. 10/minute; a request without credentials is
  not a guess and does not count). Past the limit, every request from that address that
  carries credentials gets 429 with ``Retry-After`` until the window passes, even with the
  right secret: guessing stops paying. Other addresses are not affected.
* **Mutating calls** (every non-GET endpoint that needs the token or the admin login:
  uploads, retrains, activations, feedback) are limited per address and endpoint
  (``rate_limit_mutating``). Predictions and reads are not limited here.

The counters live in the broker's Redis in the full stack (every worker and replica shares
them) and in memory in the embedded default (``Settings.rate_limit_storage_uri``); if Redis
is unreachable the limits fall back to memory rather than failing requests. The client
address is the TCP peer, or, when the peer is a trusted proxy (``FORWARDED_ALLOW_IPS``, the
variable gunicorn reads too: 127.0.0.1 by default, ``*`` in compose where only nginx reaches
the replicas), the address that proxy appended to ``X-Forwarded-For``. A client cannot pick
its own key by sending that header to a server it reaches directly.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import os
import time
from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from apiflask import HTTPTokenAuth
from flask import current_app, flash, redirect, request, session, url_for
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

    wrapper.admin_required = True  # type: ignore[attr-defined]  # is_mutating() reads it
    return wrapper


# --------------------------------------------------------------------------- rate limits

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _trusted_proxies() -> tuple[bool, list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    """(any peer is a trusted proxy, explicitly trusted networks) from FORWARDED_ALLOW_IPS."""
    wildcard, networks = False, []
    for item in os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1").split(","):
        item = item.strip()
        if item == "*":
            wildcard = True
        elif item:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                continue
    return wildcard, networks


def _in(address: str, networks: list) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_ip() -> str:
    """The address rate limits are counted against (see the module's docstring): walk
    ``X-Forwarded-For`` from the right only while the hop that wrote it is trusted."""
    peer = request.remote_addr or "unknown"
    wildcard, networks = _trusted_proxies()
    if not (wildcard or _in(peer, networks)):
        return peer
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    client = peer
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break
        client = hop
        if not _in(hop, networks):
            break
    return client


def carries_credentials() -> bool:
    """A request that tries a secret: an Authorization header, or the login form's password."""
    if request.headers.get("Authorization"):
        return True
    return request.endpoint == "ui.login" and request.method == "POST" \
        and bool(request.form.get("password"))


def _auth_failed(response: Any) -> bool:
    return response.status_code == 401 and carries_credentials()


def is_mutating() -> bool:
    """A state-changing call: not GET/HEAD/OPTIONS, to a view that needs the token (the API)
    or the admin login (the pages). Open POSTs (predictions, the login form) are not."""
    if request.method in SAFE_METHODS or request.endpoint is None:
        return False
    view = current_app.view_functions.get(request.endpoint)
    return bool(getattr(view, "_spec", {}).get("auth")) or \
        bool(getattr(view, "admin_required", False))


def init_rate_limits(app: Any, settings: Any) -> Any:
    """One Limiter per app (tests build many apps; each gets its own counters in memory)."""
    from flask_limiter import Limiter

    storage = settings.rate_limit_storage_uri
    options: dict[str, Any] = {}
    if storage.startswith(("redis://", "rediss://")):
        # Redis unreachable: answer from memory quickly, never hang a request on it.
        timeout = max(0.1, float(settings.broker_timeout_s))
        options = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
    limiter = Limiter(
        client_ip,
        application_limits=[settings.rate_limit_auth_failures],
        application_limits_exempt_when=lambda: not carries_credentials(),
        application_limits_deduct_when=_auth_failed,
        default_limits=[settings.rate_limit_mutating],
        default_limits_exempt_when=lambda: not is_mutating(),
        storage_uri=storage,
        storage_options=options,
        strategy="moving-window",
        key_prefix="urbansound",
        swallow_errors=True,
        in_memory_fallback_enabled=True,
        enabled=bool(settings.rate_limits),
    )
    limiter.init_app(app)
    app.extensions["urbansound_limiter"] = limiter
    return limiter


def retry_after_seconds() -> int:
    """Seconds until the limit this request broke lets it through (for ``Retry-After``)."""
    limiter = current_app.extensions.get("urbansound_limiter")
    current = limiter.current_limit if limiter is not None else None
    if current is None:
        return 60
    try:
        return max(1, math.ceil(current.window.reset_time - time.time()))
    except Exception:  # storage gone between the check and now
        return 60


def rate_limit_message() -> str:
    limiter = current_app.extensions.get("urbansound_limiter")
    current = limiter.current_limit if limiter is not None else None
    wait = retry_after_seconds()
    if current is not None and current.request_args[-1] == "global":  # the auth-failure limit
        return f"Too many failed sign-in attempts from your address; try again in {wait} s."
    limit = f" ({current.limit})" if current is not None else ""
    return f"Too many requests{limit}; try again in {wait} s."
