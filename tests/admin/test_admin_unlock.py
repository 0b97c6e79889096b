"""The 100-failure lock and its recourse, through HTTP: one PHI-free notice to the holder,
a "Locked accounts" list that finds patients too, and an audited admin unlock that keeps
the password and authenticator. The attacker's paths first.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from notifier import phi, render
from portal.database import travel
from portal.extensions import db
from portal.models import AuditEvent, Notification, User
from portal.security import passwords
from portal.services import signin
from tests.browser_client import Browser, current_code, enrolled_user, next_code, outbox_url
from tests.factories import PATIENT_NAME, PHI_STRINGS

PASSWORD = "Correct horse battery staple 42"
NEW_PASSWORD = "Velvet lighthouse quarrel 77"
WRONG = "Wrong password " * 2
PATIENT_EMAIL = "zq@example.org"
ADMIN_EMAIL = "al@example.org"
PAST_THE_PAUSE = timedelta(seconds=signin.MAX_DELAY_SECONDS + 60)
_URLS = re.compile(r'(?:href|action)="([^"]*)"')


@pytest.fixture(autouse=True)
def real_time() -> Any:
    yield
    travel(None)


@pytest.fixture
def patient(app: Flask) -> tuple[User, str, list[str]]:
    """An enrolled patient with the recognisable name (so a leak would show)."""
    return enrolled_user(app, role="patient", email=PATIENT_EMAIL, name=PATIENT_NAME)


def from_address(app: Flask, address: str) -> Browser:
    browser = Browser(app)
    browser.client.environ_base["REMOTE_ADDR"] = address
    return browser


def account(app: Flask, email: str = PATIENT_EMAIL) -> User:
    with app.app_context():
        user = db.session.scalar(select(User).where(User.email == email))
        assert user is not None
        db.session.expunge(user)
        return user


def lock(app: Flask, email: str = PATIENT_EMAIL) -> None:
    """The attacker's last two wrong passwords of a hundred (the first 98 are set in the row:
    spread over a day by the pause), each after the pause; the clock stays past it."""
    with app.app_context():
        user = db.session.scalar(select(User).where(User.email == email))
        assert user is not None
        user.failed_signins = signin.MAX_FAILURES - 2
        db.session.commit()
    attacker = from_address(app, "203.0.113.66")
    assert attacker.submit("/signin", {"email": email, "password": WRONG}).status_code == 401
    assert not account(app, email).must_reset
    travel(PAST_THE_PAUSE)
    assert attacker.submit("/signin", {"email": email, "password": WRONG}).status_code == 401
    assert account(app, email).must_reset


def admin_browser(app: Flask) -> tuple[Browser, str]:
    """An admin signed in just now (fresh authentication), at the moved clock."""
    _, secret, _ = enrolled_user(app, role="admin", email=ADMIN_EMAIL, name="Al Admin")
    browser = Browser(app)
    assert browser.sign_in(ADMIN_EMAIL, PASSWORD, secret).status_code == 302
    return browser, secret


def unlock(browser: Browser, public_id: str) -> Any:
    return browser.submit(
        f"/admin/users/{public_id}/unlock", {"back": "/admin/users"}, form_page="/admin/users"
    )


def events(app: Flask, action: str) -> list[AuditEvent]:
    with app.app_context():
        return list(
            db.session.scalars(
                select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)
            )
        )


def locked_notices(app: Flask) -> list[Notification]:
    with app.app_context():
        return list(
            db.session.scalars(select(Notification).where(Notification.kind == "account_locked"))
        )


def signs_in(app: Flask, password: str, code: str) -> bool:
    browser = from_address(app, "198.51.100.20")
    done = browser.sign_in(PATIENT_EMAIL, password, code=code)
    return done.status_code == 302 and browser.get("/account").status_code == 200


# -- the lock tells its holder, once, without PHI -------------------------------------------


def test_the_hundredth_failure_queues_one_phi_free_locked_notice(app: Flask, patient: Any) -> None:
    lock(app)
    attacker = from_address(app, "203.0.113.67")
    for step in range(1, 4):  # the attacker goes on, past every pause: nothing more is sent
        travel(PAST_THE_PAUSE * (step + 1))
        attacker.submit("/signin", {"email": PATIENT_EMAIL, "password": WRONG})
    attacker.submit("/signin", {"email": PATIENT_EMAIL, "password": PASSWORD})
    [row] = locked_notices(app)
    assert row.recipient_id == patient[0].id
    assert row.payload_sealed is None
    assert len(events(app, "auth.lockout")) == 1
    with app.app_context():
        row = db.session.get(Notification, row.id)
        email = render.render(
            row,
            url=app.config["BASE_URL"] + "/",
            org_name="Riverside",
            org_address="4 Mill Lane",
            support_contact="reception",
            expires_at=None,
            mail_from="no-reply@example.org",
            to_address=PATIENT_EMAIL,
            message_id_domain="example.org",
        )
        texts = render.readable_texts(email)
        assert not phi.find_phi(texts, phi.phi_terms(db.session, row))
    plain = email.get_body(("plain",)).get_content()
    assert "locked after too many failed sign-in" in plain
    assert "contact reception" in plain
    for leak in (*PHI_STRINGS, PATIENT_EMAIL, "203.0.113."):
        assert all(leak.lower() not in text.lower() for text in texts), "PHI in the notice"


def test_a_pause_alone_sends_no_locked_notice(app: Flask, patient: Any) -> None:
    attacker = from_address(app, "203.0.113.68")
    for _ in range(signin.FREE_FAILURES + 2):
        attacker.submit("/signin", {"email": PATIENT_EMAIL, "password": WRONG})
    assert account(app).locked_until is not None
    assert locked_notices(app) == []


# -- an admin finds the locked patient and unlocks them -------------------------------------


def test_a_locked_patient_is_listed_unlocked_by_an_admin_and_signs_in_as_before(
    app: Flask, patient: Any
) -> None:
    user, secret, _ = patient
    lock(app)
    before = account(app)
    assert not signs_in(app, PASSWORD, current_code(secret))  # locked: the right password fails
    admin, _ = admin_browser(app)
    page = admin.get("/admin/users").get_data(as_text=True)
    listed = page.split("Locked accounts", 1)[1]
    assert PATIENT_NAME in listed
    assert f"/admin/users/{user.public_id}/unlock" in listed
    assert not any("@" in url for url in _URLS.findall(page))  # no email in any URL
    with app.app_context():
        dob = (before.created_at - timedelta(days=365 * 30)).date()
    assert dob.isoformat() not in page
    done = unlock(admin, user.public_id)
    assert done.status_code == 302
    assert done.location == "/admin/users"
    after = account(app)
    assert (after.must_reset, after.failed_signins, after.locked_until) == (False, 0, None)
    assert after.password_hash == before.password_hash
    assert after.totp_secret_sealed == before.totp_secret_sealed
    assert after.totp_enabled_at == before.totp_enabled_at
    assert f"/admin/users/{user.public_id}/unlock" not in admin.get("/admin/users").get_data(
        as_text=True
    )
    assert signs_in(app, PASSWORD, next_code(secret))


def test_unlock_is_audited_with_actor_and_target(app: Flask, patient: Any) -> None:
    lock(app)
    admin, _ = admin_browser(app)
    unlock(admin, patient[0].public_id)
    [event] = events(app, "user.unlock")
    admin_user = account(app, ADMIN_EMAIL)
    assert (event.actor_id, event.actor_role) == (admin_user.id, "admin")
    assert (event.target_type, event.target_id) == ("user", patient[0].public_id)
    assert event.outcome == "success"
    assert PATIENT_NAME not in (event.details or "")
    assert "@" not in (event.details or "")


def test_a_locked_staff_account_shows_locked_and_an_unlock_button(app: Flask) -> None:
    staff, _, _ = enrolled_user(app)
    lock(app, "sam@example.org")
    admin, _ = admin_browser(app)
    page = admin.get("/admin/users").get_data(as_text=True)
    accounts_table = page.split("Locked accounts", 1)[0]
    assert "Locked</span>" in accounts_table
    assert f"/admin/users/{staff.public_id}/unlock" in accounts_table
    assert unlock(admin, staff.public_id).location == "/admin/users"
    assert not account(app, "sam@example.org").must_reset


# -- who may unlock, and how ----------------------------------------------------------------


def test_unlock_needs_fresh_authentication(app: Flask, patient: Any) -> None:
    lock(app)
    admin, secret = admin_browser(app)
    travel(PAST_THE_PAUSE + timedelta(minutes=6))
    stale = unlock(admin, patient[0].public_id)
    assert stale.status_code == 302
    assert stale.location.startswith("/reauth")
    assert account(app).must_reset
    assert events(app, "user.unlock") == []
    assert admin.submit(stale.location, {"code": current_code(secret)}).status_code == 302
    assert unlock(admin, patient[0].public_id).location == "/admin/users"
    assert not account(app).must_reset


@pytest.mark.parametrize("role", ["staff", "patient", "auditor"])
def test_other_roles_cannot_unlock(app: Flask, patient: Any, role: str) -> None:
    lock(app)
    _, secret, _ = enrolled_user(app, role=role, email="other@example.org", name="Olive Other")
    other = Browser(app)
    assert other.sign_in("other@example.org", PASSWORD, secret).status_code == 302
    refused = other.submit(
        f"/admin/users/{patient[0].public_id}/unlock",
        {"back": "/admin/users"},
        form_page="/account",
    )
    assert refused.status_code == 403
    assert account(app).must_reset
    assert events(app, "user.unlock") == []


def test_anonymous_unlock_is_sent_to_sign_in(app: Flask, patient: Any) -> None:
    lock(app)
    stranger = Browser(app)
    refused = stranger.submit(f"/admin/users/{patient[0].public_id}/unlock", form_page="/signin")
    assert refused.status_code == 302
    assert refused.location.startswith("/signin")
    assert account(app).must_reset


def test_unlock_of_an_unknown_id_is_404(app: Flask, patient: Any) -> None:
    admin, _ = admin_browser(app)
    assert unlock(admin, "0" * 32).status_code == 404
    assert unlock(admin, PATIENT_EMAIL).status_code == 404  # an email is no id
    assert events(app, "user.unlock") == []


def test_unlock_of_an_account_that_is_not_locked_changes_nothing(app: Flask, patient: Any) -> None:
    admin, _ = admin_browser(app)
    refused = unlock(admin, patient[0].public_id)
    assert refused.location == "/admin/users"
    assert "not locked" in admin.get("/admin/users").get_data(as_text=True)
    assert events(app, "user.unlock") == []


def test_unlock_without_csrf_is_refused(app: Flask, patient: Any) -> None:
    lock(app)
    admin, _ = admin_browser(app)
    forged = admin.client.post(
        f"/admin/users/{patient[0].public_id}/unlock", data={"back": "/admin/users"}
    )
    assert forged.status_code == 400
    bad_token = admin.client.post(
        f"/admin/users/{patient[0].public_id}/unlock",
        data={"back": "/admin/users", "csrf_token": "forged"},
    )
    assert bad_token.status_code == 400
    assert admin.get(f"/admin/users/{patient[0].public_id}/unlock").status_code == 405
    assert account(app).must_reset
    assert events(app, "user.unlock") == []


# -- the lock still refuses a self-service reset ---------------------------------------------


def test_the_lock_still_refuses_a_reset_and_the_unlock_keeps_the_old_password(
    app: Flask, patient: Any
) -> None:
    lock(app)
    browser = from_address(app, "198.51.100.30")
    browser.submit("/reset", {"email": PATIENT_EMAIL})
    assert browser.submit(outbox_url(app, "reset")).location == "/reset/new"
    refused = browser.submit(
        "/reset/new",
        {"password": NEW_PASSWORD, "confirm": NEW_PASSWORD, "code": current_code(patient[1])},
    )
    assert "not right" in refused.get_data(as_text=True)
    assert account(app).must_reset
    assert passwords.verify_password(account(app).password_hash or "", PASSWORD)
    admin, _ = admin_browser(app)
    unlock(admin, patient[0].public_id)
    assert signs_in(app, PASSWORD, next_code(patient[1]))
