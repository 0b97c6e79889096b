"""Changing the authenticator app or the password, through HTTP: the attacker's paths first.

An enrolled factor stays in force until its replacement is proved; a password
alone never reaches an enrolled account, nor enrols a factor for it. Each
change asks for proof, is audited, ends the user's other sessions and queues a
PHI-free notice.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from notifier import phi, render
from portal.audit import NO_REQUEST, SYSTEM
from portal.database import travel
from portal.extensions import db
from portal.models import AuditEvent, Notification, User
from portal.security import passwords
from portal.services import accounts, signin
from portal.services.errors import ServiceError
from tests.browser_client import Browser, current_code, enrolled_user, next_code
from tests.factories import PATIENT_NAME, PHI_STRINGS

EMAIL = "zq@example.org"
PASSWORD = "Correct horse battery staple 42"
NEW_PASSWORD = "Velvet lighthouse quarrel 77"
_SECRET = re.compile(r'id="totp-secret">([A-Z2-7]+)<')


@pytest.fixture(autouse=True)
def real_time() -> Any:
    yield
    travel(None)


@pytest.fixture
def patient(app: Flask) -> tuple[User, str, list[str]]:
    """An enrolled patient with the recognisable name (so a leak would show)."""
    return enrolled_user(app, role="patient", email=EMAIL, name=PATIENT_NAME)


def signed_in(app: Flask, secret: str, offset_steps: int = 0) -> Browser:
    browser = Browser(app)
    done = browser.sign_in(EMAIL, PASSWORD, code=current_code(secret, offset_steps))
    assert done.status_code == 302, done.get_data(as_text=True)
    return browser


def signs_in(app: Flask, password: str, code: str) -> bool:
    """True when ``password`` then ``code`` (the second factor, never enrolment) sign in."""
    browser = Browser(app)
    first = browser.submit("/signin", {"email": EMAIL, "password": password})
    assert first.location.endswith("/signin/code"), "not asked for the enrolled factor"
    done = browser.submit("/signin/code", {"code": code})
    return done.status_code == 302 and browser.get("/account").status_code == 200


def start_change(browser: Browser) -> str:
    """POST the account page's button; return the new secret the enrolment page shows."""
    started = browser.submit("/account/mfa", {"back": "/account"}, form_page="/account")
    assert started.location == "/mfa/enrol"
    match = _SECRET.search(browser.get("/mfa/enrol").get_data(as_text=True))
    assert match, "no secret on the enrolment page"
    return match.group(1)


def actions(app: Flask) -> list[str]:
    with app.app_context():
        return list(db.session.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)))


def notices_of(app: Flask, kind: str) -> list[Notification]:
    with app.app_context():
        return list(db.session.scalars(select(Notification).where(Notification.kind == kind)))


def assert_phi_free_notice(app: Flask, kind: str) -> None:
    """Exactly one notice of ``kind``; rendered as the notifier would, it names nobody."""
    [row] = notices_of(app, kind)
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
            to_address=EMAIL,
            message_id_domain="example.org",
        )
        texts = render.readable_texts(email)
        assert not phi.find_phi(texts, phi.phi_terms(db.session, row))
    for leak in PHI_STRINGS:
        assert all(leak.lower() not in text.lower() for text in texts), "PHI in the notice"


# -- changing the authenticator app -------------------------------------------------------


def test_abandoned_change_leaves_the_old_factor_in_force(app: Flask, patient: Any) -> None:
    _, old_secret, _ = patient
    owner = signed_in(app, old_secret)
    new_secret = start_change(owner)  # ... and the owner walks away

    thief = Browser(app)
    first = thief.submit("/signin", {"email": EMAIL, "password": PASSWORD})
    assert first.location.endswith("/signin/code")  # asked for the OLD factor
    enrol = thief.get("/mfa/enrol")
    assert enrol.status_code == 302
    assert new_secret not in enrol.get_data(as_text=True)
    assert thief.get("/inbox").status_code == 302
    guessed = thief.submit("/signin/code", {"code": current_code(new_secret, 1)})
    assert guessed.status_code == 200  # the unproved secret is not a factor
    assert signs_in(app, PASSWORD, next_code(old_secret))


def test_password_alone_cannot_finish_or_see_a_pending_change(app: Flask, patient: Any) -> None:
    _, old_secret, _ = patient
    new_secret = start_change(signed_in(app, old_secret))
    thief = Browser(app)
    thief.submit("/signin", {"email": EMAIL, "password": PASSWORD})
    posted = thief.submit(
        "/mfa/enrol", {"code": current_code(new_secret)}, form_page="/signin/code"
    )
    assert posted.status_code == 302
    assert posted.location.endswith("/signin")
    with app.app_context():
        user = accounts.find_by_email(db.session, EMAIL)
        assert user is not None
        assert signin.totp_secret(db.session, user) == old_secret
    assert "auth.mfa.change" not in actions(app)


def test_stale_enrolment_session_cannot_replace_an_active_factor(app: Flask) -> None:
    with app.app_context():
        accounts.create_user(
            db.session,
            role="staff",
            email=EMAIL,
            name="Sam Staffer",
            password=PASSWORD,
            actor=SYSTEM,
            meta=NO_REQUEST,
        )
        db.session.commit()
    thief, owner = Browser(app), Browser(app)
    assert thief.submit("/signin", {"email": EMAIL, "password": PASSWORD}).location.endswith(
        "/mfa/enrol"
    )
    owner.submit("/signin", {"email": EMAIL, "password": PASSWORD})
    secret = _SECRET.search(owner.get("/mfa/enrol").get_data(as_text=True))
    assert secret
    assert owner.submit("/mfa/enrol", {"code": current_code(secret.group(1))}).status_code == 200

    late = thief.get("/mfa/enrol")  # the thief's half-way session from before
    assert late.status_code == 302
    assert _SECRET.search(late.get_data(as_text=True)) is None
    with app.app_context():
        user = accounts.find_by_email(db.session, EMAIL)
        assert user is not None
        assert user.totp_enabled_at is not None
        assert signin.totp_secret(db.session, user) == secret.group(1)


def test_a_second_enrolment_session_never_sees_the_secret_the_first_turns_on(app: Flask) -> None:
    """Someone holding only the password opens enrolment while the owner is enrolling."""
    with app.app_context():
        accounts.create_user(
            db.session,
            role="staff",
            email=EMAIL,
            name="Sam Staffer",
            password=PASSWORD,
            actor=SYSTEM,
            meta=NO_REQUEST,
        )
        db.session.commit()
    owner, thief = Browser(app), Browser(app)
    owner.submit("/signin", {"email": EMAIL, "password": PASSWORD})
    first = _SECRET.search(owner.get("/mfa/enrol").get_data(as_text=True))
    again = _SECRET.search(owner.get("/mfa/enrol").get_data(as_text=True))
    assert first
    assert again
    assert first.group(1) == again.group(1)
    thief.submit("/signin", {"email": EMAIL, "password": PASSWORD})
    seen = _SECRET.search(thief.get("/mfa/enrol").get_data(as_text=True))
    assert seen
    assert seen.group(1) != first.group(1)
    # The owner's session never turns on the secret the thief was shown.
    stale = owner.submit("/mfa/enrol", {"code": current_code(seen.group(1))})
    assert "code is not right" in stale.get_data(as_text=True)
    with app.app_context():
        user = accounts.find_by_email(db.session, EMAIL)
        assert user is not None
        assert user.totp_enabled_at is None
    mine = _SECRET.search(owner.get("/mfa/enrol").get_data(as_text=True))
    assert mine
    assert mine.group(1) not in (first.group(1), seen.group(1))
    assert owner.submit("/mfa/enrol", {"code": current_code(mine.group(1))}).status_code == 200
    with app.app_context():
        user = accounts.find_by_email(db.session, EMAIL)
        assert user is not None
        assert user.totp_enabled_at is not None
        assert signin.totp_secret(db.session, user) == mine.group(1)
    assert thief.get("/mfa/enrol").status_code == 302  # enrolled: nothing more to see


def test_completed_change_swaps_factor_ends_other_sessions_audits_and_notifies(
    app: Flask, patient: Any
) -> None:
    _, old_secret, _ = patient
    other = signed_in(app, old_secret)
    mine = signed_in(app, old_secret, 1)
    new_secret = start_change(mine)
    assert "auth.mfa.change" not in actions(app)
    assert not notices_of(app, "mfa_changed")

    done = mine.submit("/mfa/enrol", {"code": current_code(new_secret)})
    assert done.status_code == 200
    assert "recovery" in done.get_data(as_text=True).lower()
    assert mine.get("/account").status_code == 200
    assert other.get("/account").status_code == 302  # every other session ended

    travel(timedelta(minutes=2))
    assert not signs_in(app, PASSWORD, current_code(old_secret))
    assert signs_in(app, PASSWORD, current_code(new_secret))
    assert actions(app).count("auth.mfa.change.start") == 1
    assert actions(app).count("auth.mfa.change") == 1
    assert_phi_free_notice(app, "mfa_changed")


def test_wrong_code_keeps_the_old_factor_and_the_change_pending(app: Flask, patient: Any) -> None:
    _, old_secret, _ = patient
    mine = signed_in(app, old_secret)
    new_secret = start_change(mine)
    wrong = mine.submit("/mfa/enrol", {"code": current_code(old_secret, 1)})
    assert wrong.status_code == 200
    assert "not right" in wrong.get_data(as_text=True)
    assert _SECRET.search(wrong.get_data(as_text=True)).group(1) == new_secret  # type: ignore[union-attr]
    assert signs_in(app, PASSWORD, next_code(old_secret))
    assert not notices_of(app, "mfa_changed")


def test_pending_change_expires(app: Flask, patient: Any) -> None:
    _, old_secret, _ = patient
    mine = signed_in(app, old_secret)
    new_secret = start_change(mine)
    travel(timedelta(minutes=11))
    mine.get("/account")  # keep the session alive
    late = mine.submit("/mfa/enrol", {"code": current_code(new_secret)}, form_page="/account")
    assert late.status_code == 302
    assert late.location == "/account"
    assert signs_in(app, PASSWORD, current_code(old_secret))
    assert "auth.mfa.change" not in actions(app)


def test_another_session_of_the_user_is_not_shown_the_pending_secret(
    app: Flask, patient: Any
) -> None:
    _, old_secret, _ = patient
    new_secret = start_change(signed_in(app, old_secret))
    other = signed_in(app, old_secret, 1)
    page = other.get("/mfa/enrol")
    assert page.status_code == 302
    assert new_secret not in page.get_data(as_text=True)


def test_get_of_the_change_button_changes_nothing(app: Flask, patient: Any) -> None:
    mine = signed_in(app, patient[1])
    assert mine.get("/account/mfa").status_code == 405
    assert mine.get("/mfa/enrol").status_code == 302


# -- changing the password ----------------------------------------------------------------


def change(browser: Browser, current: str, new: str = NEW_PASSWORD) -> Any:
    return browser.submit(
        "/account/password", {"current_password": current, "password": new, "confirm": new}
    )


def test_password_change_asks_for_the_current_password(app: Flask, patient: Any) -> None:
    mine = signed_in(app, patient[1])
    assert 'name="current_password"' in mine.get("/account/password").get_data(as_text=True)
    missing = mine.submit("/account/password", {"password": NEW_PASSWORD, "confirm": NEW_PASSWORD})
    assert missing.status_code == 200
    assert "current password" in missing.get_data(as_text=True).lower()
    assert signs_in(app, PASSWORD, next_code(patient[1]))


def test_wrong_current_password_is_refused_and_counted(app: Flask, patient: Any) -> None:
    mine = signed_in(app, patient[1])
    refused = change(mine, "Not my password 99")
    assert refused.status_code == 401
    assert "not your current password" in refused.get_data(as_text=True)
    with app.app_context():
        user = accounts.find_by_email(db.session, EMAIL)
        assert user is not None
        assert user.failed_signins == 1
        failed = db.session.scalars(
            select(AuditEvent).where(AuditEvent.action == "auth.signin.failed")
        ).all()
        assert [json.loads(e.details)["factor"] for e in failed] == ["current_password"]
    assert not notices_of(app, "password_changed")
    assert signs_in(app, PASSWORD, next_code(patient[1]))


def test_wrong_current_passwords_pause_the_change(app: Flask, patient: Any) -> None:
    mine = signed_in(app, patient[1])
    for _ in range(signin.FREE_FAILURES + 1):
        change(mine, "Not my password 99")
    assert change(mine, PASSWORD).status_code == 401  # right now, but paused
    with app.app_context():
        user = accounts.find_by_email(db.session, EMAIL)
        assert user is not None
        assert passwords.verify_password(user.password_hash or "", PASSWORD)


def test_password_change_notifies_and_ends_other_sessions(app: Flask, patient: Any) -> None:
    other = signed_in(app, patient[1])
    mine = signed_in(app, patient[1], 1)
    done = change(mine, PASSWORD)
    assert done.location == "/account"
    assert mine.get("/account").status_code == 200
    assert other.get("/account").status_code == 302
    assert "auth.password.change" in actions(app)
    assert_phi_free_notice(app, "password_changed")
    travel(timedelta(minutes=2))
    assert signs_in(app, NEW_PASSWORD, current_code(patient[1]))


def test_refused_new_password_changes_nothing_and_notifies_nobody(app: Flask, patient: Any) -> None:
    mine = signed_in(app, patient[1])
    weak = change(mine, PASSWORD, "short")
    assert weak.status_code == 200
    assert not notices_of(app, "password_changed")
    assert "auth.password.change" not in actions(app)


def test_pending_secret_is_sealed_at_rest_and_dropped_by_an_admin_reset(
    app: Flask, patient: Any
) -> None:
    from portal.services import admin

    new_secret = start_change(signed_in(app, patient[1]))
    with app.app_context():
        user = db.session.get(User, patient[0].id)
        assert user is not None
        assert user.totp_pending_sealed is not None
        assert new_secret.encode() not in user.totp_pending_sealed
        admin.reset_mfa(db.session, user, actor=SYSTEM, meta=NO_REQUEST)
        db.session.commit()
        assert user.totp_pending_sealed is None
        assert user.totp_pending_at is None


def test_finishing_needs_the_issue_this_session_was_shown(app: Flask) -> None:
    with app.app_context():
        user = accounts.create_user(
            db.session,
            role="staff",
            email=EMAIL,
            name="Sam Staffer",
            password=PASSWORD,
            actor=SYSTEM,
            meta=NO_REQUEST,
        ).user
        _, first = signin.start_enrolment(db.session, user, None)
        second_secret, second = signin.start_enrolment(db.session, user, None)
        assert first != second
        with pytest.raises(ServiceError, match="started again elsewhere"):
            signin.finish_enrolment(
                db.session, user, current_code(second_secret), NO_REQUEST, first
            )
        with pytest.raises(ServiceError, match="started again elsewhere"):
            signin.finish_enrolment(db.session, user, current_code(second_secret), NO_REQUEST)
        assert user.totp_enabled_at is None
        signin.finish_enrolment(db.session, user, current_code(second_secret), NO_REQUEST, second)
        assert user.totp_enabled_at is not None
