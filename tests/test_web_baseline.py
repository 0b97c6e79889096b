"""Headers on every response, cookies, CSRF, error pages without request data, health."""

from __future__ import annotations

import json
import logging
import re

import pytest
from flask import Flask, abort
from flask.testing import FlaskClient

from tests.support.forms import csrf_token

PHI_LIKE = "Jane-Doe-1984-03-07-HIV-result"


@pytest.mark.parametrize(
    "path", ["/signin", "/healthz", "/readyz", "/nowhere", "/static/css/portal.css"]
)
def test_security_headers_on_every_response(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    csp = response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert "http" not in csp  # no third-party origin
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "Strict-Transport-Security" not in response.headers  # plain http base URL
    assert response.headers["X-Request-ID"]


def test_hsts_and_secure_cookie_behind_https(make_app: object) -> None:
    app = make_app(BASE_URL="https://portal.example.org")  # type: ignore[operator]
    client = app.test_client()
    response = client.get("/signin", base_url="https://portal.example.org")
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    cookie = response.headers["Set-Cookie"]
    assert "Secure" in cookie
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert cookie.startswith("__Host-")


def test_session_cookie_flags_on_http(client: FlaskClient) -> None:
    cookie = client.get("/signin").headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie


def test_pages_have_no_inline_script(client: FlaskClient) -> None:
    body = client.get("/signin").get_data(as_text=True)
    assert "<script>" not in body
    assert " on" + "click=" not in body
    assert "Email" in body
    assert "Password" in body


def test_post_without_csrf_token_is_refused(client: FlaskClient) -> None:
    response = client.post("/signin", data={"email": "a@example.org", "password": "x" * 12})
    assert response.status_code == 400
    assert "expired" in response.get_data(as_text=True)


def test_post_with_csrf_token_is_accepted(client: FlaskClient) -> None:
    token = csrf_token(client, "/signin")
    response = client.post(
        "/signin", data={"csrf_token": token, "email": "a@example.org", "password": "x" * 12}
    )
    assert response.status_code == 401  # the form was accepted; the credentials were not
    assert "not right" in response.get_data(as_text=True)


def test_forms_work_behind_https_without_a_referer(make_app: object) -> None:
    # Browsers send no Referer (our Referrer-Policy is no-referrer) and Origin: null; a
    # Referer check on HTTPS would refuse every form (found through deploy/nginx).
    app = make_app(BASE_URL="https://portal.example.org")  # type: ignore[operator]
    client = app.test_client()
    https = "https://portal.example.org"
    token = csrf_token_at(client, "/signin", https)
    response = client.post(
        "/signin",
        base_url=https,
        headers={"Origin": "null"},
        data={"csrf_token": token, "email": "a@example.org", "password": "x" * 12},
    )
    assert response.status_code == 401  # past CSRF; the credentials were not right
    refused = client.post(
        "/signin", base_url=https, data={"email": "a@example.org", "password": "x" * 12}
    )
    assert refused.status_code == 400  # still no form without its token


def csrf_token_at(client: FlaskClient, path: str, base_url: str) -> str:
    """The CSRF token of the form on ``path`` fetched from ``base_url``."""
    page = client.get(path, base_url=base_url).get_data(as_text=True)
    found = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page)
    assert found, page[:300]
    return found.group(1)


@pytest.fixture
def faulty_app(app: Flask) -> Flask:
    @app.get("/boom/<value>")
    def boom(value: str) -> str:
        raise RuntimeError(f"database said no for patient {value}")

    @app.get("/teapot-forbidden")
    def forbidden() -> str:
        abort(403)

    @app.post("/upload-limit")
    def upload() -> str:
        from flask import request

        return str(len(request.get_data()))

    app.config["MAX_CONTENT_LENGTH"] = 1000
    return app


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", f"/nowhere/{PHI_LIKE}?dob={PHI_LIKE}", 404),
        ("GET", f"/boom/{PHI_LIKE}", 500),
        ("GET", "/teapot-forbidden", 403),
        ("DELETE", "/signin", 405),
        ("POST", "/upload-limit", 413),
    ],
)
def test_error_pages_carry_no_request_data(
    faulty_app: Flask, method: str, path: str, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    faulty_app.config["WTF_CSRF_ENABLED"] = False
    client = faulty_app.test_client()
    with caplog.at_level(logging.INFO):
        response = client.open(path, method=method, data=PHI_LIKE * 100)
    body = response.get_data(as_text=True)
    assert response.status_code == status
    assert PHI_LIKE not in body
    assert "Traceback" not in body
    assert "RuntimeError" not in body
    assert PHI_LIKE not in caplog.text


def test_error_page_bad_request(client: FlaskClient) -> None:
    response = client.post("/signin", data={"csrf_token": "forged"})
    assert response.status_code == 400
    assert "<h1>" in response.get_data(as_text=True)


def test_rate_limited_page_is_429_page(app: Flask) -> None:
    from portal.extensions import limiter

    @app.get("/limited")
    @limiter.limit("1/minute")
    def limited() -> str:
        return "ok"

    client = app.test_client()
    assert client.get("/limited").status_code == 200
    response = client.get("/limited")
    assert response.status_code == 429
    assert "Too many attempts" in response.get_data(as_text=True)


def test_healthz(client: FlaskClient) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_readyz_ok_at_head(client: FlaskClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json()["database"] == "ok"


def test_readyz_503_when_migrations_pending(make_app: object, tmp_path: object) -> None:
    app = make_app(DATABASE_URL=f"sqlite:///{tmp_path}/empty.db")  # type: ignore[operator]
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["database"] == "migrations pending"


def test_readyz_503_when_database_unreachable(make_app: object) -> None:
    app = make_app(  # type: ignore[operator]
        DATABASE_URL="postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2"
    )
    assert app.test_client().get("/readyz").status_code == 503


def test_logs_are_json_lines_with_request_id_and_no_query(
    client: FlaskClient, capfd: pytest.CaptureFixture[str]
) -> None:
    client.get(f"/signin?email={PHI_LIKE}", headers={"X-Request-ID": "req-12345678"})
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    request_lines = [e for e in entries if e.get("message") == "request"]
    assert request_lines
    assert request_lines[-1]["request_id"] == "req-12345678"
    assert request_lines[-1]["rule"] == "/signin"
    assert all(PHI_LIKE not in line for line in lines)
