"""Sign-in through the real HTTP interface: both factors, throttling, sessions, next, audit."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from portal.database import travel
from portal.extensions import db
from portal.models import AuditEvent, User
from portal.security import passwords
from portal.services import signin
from tests.browser_client import Browser, current_code, enrolled_user, next_code

PASSWORD = "Correct horse battery staple 42"


@pytest.fixture(autouse=True)
def real_time() -> Any:
    yield
    travel(None)


@pytest.fixture
def staff(app: Flask) -> tuple[User, str, list[str]]:
    return enrolled_user(app)


def actions(app: Flask) -> list[str]:
    with app.app_context():
        return list(db.session.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)))


def test_both_factors_sign_in_and_renew_session(app: Flask, staff: Any) -> None:
    browser = Browser(app)
    browser.get("/signin")
    before = browser.cookie()
    first = browser.submit("/signin", {"email": "sam@example.org", "password": PASSWORD})
    assert first.location.endswith("/signin/code")
    middle = browser.cookie()
    done = browser.submit("/signin/code", {"code": current_code(staff[1])})
    assert done.status_code == 302
    assert browser.get("/account").status_code == 200
    assert len({before, middle, browser.cookie()}) == 3  # renewed at each step (fixation)
    assert "auth.signin" in actions(app)


def test_wrong_password_and_unknown_email_look_the_same(app: Flask, staff: Any) -> None:
    browser = Browser(app)
    wrong = browser.submit("/signin", {"email": "sam@example.org", "password": "nope" * 4})
    unknown = browser.submit("/signin", {"email": "who@example.org", "password": "nope" * 4})
    assert wrong.status_code == unknown.status_code == 401
    strip = lambda r: r.get_data(as_text=True).split('name="csrf_token"')[0]  # noqa: E731
    assert strip(wrong) == strip(unknown)


def test_half_signed_in_reaches_nothing_and_expires(app: Flask, staff: Any) -> None:
    browser = Browser(app)
    browser.submit("/signin", {"email": "sam@example.org", "password": PASSWORD})
    assert browser.get("/account").location.startswith("/signin")
    assert browser.get("/admin/users").status_code == 302
    travel(timedelta(minutes=6))
    late = browser.submit("/signin/code", {"code": current_code(staff[1])}, form_page="/signin")
    assert late.location.endswith("/signin")


def test_totp_replay_refused(app: Flask, staff: Any) -> None:
    code = current_code(staff[1])
    first = Browser(app)
    assert first.sign_in("sam@example.org", PASSWORD, code=code).status_code == 302
    second = Browser(app)
    replay = second.sign_in("sam@example.org", PASSWORD, code=code)
    assert replay.status_code == 200
    assert "already used" in replay.get_data(as_text=True)


def test_older_step_after_newer_refused(app: Flask, staff: Any) -> None:
    newer = Browser(app).sign_in("sam@example.org", PASSWORD, code=next_code(staff[1]))
    assert newer.status_code == 302
    older = Browser(app).sign_in("sam@example.org", PASSWORD, code=current_code(staff[1]))
    assert older.status_code == 200


@pytest.mark.parametrize(("offset", "accepted"), [(-1, True), (1, True), (-2, False), (2, False)])
def test_clock_drift(app: Flask, offset: int, accepted: bool) -> None:
    _, secret, _ = enrolled_user(app)
    travel(timedelta(minutes=2))  # past the enrolment step, so -1 is still new
    response = Browser(app).sign_in("sam@example.org", PASSWORD, code=current_code(secret, offset))
    assert (response.status_code == 302) is accepted


FULL_WIDTH = "\uff11\uff12\uff13\uff14\uff15\uff16"


@pytest.mark.parametrize("code", [FULL_WIDTH, "12345", "1234567", "abcdef", "12 34 5x"])
def test_malformed_codes_refused(app: Flask, staff: Any, code: str) -> None:
    assert Browser(app).sign_in("sam@example.org", PASSWORD, code=code).status_code == 200


def test_full_width_digits_of_the_right_code_refused(app: Flask, staff: Any) -> None:
    right = current_code(staff[1])
    wide = right.translate({ord(d): chr(0xFF10 + int(d)) for d in "0123456789"})
    assert Browser(app).sign_in("sam@example.org", PASSWORD, code=wide).status_code == 200


def test_concurrent_requests_with_one_code_one_wins(app: Flask, staff: Any) -> None:
    code = current_code(staff[1])
    results: list[bool] = []
    barrier = threading.Barrier(4)

    def attempt() -> None:
        with app.app_context():
            user = db.session.get(User, staff[0].id)
            barrier.wait()
            results.append(signin.consume_totp(db.session, user, code))
            db.session.commit()

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False, False, False, True]


def test_recovery_code_single_use_and_counted(app: Flask, staff: Any) -> None:
    recovery = staff[2][0]
    used = Browser(app)
    response = used.sign_in("sam@example.org", PASSWORD, code=recovery.upper())
    assert response.status_code == 302
    assert "9 remain" in used.get(response.location, follow_redirects=True).get_data(as_text=True)
    again = Browser(app).sign_in("sam@example.org", PASSWORD, code=recovery)
    assert again.status_code == 200
    assert "auth.recovery.used" in actions(app)


@pytest.mark.real_argon2  # about the production parameters themselves
def test_rehash_when_parameters_change(app: Flask, staff: Any) -> None:
    weak = passwords.make_hasher(time_cost=2, memory_cost=19456, parallelism=1)
    with app.app_context():
        user = db.session.get(User, staff[0].id)
        user.password_hash = weak.hash_password(PASSWORD)
        db.session.commit()
    assert Browser(app).sign_in("sam@example.org", PASSWORD, staff[1]).status_code == 302
    with app.app_context():
        stored = db.session.get(User, staff[0].id).password_hash
        assert f"m={passwords.MEMORY_COST_KIB},t={passwords.TIME_COST},p=1" in stored


@pytest.mark.real_argon2  # about the production parameters themselves
def test_stored_hash_meets_owasp_floor(app: Flask, staff: Any) -> None:
    with app.app_context():
        stored = db.session.get(User, staff[0].id).password_hash
    params = dict(p.split("=") for p in stored.split("$")[3].split(","))
    assert stored.startswith("$argon2id$")
    assert int(params["m"]) >= 19456
    assert int(params["t"]) >= 2
    assert params["p"] == "1"


def test_throttling_engages_and_lifts(app: Flask, staff: Any) -> None:
    browser = Browser(app)
    for _ in range(signin.FREE_FAILURES + 1):
        browser.submit("/signin", {"email": "sam@example.org", "password": "wrong" * 4})
    paused = browser.submit("/signin", {"email": "sam@example.org", "password": PASSWORD})
    assert paused.status_code == 401  # right password, but the account is paused
    travel(timedelta(minutes=2))
    assert Browser(app).sign_in("sam@example.org", PASSWORD, staff[1]).status_code == 302


def test_hundred_failures_need_a_reset(app: Flask, staff: Any) -> None:
    with app.app_context():
        user = db.session.get(User, staff[0].id)
        user.failed_signins = signin.MAX_FAILURES - 1
        db.session.commit()
    Browser(app).submit("/signin", {"email": "sam@example.org", "password": "wrong" * 4})
    travel(timedelta(days=1))
    assert Browser(app).sign_in("sam@example.org", PASSWORD, staff[1]).status_code == 401
    assert "auth.lockout" in actions(app)


def test_address_rate_limit(app: Flask) -> None:
    browser = Browser(app)
    statuses = [
        browser.submit("/signin", {"email": f"x{i}@example.org", "password": "x" * 12}).status_code
        for i in range(22)
    ]
    assert statuses[-1] == 429
    assert 401 in statuses


def test_redis_rate_limit_storage(make_app: Any) -> None:
    import os

    url = os.environ.get("PORTAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    app = make_app(REDIS_URL=url, RATELIMIT_KEY_PREFIX=f"pp-test-{id(make_app)}")
    from portal.extensions import limiter

    assert "redis" in type(limiter.storage).__name__.lower()
    browser = Browser(app)
    statuses = [
        browser.submit("/signin", {"email": f"y{i}@example.org", "password": "x" * 12}).status_code
        for i in range(22)
    ]
    assert statuses[-1] == 429
    limiter.reset()


@pytest.mark.parametrize(
    ("target", "lands"),
    [
        ("/account", "/account"),
        ("https://evil.example/x", "/staff/"),
        ("//evil.example/x", "/staff/"),
        ("/\\evil.example", "/staff/"),
    ],
)
def test_next_accepts_internal_paths_only(app: Flask, staff: Any, target: str, lands: str) -> None:
    response = Browser(app).sign_in("sam@example.org", PASSWORD, staff[1], next_url=target)
    assert response.location == lands


def test_idle_timeout(app: Flask, staff: Any) -> None:
    browser = Browser(app)
    browser.sign_in("sam@example.org", PASSWORD, staff[1])
    travel(timedelta(minutes=14))
    assert browser.get("/account").status_code == 200
    travel(timedelta(minutes=14 + 16))
    assert browser.get("/account").status_code == 302


def test_absolute_lifetime(app: Flask, staff: Any) -> None:
    browser = Browser(app)
    browser.sign_in("sam@example.org", PASSWORD, staff[1])
    for minutes in range(10, 12 * 60, 10):
        travel(timedelta(minutes=minutes))
        assert browser.get("/account").status_code == 200, minutes
    travel(timedelta(hours=12, minutes=1))
    assert browser.get("/account").status_code == 302


def test_stolen_cookie_dead_after_sign_out(app: Flask, staff: Any) -> None:
    browser = Browser(app)
    browser.sign_in("sam@example.org", PASSWORD, staff[1])
    stolen = browser.cookie()
    assert browser.submit("/signout", form_page="/account").status_code == 302
    thief = app.test_client()
    thief.set_cookie("session", stolen or "")
    assert thief.get("/account").status_code == 302
    assert "auth.signout" in actions(app)


def test_disabling_ends_sessions(app: Flask, staff: Any) -> None:
    browser = Browser(app)
    browser.sign_in("sam@example.org", PASSWORD, staff[1])
    with app.app_context():
        from portal.audit import NO_REQUEST, SYSTEM
        from portal.services import admin

        admin.set_disabled(
            db.session, db.session.get(User, staff[0].id), True, actor=SYSTEM, meta=NO_REQUEST
        )
        db.session.commit()
    assert browser.get("/account").status_code == 302


def test_reauthentication_demanded(app: Flask, staff: Any) -> None:
    browser = Browser(app)
    browser.sign_in("sam@example.org", PASSWORD, staff[1])
    fresh = browser.submit("/account/recovery-codes", {"back": "/account"}, form_page="/account")
    assert fresh.status_code == 200  # within five minutes of signing in
    travel(timedelta(minutes=6))
    stale = browser.submit("/account/recovery-codes", {"back": "/account"}, form_page="/account")
    assert stale.location.startswith("/reauth")
    proved = browser.submit(stale.location, {"code": next_code(staff[1])})
    assert proved.location == "/account"
    again = browser.submit("/account/recovery-codes", form_page="/account")
    assert again.status_code == 200
    assert "auth.reauth" in actions(app)


def test_unenrolled_user_confined_to_enrolment(app: Flask) -> None:
    from portal.audit import NO_REQUEST, SYSTEM
    from portal.services import accounts

    with app.app_context():
        accounts.create_user(
            db.session,
            role="admin",
            email="al@example.org",
            name="Al Admin",
            password=PASSWORD,
            actor=SYSTEM,
            meta=NO_REQUEST,
        )
        db.session.commit()
    browser = Browser(app)
    first = browser.submit("/signin", {"email": "al@example.org", "password": PASSWORD})
    assert first.location.endswith("/mfa/enrol")
    assert browser.get("/admin/users").status_code == 302
    assert browser.get("/account").status_code == 302
    page = browser.get("/mfa/enrol").get_data(as_text=True)
    assert "<svg" in page
    assert "<script" not in page


def test_role_reaching_another_roles_page_is_refused(app: Flask, staff: Any) -> None:
    browser = Browser(app)
    browser.sign_in("sam@example.org", PASSWORD, staff[1])
    assert browser.get("/admin/users").status_code == 403


def test_audit_events_carry_no_secrets(app: Flask, staff: Any) -> None:
    code = current_code(staff[1])
    Browser(app).sign_in("sam@example.org", PASSWORD, code=code)
    Browser(app).submit("/signin", {"email": "sam@example.org", "password": "Wrong pass 12"})
    with app.app_context():
        rows = db.session.scalars(select(AuditEvent)).all()
        text = " ".join(f"{r.action} {r.details} {r.target_id}" for r in rows)
    assert {"auth.signin", "auth.signin.failed", "auth.mfa.enrol"} <= {r.action for r in rows}
    for secret in (PASSWORD, "Wrong pass 12", code, staff[1], staff[2][0]):
        assert secret not in text


def test_retention_purges_expired_sessions(app: Flask, staff: Any) -> None:
    from portal.models import WebSession

    live = Browser(app)
    live.sign_in("sam@example.org", PASSWORD, staff[1])
    Browser(app).get("/signin")  # an anonymous visitor's session (its CSRF token)
    with app.app_context():
        assert db.session.query(WebSession).count() == 2
        travel(timedelta(minutes=20))
        removed = signin.purge_expired_sessions(db.session, 15 * 60, 12 * 3600)
        db.session.commit()
        assert removed == 2
        assert db.session.query(WebSession).count() == 0
