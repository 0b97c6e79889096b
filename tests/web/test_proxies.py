"""PORTAL_TRUSTED_PROXIES: forwarded client addresses reach the audit trail and the rate limits
only from trusted proxies; a client's own X-Forwarded-For is ignored (issue 10 item 6)."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask, request
from sqlalchemy import select
from werkzeug.test import TestResponse

from portal.extensions import db
from portal.models import AuditEvent
from tests.browser_client import Browser

PROXY = "10.0.0.1"
CLIENT_A, CLIENT_B = "203.0.113.7", "198.51.100.20"
SIGNIN_LIMIT = 20  # per address per minute (portal/auth/views.py)


def fail_signin(browser: Browser, n: int, peer: str, forwarded: str | None) -> TestResponse:
    headers = {"X-Forwarded-For": forwarded} if forwarded is not None else {}
    return browser.submit(
        "/signin",
        {"email": f"nobody{n}@example.org", "password": "x" * 12},
        headers=headers,
        environ_base={"REMOTE_ADDR": peer},
    )


def signin_addresses(app: Flask) -> list[str | None]:
    with app.app_context():
        return list(
            db.session.scalars(
                select(AuditEvent.client_ip)
                .where(AuditEvent.action == "auth.signin.failed")
                .order_by(AuditEvent.seq)
            )
        )


@pytest.fixture
def proxied(make_app: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Return a factory of apps started with PORTAL_TRUSTED_PROXIES set to its argument."""

    def factory(trusted: str) -> Flask:
        monkeypatch.setenv("PORTAL_TRUSTED_PROXIES", trusted)
        return make_app()

    return factory


@pytest.mark.parametrize("trusted", ["1", PROXY, "10.0.0.0/24"])
def test_audit_records_the_forwarded_client(proxied: Any, trusted: str) -> None:
    app = proxied(trusted)
    assert fail_signin(Browser(app), 0, PROXY, CLIENT_A).status_code == 401
    assert signin_addresses(app) == [CLIENT_A]


@pytest.mark.parametrize("trusted", ["1", PROXY])
def test_forwarded_clients_get_separate_rate_limit_buckets(proxied: Any, trusted: str) -> None:
    app = proxied(trusted)
    browser = Browser(app)
    statuses = [
        fail_signin(browser, i, PROXY, CLIENT_A).status_code for i in range(SIGNIN_LIMIT + 1)
    ]
    assert statuses[-1] == 429
    assert fail_signin(browser, 99, PROXY, CLIENT_B).status_code == 401


def test_without_the_setting_a_spoofed_forwarded_for_is_ignored(app: Flask) -> None:
    browser = Browser(app)
    statuses = [
        fail_signin(browser, i, "192.0.2.50", f"203.0.113.{i}").status_code
        for i in range(SIGNIN_LIMIT + 1)
    ]
    assert statuses[-1] == 429  # a new forged address per attempt does not escape the limit
    assert set(signin_addresses(app)) == {"192.0.2.50"}


def test_untrusted_peer_cannot_forward(proxied: Any) -> None:
    app = proxied(PROXY)
    browser = Browser(app)
    statuses = [
        fail_signin(browser, i, "192.0.2.50", f"203.0.113.{i}").status_code
        for i in range(SIGNIN_LIMIT + 1)
    ]
    assert statuses[-1] == 429
    assert set(signin_addresses(app)) == {"192.0.2.50"}


def test_client_cannot_prepend_addresses_past_a_trusted_proxy(proxied: Any) -> None:
    app = proxied("10.0.0.0/24")
    browser = Browser(app)
    # The client sent "X-Forwarded-For: 10.0.0.9, 1.2.3.4"; our proxies appended what they saw.
    fail_signin(browser, 0, PROXY, f"10.0.0.9, 1.2.3.4, {CLIENT_A}, 10.0.0.2")
    fail_signin(browser, 1, PROXY, "10.0.0.9, 10.0.0.2")  # all trusted: the first one
    assert signin_addresses(app) == [CLIENT_A, "10.0.0.9"]


@pytest.mark.parametrize("forwarded", ["not-an-address", "x" * 300, "", " , "])
def test_junk_forwarded_for_keeps_the_peer_address(proxied: Any, forwarded: str) -> None:
    app = proxied("1")
    assert fail_signin(Browser(app), 0, PROXY, forwarded).status_code == 401
    assert signin_addresses(app) == [PROXY]


def test_scheme_and_host_come_from_a_trusted_proxy_only(proxied: Any) -> None:
    app = proxied(PROXY)

    @app.get("/_where")
    def where() -> dict[str, str | None]:
        return {"scheme": request.scheme, "host": request.host, "addr": request.remote_addr}

    client = app.test_client()
    headers = {
        "X-Forwarded-For": CLIENT_A,
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "portal.example.org",
    }
    trusted = client.get("/_where", headers=headers, environ_base={"REMOTE_ADDR": PROXY})
    assert trusted.get_json() == {"scheme": "https", "host": "portal.example.org", "addr": CLIENT_A}
    spoofed = client.get("/_where", headers=headers, environ_base={"REMOTE_ADDR": CLIENT_B})
    assert spoofed.get_json() == {"scheme": "http", "host": "localhost", "addr": CLIENT_B}


def test_an_ipv4_mapped_peer_is_the_trusted_proxy(proxied: Any) -> None:
    """A dual-stack listener reports the proxy as ::ffff:a.b.c.d; it is still trusted."""
    app = proxied(PROXY)
    assert fail_signin(Browser(app), 0, f"::ffff:{PROXY}", CLIENT_A).status_code == 401
    assert signin_addresses(app) == [CLIENT_A]
