"""The outbox: enqueue (sealed URL), claim (due, leases, batches), sent / retry / failed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from notifier import outbox
from portal.audit import NO_REQUEST, SYSTEM
from portal.extensions import db
from portal.models import AuditEvent, Message, Notification, User
from portal.models.types import new_public_id
from portal.services import accounts, keys, notices
from portal.services.errors import ServiceError

URL = "https://portal.example.org/invite/abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
W1 = outbox.Claim("w1", T0)  # what outbox.claim(session, "w1", now=T0) holds


@pytest.fixture
def session(app: Flask) -> Iterator[Any]:
    """The app's session, inside an app context."""
    with app.app_context():
        yield db.session


@pytest.fixture
def staff(session: Any) -> User:
    """A staff member to send notices to."""
    return accounts.create_user(
        session,
        role="staff",
        email="ada.staff@clinic.example.org",
        name="Ada Staff",
        actor=SYSTEM,
        meta=NO_REQUEST,
    ).user


def queue(session: Any, user: User, n: int = 1, due: datetime = T0) -> list[int]:
    """Queue ``n`` invite notices due at ``due``, committed; returns their ids."""
    ids = [
        notices.enqueue(session, kind="invite", recipient=user, url=f"{URL}{i}", due=due).id
        for i in range(n)
    ]
    session.commit()
    return ids


def test_enqueue_seals_the_url_under_the_recipients_key(session: Any, staff: User) -> None:
    notice = notices.enqueue(session, kind="invite", recipient=staff, url=URL)

    assert notice.payload_sealed is not None
    assert URL.encode() not in notice.payload_sealed
    assert notices.open_payload(session, notice) == URL
    assert (notice.status, notice.attempts) == ("queued", 0)


def test_enqueue_refuses_an_unknown_kind(session: Any, staff: User) -> None:
    with pytest.raises(ServiceError):
        notices.enqueue(session, kind="newsletter", recipient=staff, url=URL)


def test_claim_takes_due_rows_only_oldest_first(session: Any, staff: User) -> None:
    later = queue(session, staff, 2, due=T0 + timedelta(minutes=1))
    due = queue(session, staff, 2, due=T0 - timedelta(minutes=1))

    claimed = outbox.claim(session, "w1", now=T0)

    assert claimed == due
    rows = session.scalars(select(Notification).where(Notification.id.in_(due))).all()
    assert {(r.status, r.claimed_by, r.claimed_at) for r in rows} == {("sending", "w1", T0)}
    assert outbox.claim(session, "w2", now=T0) == []
    assert outbox.claim(session, "w2", now=T0 + timedelta(minutes=2)) == later


def test_claim_respects_the_batch_size(session: Any, staff: User) -> None:
    ids = queue(session, staff, 5)

    first = outbox.claim(session, "w1", batch=3, now=T0)
    second = outbox.claim(session, "w2", batch=3, now=T0)

    assert first == ids[:3]
    assert second == ids[3:]


def test_a_crashed_workers_rows_are_claimed_again_after_the_lease(
    session: Any, staff: User
) -> None:
    ids = queue(session, staff, 2)
    assert outbox.claim(session, "dead", now=T0) == ids

    assert outbox.claim(session, "w2", now=T0 + outbox.LEASE - timedelta(seconds=1)) == []
    assert outbox.claim(session, "w2", now=T0 + outbox.LEASE + timedelta(seconds=1)) == ids


def test_claim_never_takes_finished_rows(session: Any, staff: User) -> None:
    ids = queue(session, staff, 3)
    outbox.claim(session, "w1", now=T0)
    outbox.mark_sent(session, ids[0], "250 ok", now=T0, claim=W1)
    outbox.mark_failed(session, ids[1], "smtp-5xx:550", claim=W1)
    outbox.mark_cancelled(session, ids[2], claim=W1)
    session.commit()

    assert outbox.claim(session, "w2", now=T0 + timedelta(days=2)) == []


def test_mark_sent_erases_the_url_and_audits(session: Any, staff: User) -> None:
    [notice_id] = queue(session, staff)
    outbox.claim(session, "w1", now=T0)

    row = outbox.mark_sent(session, notice_id, "250 2.0.0 OK queued as 17", now=T0, claim=W1)
    session.commit()

    assert (row.status, row.payload_sealed, row.sent_at, row.attempts) == ("sent", None, T0, 1)
    assert row.smtp_response == "250 2.0.0 OK queued as 17"
    event = session.scalar(select(AuditEvent).where(AuditEvent.action == "notice.sent"))
    assert (event.target_type, event.target_id, event.patient_id) == (
        "notification",
        row.public_id,
        None,
    )
    assert json.loads(event.details) == {"kind": "invite", "attempts": 1}


def test_mark_failed_erases_the_url_and_audits_the_reason(session: Any, staff: User) -> None:
    [notice_id] = queue(session, staff)

    row = outbox.mark_failed(session, notice_id, "starttls-unavailable", claim=None)

    assert (row.status, row.payload_sealed, row.failure_reason) == (
        "failed",
        None,
        "starttls-unavailable",
    )
    event = session.scalar(select(AuditEvent).where(AuditEvent.action == "notice.failed"))
    assert (event.outcome, json.loads(event.details)["reason"]) == (
        "failure",
        "starttls-unavailable",
    )


def test_mark_retry_backs_off_exponentially(session: Any, staff: User) -> None:
    [notice_id] = queue(session, staff)
    delays = []
    for _ in range(10):
        row = outbox.mark_retry(session, notice_id, "smtp-4xx:451", now=T0, claim=None)
        delays.append(row.next_attempt_at - T0)

    minutes = [int(d.total_seconds() // 60) for d in delays]
    assert minutes == [1, 2, 4, 8, 16, 32, 64, 128, 240, 240]
    assert (row.status, row.attempts, row.claimed_by) == ("queued", 10, None)
    assert row.payload_sealed is not None


def test_mark_retry_gives_up_after_about_a_day(session: Any, staff: User) -> None:
    [notice_id] = queue(session, staff)
    waited = timedelta()
    row = outbox.load(session, notice_id)
    assert row is not None
    while row.status == "queued":
        row = outbox.mark_retry(session, notice_id, "connect-failed", now=T0 + waited, claim=None)
        if row.status == "queued":
            waited = row.next_attempt_at - T0

    assert timedelta(hours=20) <= waited <= outbox.RETRY_WINDOW
    assert (row.status, row.failure_reason, row.payload_sealed) == (
        "failed",
        "connect-failed",
        None,
    )
    assert session.scalar(select(AuditEvent).where(AuditEvent.action == "notice.failed"))


def may_send(session: Any, notice_id: int, claim: outbox.Claim, now: datetime) -> bool:
    """Whether the worker's fence lets ``claim`` send the notice at ``now``."""
    return notice_id in outbox.may_send_many(session, [notice_id], claim, now)


def test_a_reclaimed_row_cannot_be_sent_or_marked_by_the_old_holder(
    session: Any, staff: User
) -> None:
    [notice_id] = queue(session, staff)
    outbox.claim(session, "w1", now=T0)
    later = T0 + outbox.LEASE + timedelta(seconds=1)
    assert outbox.claim(session, "w1", now=later) == [notice_id]  # same id, new claim
    session.commit()

    assert not may_send(session, notice_id, W1, later)
    for mark in (
        lambda: outbox.mark_sent(session, notice_id, "250 ok", now=T0, claim=W1),
        lambda: outbox.mark_failed(session, notice_id, "smtp-5xx:550", claim=W1),
        lambda: outbox.mark_retry(session, notice_id, "smtp-4xx:451", now=T0, claim=W1),
        lambda: outbox.mark_cancelled(session, notice_id, claim=W1),
        lambda: outbox.mark_sent(session, notice_id, "250 ok", now=T0, claim=None),
    ):
        with pytest.raises(outbox.ClaimLost):
            mark()
    outbox.release(session, [notice_id], W1)
    session.commit()

    row = outbox.load(session, notice_id)
    assert row is not None
    assert (row.status, row.claimed_at, row.attempts) == ("sending", later, 0)
    assert row.payload_sealed is not None
    assert session.scalar(select(AuditEvent).where(AuditEvent.action.like("notice.%"))) is None
    assert may_send(session, notice_id, outbox.Claim("w1", later), later)


def test_a_claim_whose_lease_ran_out_may_not_send(session: Any, staff: User) -> None:
    [notice_id] = queue(session, staff)
    outbox.claim(session, "w1", now=T0)
    session.commit()

    assert may_send(session, notice_id, W1, T0 + outbox.LEASE - timedelta(seconds=1))
    assert not may_send(session, notice_id, W1, T0 + outbox.LEASE)


def test_release_hands_rows_back(session: Any, staff: User) -> None:
    ids = queue(session, staff, 2)
    outbox.claim(session, "w1", now=T0)

    outbox.release(session, ids, W1)
    session.commit()

    assert outbox.claim(session, "w2", now=T0) == ids


def test_a_worker_started_again_under_its_id_takes_its_rows_back_at_once(
    session: Any, staff: User
) -> None:
    ids = queue(session, staff, 2)
    assert outbox.claim(session, "host-a", now=T0) == ids  # then host-a is killed
    session.commit()
    soon = T0 + timedelta(seconds=1)

    assert outbox.claim(session, "host-b", now=soon) == []  # others wait for the lease
    assert outbox.claim(session, "host-a", now=soon) == ids  # its own, at once
    session.commit()
    assert not may_send(session, ids[0], outbox.Claim("host-a", T0), soon)  # old claim
    assert may_send(session, ids[0], outbox.Claim("host-a", soon), soon)


def test_the_lease_is_a_parameter(session: Any, staff: User) -> None:
    ids = queue(session, staff, 1)
    short = timedelta(seconds=3)
    outbox.claim(session, "dead", now=T0, lease=short)
    session.commit()

    assert outbox.claim(session, "w2", now=T0 + short - timedelta(seconds=1), lease=short) == []
    assert outbox.claim(session, "w2", now=T0 + short + timedelta(seconds=1), lease=short) == ids


def test_renew_moves_the_lease_of_the_rows_still_held(session: Any, staff: User) -> None:
    ids = queue(session, staff, 3)
    outbox.claim(session, "w1", now=T0)
    outbox.mark_sent(session, ids[0], "250 ok", now=T0, claim=W1)  # done: not renewed
    session.commit()
    later = T0 + outbox.LEASE - timedelta(seconds=1)

    assert outbox.renew(session, ids, W1, later) == ids[1:]
    session.commit()

    renewed = outbox.Claim("w1", later)
    beyond = T0 + outbox.LEASE + timedelta(seconds=1)  # past the first claim's lease
    assert outbox.claim(session, "w2", now=beyond) == []  # still held
    assert may_send(session, ids[1], renewed, beyond)
    assert not may_send(session, ids[1], W1, later)  # the old claim fences no more
    assert outbox.renew(session, ids, W1, beyond) == []
    with pytest.raises(outbox.ClaimLost):
        outbox.mark_sent(session, ids[1], "250 ok", now=beyond, claim=W1)


def test_release_for_a_transport_fault_keeps_the_link_and_counts_no_attempt(
    session: Any, staff: User
) -> None:
    ids = queue(session, staff, 2)
    outbox.claim(session, "w1", now=T0)

    outbox.release(session, ids, W1, reason="tls-verify-failed")
    session.commit()

    for notice_id in ids:
        row = outbox.load(session, notice_id)
        assert row is not None
        assert (row.status, row.attempts, row.failure_reason) == ("queued", 0, "tls-verify-failed")
        assert (row.claimed_by, row.next_attempt_at) == (None, T0)
        assert row.payload_sealed is not None
    assert session.scalar(select(AuditEvent).where(AuditEvent.action.like("notice.%"))) is None
    assert outbox.claim(session, "w2", now=T0) == ids  # due at once


def _message(session: Any, sender: User, recipient: User) -> Message:
    key_row, key = keys.create(session, "message")
    pid = new_public_id()
    message = Message(
        public_id=pid,
        sender_id=sender.id,
        recipient_id=recipient.id,
        data_key_id=key_row.id,
        expires_at=T0 + timedelta(days=7),
        subject_sealed=keys.seal_text(key, "messages", "subject", pid, "s"),
        body_sealed=keys.seal_text(key, "messages", "body", pid, "b"),
    )
    session.add(message)
    session.flush()
    return message


def test_cancel_and_status_for_message(session: Any, staff: User) -> None:
    patient = accounts.create_user(
        session,
        role="patient",
        email="pat@patients.example.org",
        name="Pat Example",
        issue_access_code=True,
        actor=SYSTEM,
        meta=NO_REQUEST,
    ).user
    message = _message(session, staff, patient)
    first, second = (
        notices.enqueue(session, kind="pickup", recipient=patient, url=URL, message=message, due=T0)
        for _ in range(2)
    )
    session.commit()
    outbox.claim(session, "w1", batch=1, now=T0)

    assert notices.cancel_for_message(session, message.id) == 1
    session.commit()

    statuses = [(n.id, n.status) for n in notices.status_for_message(session, message.id)]
    assert statuses == [(first.id, "sending"), (second.id, "cancelled")]
    assert second.payload_sealed is None
