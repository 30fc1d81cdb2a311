"""Default and placeholder secrets: fine on loopback, refused anywhere else.

The built-in defaults (``change-me``...) make the embedded demo work out of the box, and
``.env.example`` ships placeholders (``change-me-api-token``...) for people to replace. Either
one on a server other machines can reach is an open door: anyone can log in as administrator,
activate a model or forge a session. So a server that listens beyond loopback refuses to start
with one, naming the settings to set, unless ``URBANSOUND_ALLOW_DEFAULT_SECRETS=true`` says
the risk is accepted (a throw-away trial on a private network); on loopback (127.0.0.0/8,
``::1``, ``localhost``, a Unix socket) it only warns.

Checked by ``urbansound serve`` / ``up`` / ``stack up`` before anything starts, and by the app
factory when ``URBANSOUND_BIND`` (gunicorn's bind, which ``serve`` sets) names a public address,
so a gunicorn started by hand is covered too.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger(__name__)

SECRETS = ("api_token", "admin_password", "secret_key")
ALLOW_ENV = "URBANSOUND_ALLOW_DEFAULT_SECRETS"

#: The built-in defaults and every placeholder ``.env.example`` has shipped (a test keeps this
#: list in step with the file), compared case-insensitively.
KNOWN_PLACEHOLDERS = frozenset({
    "change-me", "dev-secret-change-me",
    "change-me-api-token", "change-me-admin-password", "change-me-long-random-string",
    "change-me-postgres-password", "admin:change-me-flower-password",
})
# "change-me", "changeme", "change_me", "CHANGE ME", "change-this"...: a value that still asks
# to be changed was not.
_ASKS_TO_BE_CHANGED = re.compile(r"change[\W_]*(me|it|this)", re.IGNORECASE)


class DefaultSecretsError(UserError):
    """A server reachable from other machines would start with a default secret."""

    code, status = "default_secrets", 500


def is_placeholder(value: str | None) -> bool:
    """A built-in default, a ``.env.example`` placeholder, anything that says "change me",
    or nothing at all."""
    text = (value or "").strip()
    return (not text or text.lower() in KNOWN_PLACEHOLDERS
            or _ASKS_TO_BE_CHANGED.search(text) is not None)


def weak_secrets(settings: Settings) -> list[str]:
    """The names (``api_token``...) of the secrets still at a default or placeholder value."""
    return [name for name in SECRETS if is_placeholder(getattr(settings, name))]


def is_loopback(host: str) -> bool:
    """Whether a bind address is reachable from this machine only: 127.0.0.0/8, ::1,
    ``localhost``, a Unix socket. An empty host or ``0.0.0.0`` means every interface."""
    host = host.strip()
    if host.startswith(("unix:", "fd://")):
        return True
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost, or empty (all interfaces)
        return False


def bind_host(bind: str) -> str:
    """The host part of a gunicorn bind (``0.0.0.0:8000``, ``[::1]:8000``, ``unix:/x``)."""
    bind = bind.strip()
    if bind.startswith(("unix:", "fd://")):
        return bind
    if bind.startswith("["):
        return bind[1:bind.index("]")] if "]" in bind else bind
    return bind.rsplit(":", 1)[0] if bind.count(":") == 1 else bind


def check(settings: Settings, host: str) -> list[str]:
    """Refuse (``DefaultSecretsError``) to listen on ``host`` with a weak secret unless it is
    loopback or the operator allowed it; otherwise return the warning to show (empty when
    every secret is set)."""
    weak = weak_secrets(settings)
    if not weak:
        return []
    names = ", ".join(f"URBANSOUND_{n.upper()}" for n in weak)
    if not is_loopback(host) and not settings.allow_default_secrets:
        raise DefaultSecretsError(
            f"refusing to listen on {host or 'all interfaces'} with a default or placeholder "
            f"{', '.join(weak)}: set {names} to real secrets (e.g. `python -c \"import secrets; "
            f"print(secrets.token_urlsafe(32))\"`), listen on 127.0.0.1, or set "
            f"{ALLOW_ENV}=true to accept the risk")
    where = "on loopback" if is_loopback(host) else f"on {host} ({ALLOW_ENV}=true)"
    return [f"warning: default or placeholder {', '.join(weak)} {where}: set {names} before "
            "exposing this server"]


def enforce(settings: Settings, bind: str | None = None) -> None:
    """The app factory's check: refuse when ``bind`` (default: ``URBANSOUND_BIND``, gunicorn's
    bind address) is public and a secret is weak; otherwise log the warning, if any."""
    bind = bind if bind is not None else os.environ.get("URBANSOUND_BIND", "127.0.0.1:8000")
    for line in check(settings, bind_host(bind)):
        log.warning("%s", line.removeprefix("warning: "))
