"""The admin's key page, through HTTP: it needs a code from the last five minutes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from flask import Flask

from portal.database import travel
from tests.browser_client import Browser, current_code, enrolled_user, next_code

PASSWORD = "Correct horse battery staple 42"


@pytest.fixture(autouse=True)
def real_time() -> Any:
    yield
    travel(None)


def wrong_code(secret: str) -> str:
    near = {current_code(secret, offset) for offset in range(-2, 3)}
    return next(c for c in (f"{n:06d}" for n in range(10**6)) if c not in near)


@pytest.fixture
def admin(app: Flask) -> tuple[Browser, str]:
    _, secret, _ = enrolled_user(app, role="admin", email="al@example.org", name="Al Admin")
    browser = Browser(app)
    assert browser.sign_in("al@example.org", PASSWORD, secret).status_code == 302
    return browser, secret


def test_key_page_shown_just_after_sign_in(admin: tuple[Browser, str]) -> None:
    browser, _ = admin
    assert browser.get("/admin/keys").status_code == 200


def test_key_page_needs_fresh_authentication(admin: tuple[Browser, str]) -> None:
    browser, secret = admin
    travel(timedelta(minutes=6))
    stale = browser.get("/admin/keys")
    assert stale.status_code == 302
    assert stale.location.startswith("/reauth")
    assert "Key-encryption keys" not in stale.get_data(as_text=True)
    refused = browser.submit(stale.location, {"code": wrong_code(secret)})
    assert refused.status_code == 200
    assert browser.get("/admin/keys").status_code == 302  # a wrong code proves nothing
    proved = browser.submit(stale.location, {"code": next_code(secret)})
    assert proved.location == "/admin/keys"
    assert browser.get("/admin/keys").status_code == 200


def test_key_page_refused_to_other_roles(app: Flask) -> None:
    _, secret, _ = enrolled_user(app)
    browser = Browser(app)
    browser.sign_in("sam@example.org", PASSWORD, secret)
    assert browser.get("/admin/keys").status_code == 403
