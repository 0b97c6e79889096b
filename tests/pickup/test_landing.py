"""The emailed link: scanner-safe GET, one page for every bad link, renewal, token hygiene."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from portal.audit import NO_REQUEST, SYSTEM
from portal.database import travel, utcnow
from portal.extensions import db
from portal.models import (
    Attachment,
    AuditEvent,
    Message,
    Notification,
    PatientProfile,
    PickupLink,
    User,
    WebSession,
)
from portal.security import tokens
from portal.services import messaging
from tests.browser_client import Browser, outbox_url
from tests.factories import PHI_STRINGS
from tests.support.pickup import SentMessage, chain_ok, events, send, strip_csrf

DOMAIN_TABLES = (Message, Attachment, PickupLink, Notification, User, PatientProfile)


def snapshot(app: Flask) -> dict[str, Any]:
    """Every domain row (not sessions, not the audit trail) as plain tuples."""
    with app.app_context():
        found: dict[str, Any] = {}
        for model in DOMAIN_TABLES:
            columns = list(model.__table__.columns)
            rows = db.session.execute(select(*columns).order_by(columns[0])).all()
            found[model.__tablename__] = [tuple(row) for row in rows]
        return found


def expire(app: Flask, public_id: str) -> None:
    """Let a message and its links run out (as time passing would)."""
    with app.app_context():
        message = db.session.scalar(select(Message).where(Message.public_id == public_id))
        assert message is not None
        past = utcnow() - timedelta(hours=1)
        message.expires_at = past
        for link in db.session.scalars(
            select(PickupLink).where(PickupLink.message_id == message.id)
        ):
            link.expires_at = past
        db.session.commit()


def revoke(app: Flask, public_id: str) -> None:
    with app.app_context():
        message = db.session.scalar(select(Message).where(Message.public_id == public_id))
        assert message is not None
        messaging.revoke(db.session, message, actor=SYSTEM, meta=NO_REQUEST)
        db.session.commit()


def test_get_twenty_times_consumes_nothing_and_reveals_nothing(
    app: Flask, staff: Any, patient: User
) -> None:
    sent = send(app)
    before = snapshot(app)
    browser = Browser(app)
    for _ in range(20):
        page = browser.get(sent.path)
        assert page.status_code == 200
        text = page.get_data(as_text=True)
        assert "Continue" in text
        assert app.config["ORG_NAME"] in text
        assert not [phi for phi in PHI_STRINGS if phi in text]
        assert sent.token not in text  # the form posts to the page's own URL
    assert browser.client.head(sent.path).status_code == 200
    assert snapshot(app) == before
    opened = events(app, "link.open")
    assert len(opened) == 21
    with app.app_context():
        link = db.session.scalar(select(PickupLink))
        assert link is not None
        assert link.verify_failures == 0
        assert link.locked_at is None
    assert {(e.target_type, e.target_id, e.outcome) for e in opened} == {
        ("link", link.public_id, "success")
    }
    assert all(sent.token not in (e.details + (e.target_id or "")) for e in opened)
    assert chain_ok(app)


def test_unknown_expired_revoked_and_malformed_links_look_the_same(
    app: Flask, staff: Any, patient: User
) -> None:
    expired, revoked = send(app), send(app)
    expire(app, expired.public_id)
    revoke(app, revoked.public_id)
    paths = [
        expired.path,
        revoked.path,
        f"/p/{tokens.new_token()}",
        "/p/short",
        "/p/" + "!" * 43,
        "/p/" + "a" * 300,
    ]
    browser = Browser(app)
    pages = [browser.get(path) for path in paths]
    assert {page.status_code for page in pages} == {404}
    assert len({strip_csrf(page) for page in pages}) == 1
    assert "Send me a new link" in pages[0].get_data(as_text=True)
    states = [json.loads(e.details)["state"] for e in events(app, "link.open")]
    assert states == ["expired", "revoked", "unknown", "unknown", "unknown", "unknown"]
    assert all(e.outcome == "failure" for e in events(app, "link.open"))


def pickup_notices(app: Flask) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count()).where(Notification.kind == "pickup")) or 0


def expire_link_only(app: Flask, public_id: str) -> None:
    """Let a message's links run out while the message itself is still available."""
    with app.app_context():
        message = db.session.scalar(select(Message).where(Message.public_id == public_id))
        assert message is not None
        for link in db.session.scalars(
            select(PickupLink).where(PickupLink.message_id == message.id)
        ):
            link.expires_at = utcnow() - timedelta(minutes=1)
        db.session.commit()


def message_expiry(app: Flask, public_id: str) -> Any:
    with app.app_context():
        return db.session.scalar(select(Message.expires_at).where(Message.public_id == public_id))


def test_renew_answers_the_same_and_sends_only_for_a_real_expired_link(
    app: Flask, staff: Any, patient: User
) -> None:
    expired, revoked = send(app), send(app)
    expire_link_only(app, expired.public_id)
    revoke(app, revoked.public_id)
    before = pickup_notices(app)
    browser = Browser(app)
    answers = [
        browser.submit(path, {"intent": "renew"})
        for path in (f"/p/{tokens.new_token()}", revoked.path, expired.path)
    ]
    assert {a.status_code for a in answers} == {200}
    assert len({strip_csrf(a) for a in answers}) == 1
    assert "If this link can be renewed" in answers[0].get_data(as_text=True)
    assert pickup_notices(app) == before + 1
    fresh = outbox_url(app, "pickup")
    assert browser.get(fresh).status_code == 200  # the new link works
    assert browser.get(expired.path).status_code == 404  # the old one is replaced
    again = browser.submit(expired.path, {"intent": "renew"})
    assert again.status_code == 200
    assert pickup_notices(app) == before + 1
    outcomes = [(json.loads(e.details)["state"], e.outcome) for e in events(app, "link.reissue")]
    assert outcomes == [
        ("unknown", "denied"),
        ("revoked", "denied"),
        ("expired", "success"),
        ("revoked", "denied"),
    ]
    assert events(app, "message.resend")
    assert chain_ok(app)


def test_renew_never_outlives_the_availability_staff_chose(
    app: Flask, staff: Any, patient: User
) -> None:
    """Issue 10 item 20: a message sent for 2 hours is not made available for 7 days."""
    sent = send(app, expires_in=timedelta(hours=2))
    chosen = message_expiry(app, sent.public_id)
    before = pickup_notices(app)
    travel(timedelta(hours=3))
    browser = Browser(app)
    assert browser.get(sent.path).status_code == 404
    answer = browser.submit(sent.path, {"intent": "renew"})
    assert answer.status_code == 200
    assert pickup_notices(app) == before  # nothing sent
    assert message_expiry(app, sent.public_id) == chosen  # availability unchanged
    assert f"contact {app.config['ORG_NAME']}" in answer.get_data(as_text=True)
    assert browser.get(sent.path).status_code == 404
    reissue = events(app, "link.reissue")[-1]
    assert (json.loads(reissue.details)["state"], reissue.outcome) == ("unavailable", "denied")
    assert events(app, "message.resend") == []
    assert chain_ok(app)


def test_renewed_link_expires_with_the_message_not_the_default(
    app: Flask, staff: Any, patient: User
) -> None:
    """Issue 10 item 20: a renewal within the sender's window keeps the sender's end time."""
    sent = send(app, expires_in=timedelta(hours=2))
    chosen = message_expiry(app, sent.public_id)
    expire_link_only(app, sent.public_id)
    browser = Browser(app)
    assert browser.submit(sent.path, {"intent": "renew"}).status_code == 200
    assert message_expiry(app, sent.public_id) == chosen
    with app.app_context():
        message_id = db.session.scalar(
            select(Message.id).where(Message.public_id == sent.public_id)
        )
        fresh = db.session.scalars(
            select(PickupLink).where(
                PickupLink.message_id == message_id, PickupLink.revoked_at.is_(None)
            )
        ).all()
    assert [link.expires_at for link in fresh] == [chosen]
    assert browser.get(outbox_url(app, "pickup")).status_code == 200  # the new link works
    travel(timedelta(hours=2, minutes=1))
    assert browser.get(outbox_url(app, "pickup")).status_code == 404  # stops at the chosen end


def test_renew_is_rate_limited_per_link(app: Flask, staff: Any, patient: User) -> None:
    sent = send(app)
    browser = Browser(app)
    statuses = [browser.submit(sent.path, {"intent": "renew"}).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


def test_continue_moves_the_link_out_of_the_url(
    app: Flask, staff: Any, patient: User, capfd: pytest.CaptureFixture[str]
) -> None:
    sent = send(app)
    browser = Browser(app)
    locations = []
    response = browser.submit(sent.path)
    while response.status_code in (301, 302, 303):
        locations.append(response.location)
        response = browser.get(response.location)
    assert locations[:2] == ["/pickup", "/pickup/verify"]
    assert response.status_code == 200
    assert "Date of birth" in response.get_data(as_text=True)
    assert all(sent.token not in location for location in locations)
    assert sent.token not in response.get_data(as_text=True)
    with app.app_context():
        stored = " ".join(db.session.scalars(select(WebSession.data)))
        audit_text = " ".join(
            f"{e.target_id} {e.details}" for e in db.session.scalars(select(AuditEvent))
        )
    assert sent.token not in stored
    assert sent.token not in audit_text
    logged = capfd.readouterr().err
    assert '"rule": "/p/<token>"' in logged
    assert sent.token not in logged


def test_continue_with_a_bad_link_shows_the_same_page(app: Flask) -> None:
    browser = Browser(app)
    bad = browser.submit(f"/p/{tokens.new_token()}", form_page="/p/x")
    assert bad.status_code == 404
    assert strip_csrf(bad) == strip_csrf(browser.get("/p/y"))
    assert browser.get("/pickup").status_code == 404  # nothing in the session


def test_link_post_needs_csrf(app: Flask, staff: Any, patient: User) -> None:
    sent: SentMessage = send(app)
    assert Browser(app).client.post(sent.path).status_code == 400
