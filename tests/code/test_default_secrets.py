"""Default and placeholder secrets (issue 12, item 7): on loopback a warning, beyond loopback a
one-line refusal naming the settings to set, unless URBANSOUND_ALLOW_DEFAULT_SECRETS=true.

``serve`` replaces itself with gunicorn (``os.execve``): here the exec is intercepted, so
"starts" means "got as far as starting gunicorn, with this argv and environment"."""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from src import secret_policy
from src.secret_policy import DefaultSecretsError, is_loopback, is_placeholder

ROOT = Path(__file__).resolve().parents[2]
SECRET_VARS = ("URBANSOUND_API_TOKEN", "URBANSOUND_ADMIN_PASSWORD", "URBANSOUND_SECRET_KEY")


def env_example() -> dict[str, str]:
    out = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


REAL = {name: secrets.token_urlsafe(24) for name in SECRET_VARS}


@pytest.fixture()
def secrets_env(monkeypatch, tmp_path):
    """``set_env(**values)``: the three secrets unset (defaults) unless given, nothing allowed."""
    from src.settings import get_settings

    monkeypatch.setenv("URBANSOUND_STATE_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("URBANSOUND_BIND", raising=False)

    def set_env(**values: str) -> None:
        for name in (*SECRET_VARS, "URBANSOUND_ALLOW_DEFAULT_SECRETS"):
            monkeypatch.delenv(name, raising=False)
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    set_env()
    yield set_env
    get_settings.cache_clear()


# --------------------------------------------------------------------------- the policy

def test_placeholders_are_recognised():
    example = env_example()
    for name in (*SECRET_VARS, "POSTGRES_PASSWORD", "FLOWER_BASIC_AUTH"):
        assert is_placeholder(example[name]), f".env.example's {name} is not recognised"
    from src.settings import Settings

    for name in secret_policy.SECRETS:
        assert is_placeholder(Settings.model_fields[name].default)
    for value in ("", "   ", "changeme", "CHANGE_ME", "please-change-me-now", "ChangeIt",
                  "change this"):
        assert is_placeholder(value), value
    for value in (secrets.token_urlsafe(32), "test-token-0123456789", "correct horse battery"):
        assert not is_placeholder(value), value


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("LOCALHOST", True), ("unix:/run/urbansound.sock", True),
    ("0.0.0.0", False), ("", False), ("::", False), ("192.168.1.20", False),
    ("10.0.0.5", False), ("example.org", False), ("localhost.example.org", False),
])
def test_loopback(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(("bind", "host"), [
    ("0.0.0.0:8000", "0.0.0.0"), ("127.0.0.1:80", "127.0.0.1"), ("[::1]:8000", "::1"),
    (":8000", ""), ("unix:/tmp/x.sock", "unix:/tmp/x.sock"), ("localhost", "localhost"),
])
def test_bind_host(bind, host):
    assert secret_policy.bind_host(bind) == host


# --------------------------------------------------------------------------- urbansound serve

@pytest.fixture()
def execs(monkeypatch) -> list[tuple[list[str], dict[str, str]]]:
    """Record the exec into gunicorn instead of doing it."""
    calls: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((argv, env)))
    return calls


def serve(*args: str):
    from src.cli import app

    return CliRunner().invoke(app, ["serve", *args])


def test_serve_on_all_interfaces_with_defaults_refuses(secrets_env, execs):
    result = serve("--host", "0.0.0.0")
    assert result.exit_code == 1 and execs == []
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    message = errors[0]
    assert "refusing to listen on 0.0.0.0" in message
    for name in SECRET_VARS:
        assert name in message
    assert "URBANSOUND_ALLOW_DEFAULT_SECRETS=true" in message


def test_serve_refuses_the_env_example_placeholders(secrets_env, execs):
    example = env_example()
    secrets_env(**{name: example[name] for name in SECRET_VARS})
    result = serve("--host", "0.0.0.0")
    assert result.exit_code == 1 and execs == []
    assert "refusing" in result.output and "URBANSOUND_API_TOKEN" in result.output


def test_serve_refuses_one_placeholder_among_real_secrets(secrets_env, execs):
    secrets_env(**{**REAL, "URBANSOUND_SECRET_KEY": "change-me-long-random-string"})
    result = serve("--host", "192.168.1.20")
    assert result.exit_code == 1 and execs == []
    assert "secret_key" in result.output and "URBANSOUND_SECRET_KEY" in result.output
    assert "URBANSOUND_API_TOKEN" not in result.output


def test_serve_with_the_allow_flag_starts_with_a_warning(secrets_env, execs):
    secrets_env(URBANSOUND_ALLOW_DEFAULT_SECRETS="true")
    result = serve("--host", "0.0.0.0", "--port", "8123")
    assert result.exit_code == 0, result.output
    assert "warning: default or placeholder" in result.output
    (argv, env), = execs
    assert "0.0.0.0:8123" in argv and env["URBANSOUND_BIND"] == "0.0.0.0:8123"


def test_serve_with_real_secrets_starts_quietly(secrets_env, execs):
    secrets_env(**REAL)
    result = serve("--host", "0.0.0.0")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output and len(execs) == 1


def test_serve_on_loopback_with_defaults_starts_with_a_warning(secrets_env, execs):
    result = serve()  # 127.0.0.1
    assert result.exit_code == 0, result.output
    assert "warning: default or placeholder api_token, admin_password, secret_key on " \
           "loopback" in result.output
    assert len(execs) == 1


def test_serve_refusal_from_a_real_process(tmp_path):
    """The command as a person runs it: one line, exit 1, no traceback, no gunicorn."""
    env = {k: v for k, v in os.environ.items()
           if k not in (*SECRET_VARS, "URBANSOUND_ALLOW_DEFAULT_SECRETS", "URBANSOUND_BIND")}
    env["URBANSOUND_STATE_DIR"] = str(tmp_path / "var")
    proc = subprocess.run([sys.executable, "-m", "src.cli", "serve", "--host", "0.0.0.0",
                           "--port", "1"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: refusing to listen on 0.0.0.0"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- urbansound up

def test_up_refuses_before_starting_anything(secrets_env, monkeypatch, tmp_path):
    from src.cli import app
    from src.cli import web as cli_web

    prepared: list[bool] = []
    monkeypatch.setattr(cli_web, "_prepare", lambda: prepared.append(True))
    result = CliRunner().invoke(app, ["up", "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "refusing to listen on 0.0.0.0" in result.output
    assert prepared == []  # nothing migrated, nothing started

    class Reached(Exception):
        pass

    def stop_here() -> None:
        raise Reached

    monkeypatch.setattr(cli_web, "_prepare", stop_here)
    result = CliRunner().invoke(app, ["up"])  # loopback: goes on
    assert "Reached" in result.output and "refusing" not in result.output, result.output


# --------------------------------------------------------------------------- the app factory

def test_app_factory_refuses_a_public_bind(secrets_env, monkeypatch):
    from web import create_app

    monkeypatch.setenv("URBANSOUND_BIND", "0.0.0.0:8000")
    with pytest.raises(DefaultSecretsError, match="URBANSOUND_ADMIN_PASSWORD"):
        create_app({"TESTING": True, "CELERY_INIT": False})


def test_app_factory_warns_about_env_example_placeholders(secrets_env, caplog):
    """The placeholders .env.example ships are caught too, not only the built-in defaults."""
    from web import create_app

    example = env_example()
    secrets_env(**{name: example[name] for name in SECRET_VARS})
    caplog.set_level(logging.WARNING)
    create_app({"TESTING": True, "CELERY_INIT": False})
    assert "default or placeholder api_token, admin_password, secret_key" in caplog.text
