"""Throttling through HTTP, the attacker's paths first: one per-account pause and lock for
sign-in, re-authentication and reset; rate limits that name no one; the audit of each step.
"""

from __future__ import annotations

import json
import logging
import os
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
from tests.browser_client import Browser, current_code, enrolled_user, next_code, outbox_url

EMAIL = "sam@example.org"
PASSWORD = "Correct horse battery staple 42"
NEW_PASSWORD = "Velvet lighthouse quarrel 77"
WRONG = "Wrong password " * 2
PAST_THE_PAUSE = timedelta(seconds=signin.FIRST_DELAY_SECONDS + 1)


@pytest.fixture(autouse=True)
def real_time() -> Any:
    yield
    travel(None)


@pytest.fixture
def staff(app: Flask) -> tuple[User, str, list[str]]:
    return enrolled_user(app)


def from_address(app: Flask, address: str) -> Browser:
    """A browser whose requests come from ``address`` (its own per-address limits)."""
    browser = Browser(app)
    browser.client.environ_base["REMOTE_ADDR"] = address
    return browser


def wrong_code(secret: str) -> str:
    """Six digits that are no code of ``secret`` within two steps of now."""
    near = {current_code(secret, offset) for offset in range(-2, 3)}
    return next(c for c in (f"{n:06d}" for n in range(10**6)) if c not in near)


def events(app: Flask, action: str) -> list[AuditEvent]:
    with app.app_context():
        return list(
            db.session.scalars(
                select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)
            )
        )


def details(event: AuditEvent) -> dict[str, Any]:
    return dict(json.loads(event.details))


def account(app: Flask) -> User:
    with app.app_context():
        user = db.session.scalar(select(User).where(User.email == EMAIL))
        assert user is not None
        db.session.expunge(user)
        return user


def pause_account(app: Flask) -> None:
    attacker = from_address(app, "203.0.113.66")
    for _ in range(signin.FREE_FAILURES + 1):
        attacker.submit("/signin", {"email": EMAIL, "password": WRONG})
    assert account(app).locked_until is not None


# -- per-account limits: the pause, not a 429 anyone can cause --------------------------------


def test_a_flood_for_the_victims_email_locks_them_out_only_for_the_pause(
    app: Flask, staff: Any
) -> None:
    for attempt in range(35):  # from seven addresses, each under its own limit
        attacker = from_address(app, f"203.0.113.{attempt // 5 + 1}")
        assert attacker.submit("/signin", {"email": EMAIL, "password": WRONG}).status_code == 401
    victim = from_address(app, "198.51.100.20")
    paused = victim.submit("/signin", {"email": EMAIL, "password": PASSWORD})
    assert paused.status_code == 401  # the pause is what protects the account
    travel(PAST_THE_PAUSE)
    assert victim.sign_in(EMAIL, PASSWORD, staff[1]).status_code == 302


def test_rate_limit_logs_name_neither_the_account_nor_the_address(
    app: Flask, staff: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every record of every logger, at every level
    statuses = []
    for attempt in range(64):  # past the per-account flood guard, from four addresses
        attacker = from_address(app, f"203.0.113.{attempt // 16 + 1}")
        statuses.append(attacker.submit("/signin", {"email": EMAIL}).status_code)
    prober = from_address(app, "203.0.113.99")  # past one address's limit
    statuses += [
        prober.submit("/signin", {"email": f"x{i}@example.org"}).status_code for i in range(22)
    ]
    assert statuses.count(429) >= 2
    limiter_lines = [r.getMessage() for r in caplog.records if r.name == "flask-limiter"]
    assert any("exceeded" in line for line in limiter_lines)  # the breaches were logged
    everything = " ".join(
        f"{r.name} {r.getMessage()} {r.args!r} {vars(r)!r}" for r in caplog.records
    )
    assert EMAIL not in everything
    assert "@example.org" not in everything
    assert not any("203.0.113." in line for line in limiter_lines)


def test_redis_keys_name_no_account(make_app: Any) -> None:
    import redis

    url = os.environ.get("PORTAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    app = make_app(REDIS_URL=url, RATELIMIT_KEY_PREFIX=f"pp-test-keys-{os.getpid()}")
    store = redis.Redis.from_url(url)
    before = set(store.scan_iter(match="*acct:*"))
    new: set[bytes] = set()
    try:
        for _ in range(3):
            from_address(app, "203.0.113.5").submit("/signin", {"email": EMAIL})
        # The limiter keeps the first key prefix it was given, so look at what is new.
        new = set(store.scan_iter(match="*acct:*")) - before
        assert new
        assert not any(b"example.org" in key or b"sam" in key for key in new), new
    finally:
        for key in new:
            store.delete(key)


# -- re-authentication counts like sign-in ---------------------------------------------------


def test_wrong_reauthentication_codes_count_and_pause_the_account(app: Flask, staff: Any) -> None:
    mine = Browser(app)
    mine.sign_in(EMAIL, PASSWORD, staff[1])
    travel(timedelta(minutes=6))
    for _ in range(signin.FREE_FAILURES):
        refused = mine.submit("/reauth", {"code": wrong_code(staff[1])})
        assert "not right" in refused.get_data(as_text=True)
    user = account(app)
    assert user.failed_signins == signin.FREE_FAILURES
    assert user.locked_until is not None
    paused = mine.submit("/reauth", {"code": next_code(staff[1])})
    assert "not right" in paused.get_data(as_text=True)  # right code, but paused
    other = from_address(app, "198.51.100.21")
    assert other.submit("/signin", {"email": EMAIL, "password": PASSWORD}).status_code == 401
    failed = events(app, "auth.reauth")
    assert [e.outcome for e in failed] == ["failure"] * (signin.FREE_FAILURES + 1)
    assert details(failed[-1])["factor"] == "paused"


def test_reauthentication_works_again_after_the_pause(app: Flask, staff: Any) -> None:
    mine = Browser(app)
    mine.sign_in(EMAIL, PASSWORD, staff[1])
    travel(timedelta(minutes=6))
    for _ in range(signin.FREE_FAILURES):
        mine.submit("/reauth", {"code": wrong_code(staff[1])})
    travel(timedelta(minutes=6) + PAST_THE_PAUSE)
    proved = mine.submit("/reauth?next=/account", {"code": next_code(staff[1])})
    assert proved.location == "/account"
    assert events(app, "auth.reauth")[-1].outcome == "success"


# -- reset honours the pause and the 100-failure lock ----------------------------------------


def reset_page(app: Flask) -> Browser:
    """A browser on /reset/new after following an emailed reset link."""
    browser = from_address(app, "198.51.100.30")
    browser.submit("/reset", {"email": EMAIL})
    assert browser.submit(outbox_url(app, "reset")).location == "/reset/new"
    return browser


def reset(browser: Browser, code: str) -> Any:
    return browser.submit(
        "/reset/new", {"password": NEW_PASSWORD, "confirm": NEW_PASSWORD, "code": code}
    )


def test_reset_refused_while_the_account_is_paused(app: Flask, staff: Any) -> None:
    browser = reset_page(app)
    pause_account(app)
    paused = reset(browser, next_code(staff[1]))
    assert paused.status_code == 200
    assert "not right" in paused.get_data(as_text=True)
    assert passwords.verify_password(account(app).password_hash or "", PASSWORD)
    travel(PAST_THE_PAUSE)
    assert reset(browser, next_code(staff[1])).location == "/signin"
    assert passwords.verify_password(account(app).password_hash or "", NEW_PASSWORD)


def test_reset_cannot_lift_the_hundred_failure_lock(app: Flask, staff: Any) -> None:
    with app.app_context():
        user = db.session.get(User, staff[0].id)
        user.failed_signins = signin.MAX_FAILURES - 1
        db.session.commit()
    from_address(app, "203.0.113.67").submit("/signin", {"email": EMAIL, "password": WRONG})
    travel(timedelta(days=1))
    locked = reset(reset_page(app), current_code(staff[1]))
    assert "not right" in locked.get_data(as_text=True)
    user = account(app)
    assert user.must_reset
    assert passwords.verify_password(user.password_hash or "", PASSWORD)
    again = Browser(app).sign_in(EMAIL, NEW_PASSWORD, code=next_code(staff[1]))
    assert again.status_code == 401


def test_wrong_reset_codes_count(app: Flask, staff: Any) -> None:
    browser = reset_page(app)
    for _ in range(signin.FREE_FAILURES):
        reset(browser, wrong_code(staff[1]))
    assert account(app).locked_until is not None
    assert [e.outcome for e in events(app, "auth.reset")] == ["failure"] * signin.FREE_FAILURES


# -- audit: a right first factor, and a replayed code ----------------------------------------


def test_right_password_is_audited_and_a_wrong_one_is_not_called_right(
    app: Flask, staff: Any
) -> None:
    Browser(app).submit("/signin", {"email": EMAIL, "password": WRONG})
    assert events(app, "auth.password.ok") == []
    Browser(app).sign_in(EMAIL, PASSWORD, staff[1])
    [ok] = events(app, "auth.password.ok")
    assert (ok.target_id, ok.actor_id) == (staff[0].public_id, staff[0].id)
    assert PASSWORD not in ok.details
    assert ok.seq < events(app, "auth.signin")[0].seq


def test_totp_replay_is_audited_as_a_replay(app: Flask, staff: Any) -> None:
    code = current_code(staff[1])
    assert Browser(app).sign_in(EMAIL, PASSWORD, code=code).status_code == 302
    replay = Browser(app).sign_in(EMAIL, PASSWORD, code=code)
    assert "already used" in replay.get_data(as_text=True)
    [replayed] = events(app, "auth.code.replay")
    assert replayed.outcome == "failure"
    assert details(replayed) == {"factor": "code", "failures": 1}
    assert events(app, "auth.signin.failed") == []  # not logged as a plain wrong code
    assert account(app).failed_signins == 1  # and still counted


def test_wrong_code_is_still_a_plain_failure(app: Flask, staff: Any) -> None:
    Browser(app).sign_in(EMAIL, PASSWORD, code=wrong_code(staff[1]))
    assert events(app, "auth.code.replay") == []
    assert [details(e)["factor"] for e in events(app, "auth.signin.failed")] == ["code"]


def test_replay_through_reauthentication_is_audited_as_a_replay(app: Flask, staff: Any) -> None:
    mine = Browser(app)
    code = current_code(staff[1])
    mine.sign_in(EMAIL, PASSWORD, code=code)
    replay = mine.submit("/reauth", {"code": code})
    assert "already used" in replay.get_data(as_text=True)
    assert len(events(app, "auth.code.replay")) == 1
    assert account(app).failed_signins == 1
