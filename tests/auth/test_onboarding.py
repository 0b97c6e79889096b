"""Invites, enrolment, password rules, resets and admin resets, through HTTP."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from portal.audit import NO_REQUEST, SYSTEM
from portal.database import travel
from portal.extensions import db
from portal.models import AuditEvent, Notification, User
from portal.services import admin
from tests.browser_client import Browser, current_code, enrolled_user, next_code, outbox_url

PASSWORD = "Correct horse battery staple 42"
NEW_PASSWORD = "Velvet lighthouse quarrel 77"


@pytest.fixture(autouse=True)
def real_time() -> Any:
    yield
    travel(None)


def invite(app: Flask, email: str = "nina@example.org", name: str = "Nina Newcomer") -> str:
    with app.app_context():
        admin.invite(
            db.session, role="staff", email=email, name=name, actor=SYSTEM, meta=NO_REQUEST
        )
        db.session.commit()
    return outbox_url(app, "invite")


def accept(browser: Browser, link: str, password: str = PASSWORD) -> Any:
    assert browser.get(link).status_code == 200
    to_welcome = browser.submit(link)
    assert to_welcome.location == "/welcome"
    return browser.submit("/welcome", {"password": password, "confirm": password})


def test_invite_to_enrolment_to_signed_in(app: Flask) -> None:
    link = invite(app)
    browser = Browser(app)
    assert accept(browser, link).location == "/mfa/enrol"
    page = browser.get("/mfa/enrol").get_data(as_text=True)
    secret = page.split('id="totp-secret">')[1].split("<")[0]
    done = browser.submit("/mfa/enrol", {"code": current_code(secret)})
    assert done.status_code == 200
    assert "shown only now" in done.get_data(as_text=True)
    assert browser.get("/account").status_code == 200
    with app.app_context():
        acts = set(db.session.scalars(select(AuditEvent.action)))
    assert {"user.create", "auth.invite.accept", "auth.password.set", "auth.mfa.enrol"} <= acts


def test_enrolment_code_cannot_sign_in_again(app: Flask) -> None:
    browser = Browser(app)
    accept(browser, invite(app))
    secret = (
        browser.get("/mfa/enrol").get_data(as_text=True).split('id="totp-secret">')[1].split("<")[0]
    )
    code = current_code(secret)
    browser.submit("/mfa/enrol", {"code": code})
    again = Browser(app).sign_in("nina@example.org", PASSWORD, code=code)
    assert again.status_code == 200


def test_wrong_enrolment_code_keeps_secret_inactive(app: Flask) -> None:
    browser = Browser(app)
    accept(browser, invite(app))
    wrong = browser.submit("/mfa/enrol", {"code": "000000"})
    assert "not right" in wrong.get_data(as_text=True)
    with app.app_context():
        user = db.session.scalar(select(User).where(User.email == "nina@example.org"))
        assert user.totp_enabled_at is None


@pytest.mark.parametrize(
    ("password", "reason"),
    [
        ("short pw 1", "at least 12"),
        ("password1234", "too easy to guess"),
        ("qwertyuiop123", "too easy to guess"),
        ("nina-rocks-the-house-99", "email"),
        ("Newcomer forever and ever 9", "name"),
    ],
)
def test_weak_passwords_refused(app: Flask, password: str, reason: str) -> None:
    browser = Browser(app)
    response = accept(browser, invite(app), password)
    assert response.status_code == 200
    assert reason in response.get_data(as_text=True).lower()
    assert password not in response.get_data(as_text=True)


def test_breached_password_blocklist(make_app: Any, tmp_path: Path) -> None:
    listed = "Marmalade sunrise tortoise 41"
    blocklist = tmp_path / "breached.txt"
    blocklist.write_text(f"hunter2\n{listed}\n")
    app = make_app(PASSWORD_BLOCKLIST=str(blocklist))
    browser = Browser(app)
    response = accept(browser, invite(app), listed)
    assert "breached or common" in response.get_data(as_text=True)
    assert (
        accept(Browser(app), invite(app, "o@example.org", "Olga Other"), NEW_PASSWORD).location
        == "/mfa/enrol"
    )


def test_invite_link_single_use(app: Flask) -> None:
    link = invite(app)
    accept(Browser(app), link)
    late = Browser(app)
    assert late.get(link).status_code == 404


def test_invite_link_expires(app: Flask) -> None:
    link = invite(app)
    travel(timedelta(hours=73))
    assert Browser(app).get(link).status_code == 404


def test_get_of_invite_link_changes_nothing(app: Flask) -> None:
    link = invite(app)
    for _ in range(5):
        assert Browser(app).get(link).status_code == 200
    assert accept(Browser(app), link).location == "/mfa/enrol"


def test_reset_needs_second_factor_and_is_single_use(app: Flask) -> None:
    _, secret, _ = enrolled_user(app)
    browser = Browser(app)
    sent = browser.submit("/reset", {"email": "sam@example.org"})
    assert "If an account uses that address" in sent.get_data(as_text=True)
    link = outbox_url(app, "reset")
    assert browser.submit(link).location == "/reset/new"
    no_code = browser.submit(
        "/reset/new", {"password": NEW_PASSWORD, "confirm": NEW_PASSWORD, "code": "123456"}
    )
    assert "not right" in no_code.get_data(as_text=True)
    done = browser.submit(
        "/reset/new", {"password": NEW_PASSWORD, "confirm": NEW_PASSWORD, "code": next_code(secret)}
    )
    assert done.location == "/signin"
    with app.app_context():  # ASVS 2.2.3: the holder is told, with no personal details
        kinds = db.session.scalars(select(Notification.kind)).all()
    assert kinds.count("password_changed") == 1
    assert Browser(app).get(link).status_code == 404
    travel(timedelta(minutes=2))
    assert Browser(app).sign_in("sam@example.org", NEW_PASSWORD, secret).status_code == 302


def test_two_tabs_on_one_reset_link_change_the_password_once(app: Flask) -> None:
    _, secret, _ = enrolled_user(app)
    Browser(app).submit("/reset", {"email": "sam@example.org"})
    link = outbox_url(app, "reset")
    first, second = Browser(app), Browser(app)
    assert first.submit(link).location == "/reset/new"
    assert second.submit(link).location == "/reset/new"
    open_form = second.token("/reset/new")  # the second tab shows the form, then waits
    done = first.submit(
        "/reset/new", {"password": NEW_PASSWORD, "confirm": NEW_PASSWORD, "code": next_code(secret)}
    )
    assert done.location == "/signin"
    travel(timedelta(seconds=31))
    other = "Quartz meadow lantern ferry 58"
    late = second.client.post(
        "/reset/new",
        data={
            "csrf_token": open_form,
            "password": other,
            "confirm": other,
            "code": next_code(secret),
        },
    )
    assert late.status_code == 404
    travel(timedelta(minutes=2))
    assert Browser(app).sign_in("sam@example.org", other, secret).status_code != 302
    assert Browser(app).sign_in("sam@example.org", NEW_PASSWORD, secret).status_code == 302


def test_reset_request_for_unknown_email_answers_the_same(app: Flask) -> None:
    enrolled_user(app)
    known = Browser(app).submit("/reset", {"email": "sam@example.org"})
    unknown = Browser(app).submit("/reset", {"email": "nobody@example.org"})
    assert known.get_data(as_text=True) == unknown.get_data(as_text=True)
    with app.app_context():
        assert db.session.query(Notification).filter_by(kind="reset").count() == 1


def test_reset_link_expires(app: Flask) -> None:
    enrolled_user(app)
    Browser(app).submit("/reset", {"email": "sam@example.org"})
    link = outbox_url(app, "reset")
    travel(timedelta(minutes=61))
    assert Browser(app).get(link).status_code == 404


def test_admin_reset_of_lost_phone_and_codes(app: Flask) -> None:
    user, secret, _ = enrolled_user(app)
    old = Browser(app)
    old.sign_in("sam@example.org", PASSWORD, secret)
    with app.app_context():
        admin.reset_mfa(db.session, db.session.get(User, user.id), actor=SYSTEM, meta=NO_REQUEST)
        db.session.commit()
    assert old.get("/account").status_code == 302  # sessions ended
    assert Browser(app).sign_in("sam@example.org", PASSWORD, secret).status_code == 401
    browser = Browser(app)
    assert accept(browser, outbox_url(app, "invite"), NEW_PASSWORD).location == "/mfa/enrol"
    with app.app_context():
        assert db.session.query(AuditEvent).filter_by(action="user.mfa.reset").count() == 1


def test_password_change_ends_other_sessions(app: Flask) -> None:
    _, secret, _ = enrolled_user(app)
    other = Browser(app)
    other.sign_in("sam@example.org", PASSWORD, secret)
    mine = Browser(app)
    mine.sign_in("sam@example.org", PASSWORD, code=next_code(secret))
    changed = mine.submit(
        "/account/password",
        {"current_password": PASSWORD, "password": NEW_PASSWORD, "confirm": NEW_PASSWORD},
    )
    assert changed.location == "/account"
    assert mine.get("/account").status_code == 200
    assert other.get("/account").status_code == 302


def test_admin_pages_invite_and_disable(app: Flask) -> None:
    _, secret, _ = enrolled_user(app, role="admin", email="al@example.org", name="Al Admin")
    browser = Browser(app)
    browser.sign_in("al@example.org", PASSWORD, secret)
    sent = browser.submit(
        "/admin/users/new", {"role": "auditor", "email": "aud@example.org", "name": "Ada Auditor"}
    )
    assert sent.location == "/admin/users"
    duplicate = browser.submit(
        "/admin/users/new", {"role": "auditor", "email": "aud@example.org", "name": "Ada"}
    )
    assert "already exists" in duplicate.get_data(as_text=True)
    with app.app_context():
        target = db.session.scalar(select(User).where(User.email == "aud@example.org"))
        public_id = target.public_id
    listing = browser.get("/admin/users").get_data(as_text=True)
    assert "Ada Auditor" in listing
    disabled = browser.submit(f"/admin/users/{public_id}/disable", form_page="/admin/users")
    assert disabled.location == "/admin/users"
    with app.app_context():
        assert db.session.get(User, target.id).disabled


@pytest.mark.parametrize(
    ("org_name", "password"),
    [
        (None, "Pickup Portal forever 2024"),  # the product's name
        (None, "P1ckupPorta1 lantern 77"),
        (None, "Pickup Portal Demo Clinic 1987"),  # the embedded default organisation
        ("Riverside Family Practice", "riverside-family-practice-77"),
    ],
)
def test_service_and_organisation_names_refused(
    make_app: Any, org_name: str | None, password: str
) -> None:
    app = make_app(**({"ORG_NAME": org_name} if org_name else {}))
    response = accept(Browser(app), invite(app), password)
    assert response.status_code == 200
    assert "name of this service or of the organisation" in response.get_data(as_text=True)
    assert password not in response.get_data(as_text=True)
    with app.app_context():
        user = db.session.scalar(select(User).where(User.email == "nina@example.org"))
        assert user is not None
        assert user.password_hash is None
