"""A row whose data key cannot be opened fails alone: the pass goes on and sends the rest.

Real database, real STARTTLS sink; the damage is done to ``data_keys`` the way a
corrupted disk or a bad restore would: one byte of the wrapped key flipped, or
a KEK version the keyring does not hold.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from notifier import worker
from notifier.sink import MailSink
from portal.audit import NO_REQUEST, SYSTEM
from portal.config import settings_of
from portal.crypto.errors import KeyUnavailable
from portal.extensions import db
from portal.models import AuditEvent, DataKey, Message, Notification, User
from portal.services import accounts, messaging
from tests.notifier.test_worker import (
    PATIENT_NAME,
    app_for,
    fixed,
    make_message,
    queue_pickup,
    seed,
)

OTHER_EMAIL = "r.okafor@patients.example.org"
OTHER_NAME = "Remi Okafor"

# (how the key is damaged, the reason the failed row records)
DAMAGE = [("flip-byte", "content-tampered"), ("unknown-kek", "key-unavailable")]


@pytest.fixture
def t0() -> datetime:
    """The moment the worker runs at: just after the test seeded its rows."""
    return datetime.now(UTC) + timedelta(seconds=30)


def damage_key(session: Session, data_key_id: int, how: str) -> None:
    """Damage one wrapped data key in place (flushed)."""
    row = session.get(DataKey, data_key_id)
    assert row is not None
    assert row.wrapped is not None
    if how == "flip-byte":
        middle = len(row.wrapped) // 2
        row.wrapped = (
            row.wrapped[:middle] + bytes([row.wrapped[middle] ^ 0x01]) + row.wrapped[middle + 1 :]
        )
    else:
        row.kek_version = 99  # no such KEK in the keyring
    session.flush()


def notices_of(message_id: int) -> list[Notification]:
    """The message's notices as stored now (call inside an app context)."""
    stmt = select(Notification).where(Notification.message_id == message_id)
    return list(db.session.scalars(stmt.execution_options(populate_existing=True)))


def failed_events(notice: Notification) -> list[AuditEvent]:
    """The notice.failed audit events for ``notice``."""
    stmt = select(AuditEvent).where(
        AuditEvent.action == "notice.failed", AuditEvent.target_id == notice.public_id
    )
    return list(db.session.scalars(stmt))


def assert_failed_alone(
    message_id: int, reason: str, delivered_count: int, sink: MailSink
) -> Notification:
    """The message has one notice, failed with ``reason``, link erased, audited once, shown
    to staff; the sink holds ``delivered_count`` emails. Returns the failed notice."""
    [bad] = [n for n in notices_of(message_id) if n.kind == "reminder"]
    assert (bad.status, bad.failure_reason, bad.payload_sealed) == ("failed", reason, None)
    [event] = failed_events(bad)
    assert (event.outcome, event.message_id) == ("failure", message_id)
    assert json.loads(event.details)["reason"] == reason
    assert PATIENT_NAME not in (event.details or "")
    message = db.session.get(Message, message_id)
    assert message is not None
    timeline = [(e.what, e.detail) for e in messaging.status(db.session, message)]
    assert ("Reminder email failed", reason) in timeline
    assert sink.handler.stored == delivered_count
    return bad


@pytest.mark.parametrize(("how", "reason"), DAMAGE)
def test_a_reminder_whose_recipient_key_is_damaged_fails_alone(
    make_app: Callable[..., Flask],
    sink: MailSink,
    delivered: Callable[[MailSink], list[EmailMessage]],
    t0: datetime,
    how: str,
    reason: str,
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    seeded = seed(app)  # a pickup notice due now for a healthy patient
    old = t0 - timedelta(days=4)
    with app.app_context():
        session = db.session
        staff = session.get(User, seeded.staff_id)
        patient = session.get(User, seeded.patient_id)
        assert staff is not None
        assert patient is not None
        other = accounts.create_user(
            session,
            role="patient",
            email=OTHER_EMAIL,
            name=OTHER_NAME,
            dob=date(1990, 1, 2),
            actor=SYSTEM,
            meta=NO_REQUEST,
        ).user
        bad_id = make_message(session, staff, other, created_at=old).id  # reminder due
        good_id = make_message(session, staff, patient, created_at=old).id  # reminder due
        damage_key(session, other.data_key_id, how)
        session.commit()

    stats = worker.drain(app, "w1", clock=fixed(t0))  # must not raise

    assert stats.sent == 2
    assert {m["To"] for m in delivered(sink)} == {patient.email}
    with app.app_context():
        assert [n.status for n in notices_of(good_id)] == ["sent"]
        bad = assert_failed_alone(bad_id, reason, 2, sink)
        message = db.session.get(Message, bad_id)
        assert message is not None
        assert message.reminded_at == t0

    again = worker.drain(app, "w1", clock=fixed(t0 + timedelta(hours=1)))

    assert again.processed == 0
    with app.app_context():
        assert [n.id for n in notices_of(bad_id)] == [bad.id]  # not retried on every pass
        assert len(failed_events(bad)) == 1
    assert sink.handler.stored == 2


@pytest.mark.parametrize(("how", "reason"), DAMAGE)
def test_a_notice_whose_message_key_is_damaged_fails_alone(
    make_app: Callable[..., Flask],
    sink: MailSink,
    t0: datetime,
    how: str,
    reason: str,
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    seeded = seed(app, notices_count=2)  # two healthy pickup notices due now
    with app.app_context():
        session = db.session
        staff = session.get(User, seeded.staff_id)
        patient = session.get(User, seeded.patient_id)
        assert staff is not None
        assert patient is not None
        bad = make_message(session, staff, patient, created_at=t0 - timedelta(days=4))
        pickup_id, _url = queue_pickup(session, bad, patient)  # the PHI guard cannot read it
        damage_key(session, bad.data_key_id, how)
        bad_id = bad.id
        session.commit()

    stats = worker.drain(app, "w1", clock=fixed(t0))  # must not raise

    assert (stats.sent, stats.failed) == (2, 2)
    with app.app_context():
        assert_failed_alone(bad_id, reason, 2, sink)
        pickup = db.session.get(Notification, pickup_id)
        assert pickup is not None
        assert (pickup.status, pickup.failure_reason, pickup.payload_sealed) == (
            "failed",
            reason,
            None,
        )
        assert [n.status for n in map(db.session.get, [Notification] * 2, seeded.notice_ids)] == [
            "sent",
            "sent",
        ]

    again = worker.drain(app, "w1", clock=fixed(t0 + timedelta(hours=1)))

    assert again.processed == 0
    with app.app_context():
        total = db.session.scalar(select(func.count()).select_from(Notification))
        assert total == 4
    assert sink.handler.stored == 2


def test_a_broken_reminder_does_not_stop_the_others(
    make_app: Callable[..., Flask],
    sink: MailSink,
    monkeypatch: pytest.MonkeyPatch,
    t0: datetime,
) -> None:
    """Any error in one reminder (not only a key) is confined: the others are queued and sent."""
    app = app_for(make_app, sink.port, sink.cert_file)
    seeded = seed(app)
    old = t0 - timedelta(days=4)
    with app.app_context():
        staff = db.session.get(User, seeded.staff_id)
        patient = db.session.get(User, seeded.patient_id)
        assert staff is not None
        assert patient is not None
        ids = [make_message(db.session, staff, patient, created_at=old).id for _ in range(2)]
        db.session.commit()
    real = messaging.remind

    def remind(session: Session, message: Message, now: datetime) -> Notification:
        if message.id == ids[0]:
            raise RuntimeError("boom")
        return real(session, message, now)

    monkeypatch.setattr(messaging, "remind", remind)

    stats = worker.drain(app, "w1", clock=fixed(t0))

    assert stats.sent == 2  # the pickup and the second message's reminder
    with app.app_context():
        assert notices_of(ids[0]) == []
        first = db.session.get(Message, ids[0])
        assert first is not None
        assert first.reminded_at is None  # rolled back alone: tried again next pass
        assert [n.status for n in notices_of(ids[1])] == ["sent"]


def test_an_unreadable_keyring_fails_no_row(
    make_app: Callable[..., Flask], sink: MailSink, t0: datetime
) -> None:
    """The keyring is every row's: unreadable, it ends the pass and leaves the rows queued."""
    app = app_for(make_app, sink.port, sink.cert_file)
    seeded = seed(app)
    keyring = Path(settings_of(app).keyring_path)
    good = keyring.read_bytes()
    keyring.write_text("not a keyring", encoding="utf-8")

    with pytest.raises(KeyUnavailable):
        worker.drain(app, "w1", clock=fixed(t0))

    with app.app_context():
        stored = db.session.get(Notification, seeded.notice_ids[0])
        assert stored is not None
        assert (stored.status, stored.attempts) == ("queued", 0)
        assert stored.payload_sealed is not None
    keyring.write_bytes(good)
    assert worker.drain(app, "w1", clock=fixed(t0)).sent == 1
    assert sink.handler.stored == 1
