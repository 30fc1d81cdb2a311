"""Answers the app never writes are JSON too: real gunicorn (the config ``urbansound serve``
uses, with its JSON-error worker) and real nginx (the stack's template) in front of it.

Shown: a 100,000-character URL, an oversized header, too many headers and a request that is
not HTTP get the API's ``{"error": {"code", "message"}}`` with the right status from gunicorn
and from nginx; nginx's ``limit_req`` answers floods of login attempts (a page) and of
mutating API calls (JSON, ``Retry-After``) before they reach a replica; no replica
answering is one 503 and a replica too slow a 504, each naming the replica and the request.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from web_helpers import TOKEN, Gunicorn, free_port, unavailable

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
LONG_PATH = "/api/v1/jobs/" + "a" * 100_000


def raw(url: str, request: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client-side checks) and read the whole answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def assert_envelope(status: int, headers: dict, body: bytes, expected: int, code: str) -> dict:
    assert status == expected, (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"], error
    return error


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from src import db

    root = tmp_path_factory.mktemp("edge-errors")
    state = root / "var"
    env = {
        "URBANSOUND_STATE_DIR": str(state), "URBANSOUND_MODELS_DIR": str(ROOT / "models"),
        "URBANSOUND_DATA_DIR": str(root / "data"), "URBANSOUND_DATABASE_URL": "",
        "URBANSOUND_BROKER_URL": "", "URBANSOUND_RESULT_BACKEND": "",
        "URBANSOUND_API_TOKEN": TOKEN, "URBANSOUND_TORCH_THREADS": "1",
        "URBANSOUND_ACCESS_LOG": "",
    }
    db.upgrade(f"sqlite:///{state / 'urbansound.db'}")
    with Gunicorn(env, root / "gunicorn.log", workers=1) as gunicorn:
        yield gunicorn


def test_gunicorn_answers_a_huge_url_in_json(server) -> None:
    r = requests.get(server.url + LONG_PATH, timeout=30)
    assert r.status_code == 414 and r.headers["Content-Type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == "uri_too_long" and "too long" in error["message"]
    # ... and the worker lives on: the next request is the app's
    assert requests.get(server.url + "/api/v1/health", timeout=30).status_code == 200


def test_gunicorn_answers_bad_headers_in_json(server) -> None:
    big = {"X-Big": "b" * 10_000}
    r = requests.get(server.url + "/api/v1/health", headers=big, timeout=30)
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    many = "".join(f"X-H{i}: {i}\r\n" for i in range(150)).encode()
    assert_envelope(*raw(server.url, b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n" + many +
                         b"\r\n"), 431, "headers_too_large")
    error = assert_envelope(*raw(server.url, b"NOT-HTTP\r\n\r\n"), 400, "bad_request")
    assert "parsed" in error["message"]
    # the app's own errors are untouched
    r = requests.get(server.url + "/api/v1/nothing-here", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


@contextmanager
def running_nginx(prefix: Path, replica_ports: list[int],
                  template: Path | None = None) -> Iterator[str]:
    """The stack's nginx, rendered from its template (or ``template``), in front of
    ``replica_ports``."""
    from src import stack

    try:
        binary = stack.find_nginx()
    except stack.StackError as exc:
        unavailable(exc.message)
    port = free_port()
    conf = stack.write_nginx_config(prefix, f"127.0.0.1:{port}", replica_ports,
                                    template=template or stack.TEMPLATE)
    proc = subprocess.Popen(stack.nginx_argv(binary, prefix, conf), stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(url + "/nginx-health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log = (prefix / "logs" / "error.log")
            proc.kill()
            pytest.fail(f"nginx did not start: {log.read_text() if log.exists() else '?'}")
        time.sleep(0.2)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def nginx(server, tmp_path_factory):
    with running_nginx(tmp_path_factory.mktemp("edge-nginx"), [server.port]) as url:
        yield url


def test_nginx_says_503_and_when_to_retry_when_no_replica_answers(tmp_path) -> None:
    """Every replica down (a port nothing listens on): nginx meets a refused connection, a
    502, and then a replica marked down, a 503; a client sees one status for both, JSON,
    with a Retry-After, on reads and writes alike."""
    with running_nginx(tmp_path / "nginx", [free_port()]) as url:
        for _ in range(5):  # past max_fails: the replica is marked down after the third
            for method, path in (("GET", "/api/v1/health"), ("POST", "/api/v1/predict")):
                r = requests.request(method, url + path, data=b"x", timeout=30)
                error = assert_envelope(r.status_code, dict(r.headers.lower_items()),
                                        r.content, 503, "unavailable")
                assert "try again" in error["message"]
                assert int(r.headers["Retry-After"]) > 0
                # which replica failed, and the id to find this request in the logs
                assert r.headers["X-Upstream"].startswith("127.0.0.1:")
                assert r.headers["X-Request-ID"]


def test_nginx_says_504_timeout_when_a_replica_is_too_slow(tmp_path) -> None:
    """A replica that takes the request and never answers (a socket that listens and reads
    nothing: the kernel accepts for it) is a timeout, not "unavailable": JSON 504 with the
    replica's address and the request id. The template's read timeouts (30 s on predict, 130 s
    elsewhere) are cut to 1 s in a copy; the routing of the error is what is under test."""
    from src import stack

    fast = re.sub(r"proxy_read_timeout \d+s;", "proxy_read_timeout 1s;",
                  stack.TEMPLATE.read_text())
    assert fast.count("proxy_read_timeout 1s;") == 2  # the server's and predict's
    template = tmp_path / "nginx.conf.template"
    template.write_text(fast)
    with socket.create_server(("127.0.0.1", 0), backlog=16) as silent:
        port = silent.getsockname()[1]
        with running_nginx(tmp_path / "nginx", [port], template) as url:
            # two requests, under max_fails (3): a third timeout would mark the replica down
            for method, path in (("POST", "/api/v1/predict"), ("GET", "/api/v1/health")):
                started = time.monotonic()
                r = requests.request(method, url + path, data=b"x", timeout=30)
                error = assert_envelope(r.status_code, dict(r.headers.lower_items()),
                                        r.content, 504, "timeout")
                assert "in time" in error["message"] and "analyze" in error["message"]
                assert r.headers["X-Upstream"] == f"127.0.0.1:{port}"
                assert r.headers["X-Request-ID"]
                assert time.monotonic() - started < 10  # the cut timeout, not a default


def test_nginx_answers_a_huge_url_and_headers_in_json(nginx) -> None:
    r = requests.get(nginx + LONG_PATH, timeout=30)
    assert r.status_code == 414 and r.headers["Content-Type"] == "application/json"
    assert r.json()["error"]["code"] == "uri_too_long"
    r = requests.get(nginx + "/api/v1/health", headers={"X-Big": "b" * 20_000}, timeout=30)
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    assert_envelope(*raw(nginx, b"NOT HTTP AT ALL\r\n\r\n"), 400, "bad_request")
    assert requests.get(nginx + "/api/v1/health", timeout=30).status_code == 200


def test_nginx_limits_floods_of_mutating_calls(nginx) -> None:
    statuses = [requests.post(nginx + "/api/v1/retrain", json={}, timeout=30)
                for _ in range(40)]
    codes = [r.status_code for r in statuses]
    assert 429 not in codes[:30] and codes[-1] == 429, codes
    last = statuses[-1]
    assert last.json()["error"]["code"] == "too_many_requests"
    assert int(last.headers["Retry-After"]) > 0
    assert last.headers["X-Request-ID"]  # nginx answered alone, and still names the request
    # predictions and reads are not part of it
    assert requests.post(nginx + "/api/v1/predict", timeout=30).status_code == 400
    assert requests.get(nginx + "/api/v1/models", timeout=30).status_code == 200


def test_nginx_limits_login_attempts_with_a_page(nginx) -> None:
    codes = [requests.post(nginx + "/login", data={}, timeout=30).status_code
             for _ in range(15)]
    assert 429 not in codes[:11] and codes[-1] == 429, codes
    r = requests.post(nginx + "/login", data={}, timeout=30)
    assert r.status_code == 429 and r.headers["Content-Type"].startswith("text/html")
    assert "Too many login attempts" in r.text and int(r.headers["Retry-After"]) > 0
    assert r.headers["X-Request-ID"]
    assert requests.get(nginx + "/login", timeout=30).status_code == 200  # the form still shows
