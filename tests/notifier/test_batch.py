"""The batch path (issue 12, throughput): a batch is read in a few queries, its emails
built first, then sent in slices, each fenced on the claim in one statement and recorded
in one commit. What a per-row commit gave must still hold: a row another worker took is
neither sent nor recorded by this one, one row's failure is its own, and a crash inside
a slice only ever sends that slice's rows again, with the same Message-IDs.

Real database (SQLite and PostgreSQL), real STARTTLS sink.
"""

from __future__ import annotations

import logging
import smtplib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import event, select, update

from notifier import outbox, worker
from notifier.sink import MailSink
from notifier.smtp import SmtpTransport, make_message_id
from portal.extensions import db
from portal.models import AuditEvent, Message, Notification, User
from tests.notifier.test_worker import (
    DOMAIN,
    PATIENT_EMAIL,
    Crash,
    _delivered_ids,
    app_for,
    fixed,
    make_message,
    make_people,
    queue_pickup,
    seed,
    t0,  # noqa: F401  (the fixture)
)
from tests.notifier.test_worker_bad_keys import damage_key


def _states(app: Flask) -> dict[int, tuple[str, str | None]]:
    with app.app_context():
        rows = db.session.scalars(select(Notification).order_by(Notification.id))
        return {r.id: (r.status, r.claimed_by) for r in rows}


def _sent_events(app: Flask) -> Counter[str]:
    """notice.sent audit events per notice public id."""
    with app.app_context():
        stmt = select(AuditEvent.target_id).where(AuditEvent.action == "notice.sent")
        return Counter(db.session.scalars(stmt))


def _message_ids(app: Flask, ids: list[int]) -> set[str]:
    with app.app_context():
        stmt = select(Notification.public_id).where(Notification.id.in_(ids))
        return {make_message_id(p, DOMAIN) for p in db.session.scalars(stmt)}


def test_rows_another_worker_took_before_the_slice_are_neither_sent_nor_marked(
    make_app: Callable[..., Flask],
    sink: MailSink,
    monkeypatch: pytest.MonkeyPatch,
    t0: datetime,  # noqa: F811
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    ids = seed(app, notices_count=6).notice_ids
    taken = ids[3:5]
    real = worker._prepare
    calls = 0

    def taken_meanwhile(*args: Any, **kwargs: Any) -> Any:
        # While A builds its batch, B claims two of A's rows (as after an expired lease).
        nonlocal calls
        calls += 1
        if calls == 3:
            with app.app_context():
                db.session.execute(
                    update(Notification)
                    .where(Notification.id.in_(taken))
                    .values(claimed_by="B", claimed_at=t0 + timedelta(seconds=1))
                )
                db.session.commit()
        return real(*args, **kwargs)

    monkeypatch.setattr(worker, "_prepare", taken_meanwhile)
    stats = worker.drain(app, "A", clock=fixed(t0))

    assert (stats.sent, stats.skipped) == (4, 2)
    states = _states(app)
    assert [states[i] for i in taken] == [("sending", "B")] * 2  # B's to record
    assert {states[i] for i in ids if i not in taken} == {("sent", "A")}
    delivered = _delivered_ids(sink)
    assert not set(delivered) & _message_ids(app, taken)  # A never sent them
    assert set(delivered.values()) == {1}
    assert len(delivered) == 4
    assert sum(_sent_events(app).values()) == 4


def test_mark_sent_many_marks_only_the_rows_the_claim_still_holds(
    make_app: Callable[..., Flask],
    sink: MailSink,
    t0: datetime,  # noqa: F811
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    ids = seed(app, notices_count=4).notice_ids
    with app.app_context():
        session = db.session
        claimed = outbox.claim(session, "A", now=t0)
        session.commit()
        # The lease of one row ran out and B took it: A's claim no longer holds it.
        session.execute(
            update(Notification)
            .where(Notification.id == ids[1])
            .values(claimed_by="B", claimed_at=t0 + outbox.LEASE)
        )
        session.commit()
        replies = {i: f"250 2.0.0 queued as {i}" for i in claimed}
        marked = outbox.mark_sent_many(session, replies, t0, claim=outbox.Claim("A", t0))
        session.commit()

    assert claimed == ids
    assert marked == {ids[0], ids[2], ids[3]}
    states = _states(app)
    assert states[ids[1]] == ("sending", "B")
    with app.app_context():
        rows = {r.id: r for r in db.session.scalars(select(Notification))}
        assert rows[ids[1]].attempts == 0
        assert rows[ids[1]].payload_sealed is not None
        assert rows[ids[2]].smtp_response == f"250 2.0.0 queued as {ids[2]}"
        assert (rows[ids[2]].attempts, rows[ids[2]].payload_sealed) == (1, None)
        lost = rows[ids[1]].public_id
    events = _sent_events(app)
    assert lost not in events
    assert sum(events.values()) == 3


def test_an_unreadable_key_in_the_middle_of_a_slice_fails_that_row_only(
    make_app: Callable[..., Flask],
    sink: MailSink,
    t0: datetime,  # noqa: F811
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    seeded = seed(app, notices_count=2)
    with app.app_context():
        session = db.session
        staff = session.get(User, seeded.staff_id)
        patient = session.get(User, seeded.patient_id)
        assert staff is not None
        assert patient is not None
        bad = make_message(session, staff, patient)
        bad_notice, _ = queue_pickup(session, bad, patient)
        damage_key(session, bad.data_key_id, "flip-byte")
        good = make_message(session, staff, patient)
        after = [queue_pickup(session, good, patient)[0] for _ in range(2)]
        session.commit()

    stats = worker.drain(app, "w1", clock=fixed(t0))  # one batch, one slice

    assert (stats.sent, stats.failed) == (4, 1)
    states = _states(app)
    assert states[bad_notice] == ("failed", "w1")
    assert {states[i] for i in [*seeded.notice_ids, *after]} == {("sent", "w1")}
    with app.app_context():
        failed = db.session.get(Notification, bad_notice)
        assert failed is not None
        assert (failed.failure_reason, failed.payload_sealed) == ("content-tampered", None)
    assert sink.handler.stored == 4


def test_a_crash_while_recording_a_slice_resends_only_that_slice_with_the_same_ids(
    make_app: Callable[..., Flask],
    sink: MailSink,
    monkeypatch: pytest.MonkeyPatch,
    t0: datetime,  # noqa: F811
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    ids = seed(app, notices_count=6).notice_ids

    def killed(*args: Any, **kwargs: Any) -> set[int]:
        raise Crash  # the process dies between the relay's 250s and the slice's commit

    monkeypatch.setattr(outbox, "mark_sent_many", killed)
    with pytest.raises(Crash):
        worker.drain(app, "A", clock=fixed(t0))
    monkeypatch.undo()

    assert set(_states(app).values()) == {("sending", "A")}  # nothing recorded, nothing lost
    assert sink.handler.stored == 6
    late = t0 + outbox.LEASE + timedelta(seconds=1)
    assert worker.drain(app, "B", clock=fixed(late)).sent == 6

    delivered = _delivered_ids(sink)
    assert set(delivered) == _message_ids(app, ids)
    assert set(delivered.values()) == {2}  # each sent again, with its own Message-ID
    assert set(_states(app).values()) == {("sent", "B")}
    assert set(_sent_events(app).values()) == {1}  # recorded once


@contextmanager
def _statements(app: Flask) -> Iterator[list[str]]:
    """The SQL statements the app's engine runs inside the block."""
    seen: list[str] = []

    def count(*args: Any) -> None:
        seen.append(args[2])

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_a_batch_costs_a_bounded_number_of_statements_whatever_its_size(
    make_app: Callable[..., Flask],
    sink: MailSink,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
    t0: datetime,  # noqa: F811
) -> None:
    # One slice, revocations re-checked by count alone: the figures below cannot depend on
    # how fast this machine sends.
    monkeypatch.setattr(worker, "SLICE_SECONDS", 3600.0)
    monkeypatch.setattr(worker, "RECHECK_SECONDS", 3600.0)
    app = app_for(make_app, sink.port, sink.cert_file)
    seeded = seed(app, notices_count=5)
    with _statements(app) as few:
        assert worker.drain(app, "w1", clock=fixed(t0)).sent == 5
    with app.app_context():
        patient = db.session.get(User, seeded.patient_id)
        sender = db.session.get(User, seeded.staff_id)
        assert patient is not None
        assert sender is not None
        for _ in range(40):  # each notice of its own message, as the portal sends them
            queue_pickup(db.session, make_message(db.session, sender, patient), patient)
        db.session.commit()
    later = t0 + timedelta(seconds=1)
    with _statements(app) as many:
        assert worker.drain(app, "w1", clock=fixed(later)).sent == 40

    # The slice's messages read again for revocations every RECHECK_SENDS sends (before the
    # 9th, 17th, ... send), not per notice; counted apart.
    rechecks = [len([s for s in run if _is_recheck(s)]) for run in (few, many)]
    assert rechecks == [(5 - 1) // worker.RECHECK_SENDS, (40 - 1) // worker.RECHECK_SENDS]
    few, many = ([s for s in run if not _is_recheck(s)] for run in (few, many))
    # Eight times the notices in the one batch: a few statements more, not one per notice.
    # (On SQLite the ORM inserts the audit events one by one, in-process: not counted.)
    counted = [
        len([s for s in run if not s.startswith("INSERT INTO audit_events")]) for run in (few, many)
    ]
    if backend == "postgresql":
        counted = [len(few), len(many)]
    assert counted[1] - counted[0] <= 5, "\n".join(s[:90].replace("\n", " ") for s in many)


def _is_recheck(statement: str) -> bool:
    """outbox.messages_gone's read: the ids alone of the slice's messages gone meanwhile."""
    return " ".join(statement.split()).startswith("SELECT messages.id FROM messages WHERE")


# -- review of the batch path (issue 12) ----------------------------------------------------


def test_an_unexpected_error_while_sending_is_its_rows_alone(
    make_app: Callable[..., Flask],
    sink: MailSink,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    t0: datetime,  # noqa: F811
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    ids = seed(app, notices_count=4).notice_ids
    bad = ids[0]  # first of the batch: it used to hand the batch back at every pass
    [bad_message_id] = _message_ids(app, [bad])
    real_send = SmtpTransport.send

    def send(self: SmtpTransport, msg: EmailMessage) -> str:
        if msg["Message-ID"] == bad_message_id:  # e.g. flattening or DKIM signing it
            raise UnicodeEncodeError("ascii", PATIENT_EMAIL, 0, 1, "ordinal not in range")
        return real_send(self, msg)

    monkeypatch.setattr(SmtpTransport, "send", send)
    with caplog.at_level(logging.INFO, logger="notifier"):
        passes = [worker.drain(app, "w1", clock=fixed(t0 + timedelta(seconds=n))) for n in range(3)]

    assert [(s.sent, s.retrying) for s in passes] == [(3, 1), (0, 0), (0, 0)]
    assert sink.handler.stored == 3
    with app.app_context():
        failed = db.session.get(Notification, bad)
        assert failed is not None
        assert (failed.status, failed.failure_reason, failed.attempts) == (
            "queued",
            "internal-error",
            1,
        )
        assert failed.next_attempt_at > t0 + timedelta(seconds=2)
    [logged] = [r for r in caplog.records if "unexpected error while sending" in r.getMessage()]
    assert (
        logged.getMessage() == f"notice {bad}: unexpected error while sending (UnicodeEncodeError)"
    )
    assert logged.exc_info is None  # its text and frames could quote the email
    assert PATIENT_EMAIL not in caplog.text


def test_an_unexpected_error_mid_transaction_leaves_no_half_transaction_behind(
    make_app: Callable[..., Flask],
    sink: MailSink,
    monkeypatch: pytest.MonkeyPatch,
    t0: datetime,  # noqa: F811
) -> None:
    """Regression (review of the internal-error path): an unexpected error after the relay
    took MAIL left the connection mid-transaction, so the next notice's MAIL met "503 nested
    MAIL", read as a misconfigured sender: every row handed back, a false relay alarm."""
    app = app_for(make_app, sink.port, sink.cert_file)
    seed(app, notices_count=4)
    real_rcpt = smtplib.SMTP.rcpt
    calls = 0

    def rcpt(self: smtplib.SMTP, *args: Any, **kwargs: Any) -> tuple[int, bytes]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug between MAIL and RCPT")
        return real_rcpt(self, *args, **kwargs)

    monkeypatch.setattr(smtplib.SMTP, "rcpt", rcpt)
    stats = worker.drain(app, "w1", clock=fixed(t0))
    assert stats.transport_error is None
    assert (stats.sent, stats.retrying, stats.delayed) == (3, 1, 0)
    assert sink.handler.stored == 3


def test_an_unexpected_error_every_email_meets_is_the_workers_and_counts_no_attempt(
    make_app: Callable[..., Flask],
    sink: MailSink,
    monkeypatch: pytest.MonkeyPatch,
    t0: datetime,  # noqa: F811
) -> None:
    """Regression (review of the internal-error path): a bug every send meets made each row
    an internal-error retry, using up every notice's attempts until the whole queue failed
    for good. After INTERNAL_ERRORS_IN_A_ROW the pass ends as the worker's fault instead."""
    app = app_for(make_app, sink.port, sink.cert_file)
    ids = seed(app, notices_count=6).notice_ids

    def broken(self: SmtpTransport, msg: EmailMessage) -> str:
        raise UnicodeEncodeError("ascii", "x", 0, 1, "a bug in every email")

    monkeypatch.setattr(SmtpTransport, "send", broken)
    for n in range(3):
        with pytest.raises(worker.UnexpectedSendErrors):
            worker.drain(app, "w1", clock=fixed(t0 + timedelta(seconds=n)))
    monkeypatch.undo()
    with app.app_context():
        rows = [db.session.get(Notification, i) for i in ids]
        assert [(r.status, r.attempts) for r in rows if r is not None] == [("queued", 0)] * 6
    assert worker.drain(app, "w1", clock=fixed(t0 + timedelta(seconds=5))).sent == 6  # fixed


def _revoke(app: Flask, message_id: int, when: datetime) -> None:
    """Revoke the message from another session (as staff would, in the portal)."""
    with app.app_context():  # a context of its own: its own session and connection
        db.session.execute(update(Message).where(Message.id == message_id).values(revoked_at=when))
        db.session.commit()


RECHECK_WITHIN = 0.06  # seconds: a slice sees a revocation at most this long after it


@pytest.mark.parametrize("trigger", ["time", "sends"])
def test_a_revocation_during_a_slice_stops_its_later_sends(
    make_app: Callable[..., Flask],
    sink: MailSink,
    monkeypatch: pytest.MonkeyPatch,
    t0: datetime,  # noqa: F811
    trigger: str,
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    seeded = seed(app, notices_count=5)
    real_send = SmtpTransport.send
    if trigger == "sends":  # checked again after every send, whatever the time
        monkeypatch.setattr(worker, "RECHECK_SENDS", 1)
        monkeypatch.setattr(worker, "RECHECK_SECONDS", 3600.0)

    def send(self: SmtpTransport, msg: EmailMessage) -> str:
        reply = real_send(self, msg)
        if sink.handler.stored == 1:  # the slice's first send is through: staff revoke now
            _revoke(app, seeded.message_id, t0)
            if trigger == "time":
                time.sleep(RECHECK_WITHIN)
        return reply

    monkeypatch.setattr(SmtpTransport, "send", send)
    stats = worker.drain(app, "w1", clock=fixed(t0))

    assert sink.handler.stored == 1
    assert (stats.sent, stats.skipped) == (1, 4)
    if trigger == "time":
        assert worker.RECHECK_SECONDS <= RECHECK_WITHIN
    with app.app_context():
        stmt = select(Notification.status).where(Notification.id.in_(seeded.notice_ids))
        assert Counter(db.session.scalars(stmt)) == {"sent": 1, "cancelled": 4}


def test_a_relay_fault_is_kept_without_the_frames_that_hold_the_batch(
    make_app: Callable[..., Flask],
    sink: MailSink,
    other_ca_file: str,
    t0: datetime,  # noqa: F811
) -> None:
    app = app_for(make_app, sink.port, other_ca_file)  # the handshake fails at the first send
    seed(app, notices_count=3)

    stats = worker.drain(app, "w1", clock=fixed(t0))

    fault = stats.transport_error
    assert fault is not None
    assert stats.delayed == 3
    chained: list[BaseException] = []
    err: BaseException | None = fault
    while err is not None:
        chained.append(err)
        err = err.__cause__ or err.__context__
    # Kept for the whole backoff: its frames would keep every rendered email (live links).
    assert [e.__traceback__ for e in chained] == [None] * len(chained)


def test_reminders_are_scanned_again_at_once_while_a_scan_fills_its_batch() -> None:
    assert worker.reminders_due(None, False, 5.0)  # the first pass
    assert not worker.reminders_due(100.0, False, 100.0 + worker.REMINDER_EVERY - 1)
    assert worker.reminders_due(100.0, False, 100.0 + worker.REMINDER_EVERY)
    assert worker.reminders_due(100.0, True, 101.0)  # the last scan was cut: a backlog


def test_a_pass_says_when_its_reminder_scan_was_cut(
    make_app: Callable[..., Flask],
    sink: MailSink,
    monkeypatch: pytest.MonkeyPatch,
    t0: datetime,  # noqa: F811
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    with app.app_context():
        staff, patient = make_people(db.session)
        old = t0 - timedelta(days=4)
        for _ in range(3):
            make_message(db.session, staff, patient, created_at=old)
        db.session.commit()
    monkeypatch.setattr(worker, "REMINDER_BATCH", 2)

    passes = [worker.drain(app, "w1", clock=fixed(t0 + timedelta(seconds=n))) for n in range(3)]

    assert [s.more_reminders for s in passes] == [True, False, False]
    assert sum(s.sent for s in passes) == 3


def test_a_cut_reminder_scan_that_queued_none_waits_as_usual(
    make_app: Callable[..., Flask],
    sink: MailSink,
    monkeypatch: pytest.MonkeyPatch,
    t0: datetime,  # noqa: F811
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    with app.app_context():
        staff, patient = make_people(db.session)
        for _ in range(3):
            make_message(db.session, staff, patient, created_at=t0 - timedelta(days=4))
        db.session.commit()
    monkeypatch.setattr(worker, "REMINDER_BATCH", 2)

    def broken(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("a bug")  # tried again at the next scan, logged each time

    monkeypatch.setattr(worker, "_remind", broken)

    # Scanning at every pass would log the same failures every few seconds.
    assert worker.drain(app, "w1", clock=fixed(t0)).more_reminders is False
