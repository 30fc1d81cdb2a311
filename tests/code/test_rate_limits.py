"""Rate limits and lock-out (Flask-Limiter, ``web/security.py``), on the app itself.

Shown: wrong tokens and wrong passwords lock the guessing address out (429, ``Retry-After``,
the JSON envelope for the API, a readable page for people) while another address with the
right token is served; requests without credentials are not counted; the client address is
taken from ``X-Forwarded-For`` only when the peer is a trusted proxy; mutating endpoints are
limited per address and predictions are not; the counters are shared through Redis (as the
stack's workers and replicas share them) and Redis being down fails no request.
"""

from __future__ import annotations

import uuid

import pytest
from web_helpers import PASSWORD, TOKEN

WRONG = {"Authorization": "Bearer not-the-token"}
RIGHT = {"Authorization": f"Bearer {TOKEN}"}
FEEDBACK = "/api/v1/predictions/does-not-exist/feedback"


def limited_app(make_app, monkeypatch, **env: str):
    for key, value in env.items():
        monkeypatch.setenv(f"URBANSOUND_{key.upper()}", value)
    return make_app()


def from_ip(ip: str) -> dict:
    return {"environ_base": {"REMOTE_ADDR": ip}}


def assert_json_429(response) -> int:
    assert response.status_code == 429, response.get_data(as_text=True)[:300]
    body = response.get_json()
    assert body["error"]["code"] == "too_many_requests"
    assert "try again in" in body["error"]["message"]
    retry = int(response.headers["Retry-After"])
    assert 1 <= retry <= 60
    return retry


def test_wrong_tokens_lock_the_address_out(make_app, monkeypatch) -> None:
    client = limited_app(make_app, monkeypatch).test_client()  # default: 10/minute
    statuses = [client.post(FEEDBACK, json={"label": "siren"}, headers=WRONG,
                            **from_ip("10.1.1.1")).status_code for _ in range(15)]
    assert statuses[:10] == [401] * 10 and statuses[10:] == [429] * 5, statuses
    locked = client.post(FEEDBACK, json={"label": "siren"}, headers=WRONG, **from_ip("10.1.1.1"))
    assert_json_429(locked)
    assert "failed sign-in attempts" in locked.get_json()["error"]["message"]
    # the right token from the locked-out address is refused too: guessing stops paying ...
    assert client.post(FEEDBACK, json={"label": "siren"}, headers=RIGHT,
                       **from_ip("10.1.1.1")).status_code == 429
    # ... but someone else's failures do not lock out another address
    other = client.post(FEEDBACK, json={"label": "siren"}, headers=RIGHT, **from_ip("10.2.2.2"))
    assert other.status_code not in (401, 429), other.status_code
    # and reads without credentials still work for the locked-out address
    assert client.get("/api/v1/health", **from_ip("10.1.1.1")).status_code == 200


def test_missing_credentials_are_not_counted(make_app, monkeypatch) -> None:
    client = limited_app(make_app, monkeypatch, rate_limit_auth_failures="3/minute").test_client()
    statuses = {client.post(FEEDBACK, json={"label": "siren"}).status_code for _ in range(20)}
    assert statuses == {401}
    ok = client.post(FEEDBACK, json={"label": "siren"}, headers=RIGHT)
    assert ok.status_code not in (401, 429)


def test_wrong_passwords_get_a_readable_429_page(make_app, monkeypatch) -> None:
    client = limited_app(make_app, monkeypatch, rate_limit_auth_failures="5/minute").test_client()
    statuses = [client.post("/login", data={"password": "guess"}).status_code
                for _ in range(8)]
    assert statuses == [401] * 5 + [429] * 3, statuses
    page = client.post("/login", data={"password": PASSWORD})  # locked out, even when right
    assert page.status_code == 429 and page.mimetype == "text/html"
    assert "Too many failed sign-in attempts" in page.get_data(as_text=True)
    assert 1 <= int(page.headers["Retry-After"]) <= 60
    assert client.get("/login").status_code == 200  # the form itself is still shown
    elsewhere = client.post("/login", data={"password": PASSWORD}, **from_ip("10.3.3.3"))
    assert elsewhere.status_code == 302


def test_forwarded_for_is_trusted_only_from_the_proxy(make_app, monkeypatch) -> None:
    client = limited_app(make_app, monkeypatch, rate_limit_auth_failures="3/minute").test_client()
    # Behind nginx (peer 127.0.0.1, trusted by default): the address nginx appended is the key.
    for _ in range(3):
        r = client.post(FEEDBACK, json={"label": "siren"}, headers={
            **WRONG, "X-Forwarded-For": "198.51.100.1, 203.0.113.9"})
        assert r.status_code == 401
    r = client.post(FEEDBACK, json={"label": "siren"}, headers={
        **WRONG, "X-Forwarded-For": "203.0.113.9"})
    assert_json_429(r)
    # a client cannot escape by writing its own X-Forwarded-For in front of nginx's entry
    r = client.post(FEEDBACK, json={"label": "siren"}, headers={
        **RIGHT, "X-Forwarded-For": "192.0.2.77, 203.0.113.9"})
    assert r.status_code == 429
    r = client.post(FEEDBACK, json={"label": "siren"}, headers={
        **RIGHT, "X-Forwarded-For": "203.0.113.10"})
    assert r.status_code not in (401, 429)
    # A client reaching the app directly (not a trusted proxy): its header is ignored.
    for i in range(3):
        r = client.post(FEEDBACK, json={"label": "siren"}, headers={
            **WRONG, "X-Forwarded-For": f"192.0.2.{i}"}, **from_ip("10.4.4.4"))
        assert r.status_code == 401
    r = client.post(FEEDBACK, json={"label": "siren"}, headers={
        **WRONG, "X-Forwarded-For": "192.0.2.200"}, **from_ip("10.4.4.4"))
    assert r.status_code == 429


def test_mutating_calls_are_limited_and_predictions_are_not(make_app, monkeypatch) -> None:
    client = limited_app(make_app, monkeypatch, rate_limit_mutating="3/minute").test_client()
    statuses = [client.post(FEEDBACK, json={"label": "siren"}, headers=RIGHT).status_code
                for _ in range(4)]
    assert 429 not in statuses[:3] and statuses[3] == 429, statuses
    retry = assert_json_429(client.post(FEEDBACK, json={"label": "siren"}, headers=RIGHT))
    assert retry <= 60
    # per endpoint and per address
    assert client.post("/api/v1/retrain", data="x", headers=RIGHT).status_code != 429
    assert client.post(FEEDBACK, json={"label": "siren"}, headers=RIGHT,
                       **from_ip("10.5.5.5")).status_code != 429
    # predictions (open POSTs) and reads are not limited
    for _ in range(6):
        assert client.post("/api/v1/predict").status_code == 400
        assert client.get("/api/v1/models").status_code == 200


def test_which_endpoints_count_as_mutating(app) -> None:
    from web.security import is_mutating

    found = set()
    for rule in app.url_map.iter_rules():
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            path = rule.rule.replace("<", "").replace(">", "").replace("int:", "")
            with app.test_request_context(path, method=method):
                from flask import request

                request.url_rule, request.view_args = rule, {}
                request.routing_exception = None
                if is_mutating():
                    found.add(rule.endpoint)
    assert {"api.create_upload", "api.retrain", "api.activate", "api.feedback",
            "ui.upload_page", "ui.retrain_page", "ui.activate_page",
            "ui.feedback_page"} <= found, found
    assert not found & {"api.predict", "ui.predict_page", "ui.login", "ui.logout",
                        "api.get_job", "api.list_models"}, found


def test_limits_can_be_switched_off(make_app, monkeypatch) -> None:
    client = limited_app(make_app, monkeypatch, rate_limits="false",
                         rate_limit_auth_failures="2/minute").test_client()
    statuses = {client.post(FEEDBACK, json={"label": "siren"}, headers=WRONG).status_code
                for _ in range(10)}
    assert statuses == {401}


def test_storage_follows_the_broker() -> None:
    from pydantic import ValidationError

    from src.settings import Settings

    assert Settings(broker_url="").rate_limit_storage_uri == "memory://"
    assert Settings(broker_url="redis://redis:6379/0").rate_limit_storage_uri == \
        "redis://redis:6379/0"
    assert Settings(broker_url="redis://redis:6379/0",
                    rate_limit_storage="memory://").rate_limit_storage_uri == "memory://"
    with pytest.raises(ValidationError, match="rate_limit_mutating"):
        Settings(rate_limit_mutating="lots")


def redis_url() -> str:
    import redis
    from web_helpers import unavailable

    url = "redis://127.0.0.1:6379/0"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        unavailable(f"Redis at {url}: {exc}")
    return url


def test_workers_share_the_counters_through_redis(make_app, monkeypatch) -> None:
    """Two apps (two gunicorn workers, or two replicas) on the same Redis: failures seen by
    one lock the address out of the other."""
    url = redis_url()
    monkeypatch.setenv("URBANSOUND_RATE_LIMIT_STORAGE", url)
    monkeypatch.setenv("URBANSOUND_RATE_LIMIT_AUTH_FAILURES", "4/minute")
    ip = f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.7"  # fresh counters each run
    one, two = make_app().test_client(), make_app().test_client()
    for client in (one, two, one, two):
        assert client.post(FEEDBACK, json={}, headers=WRONG, **from_ip(ip)).status_code == 401
    assert_json_429(one.post(FEEDBACK, json={}, headers=WRONG, **from_ip(ip)))
    assert_json_429(two.post(FEEDBACK, json={}, headers=WRONG, **from_ip(ip)))


def test_redis_down_fails_no_request(make_app, monkeypatch) -> None:
    monkeypatch.setenv("URBANSOUND_RATE_LIMIT_STORAGE", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("URBANSOUND_RATE_LIMIT_AUTH_FAILURES", "3/minute")
    client = make_app().test_client()
    statuses = [client.post(FEEDBACK, json={}, headers=WRONG).status_code for _ in range(5)]
    # answered, never a 500; the limits still hold, from memory
    assert statuses == [401, 401, 401, 429, 429], statuses
    assert client.get("/api/v1/health").status_code == 200
