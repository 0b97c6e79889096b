"""The notifier worker end to end: real database, real TLS mail sink, no mocked smtplib."""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask
from sqlalchemy import func, select, text

from notifier import outbox, render, worker
from notifier.sink import MailSink
from notifier.smtp import SmtpTransport, make_message_id
from portal import audit
from portal.audit import NO_REQUEST, SYSTEM
from portal.config import settings_of
from portal.extensions import db
from portal.models import (
    Attachment,
    AuditEvent,
    Message,
    Notification,
    PickupLink,
    User,
)
from portal.models.types import new_public_id
from portal.security.tokens import new_token, token_hash
from portal.services import accounts, keys, notices

PATIENT_EMAIL = "p.quenby@patients.example.org"
PATIENT_NAME = "Philippa Quenby"
DOB = date(1984, 3, 7)
SUBJECT = "Histopathology biopsy outcome"
BODY = (
    "Your thyroid biopsy showed papillary carcinoma. An oncology referral is arranged "
    "with Dr Marwick at Ashcombe infirmary."
)
FILENAME = "quenby-histology-report.pdf"
STAFF_EMAIL = "g.marwick@staff.example.org"
BASE_URL = "https://portal.example.org"
MAIL_FROM = "no-reply@portal.example.org"
DOMAIN = "portal.example.org"
LEAKS = [
    PATIENT_NAME,
    "Philippa",
    "Quenby",
    "1984-03-07",
    "07/03/1984",
    "03/07/1984",
    "7 March 1984",
    SUBJECT,
    "Histopathology",
    "biopsy",
    "thyroid",
    "papillary",
    "carcinoma",
    "oncology",
    "Ashcombe",
    FILENAME,
    "quenby-histology-report",
]

Clock = Callable[[], datetime]


class Crash(BaseException):
    """Stands for the process dying (SIGKILL, power loss): nothing catches it."""


@dataclass
class Seeded:
    """Ids of what a test seeded."""

    patient_id: int
    staff_id: int
    message_id: int
    notice_ids: list[int]
    urls: list[str]


def app_for(
    make_app: Callable[..., Flask], port: int, ca_file: str | Path | None, **overrides: Any
) -> Flask:
    """An app whose notifier talks to the sink on ``port`` and trusts ``ca_file``."""
    return make_app(
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=port,
        SMTP_CA_FILE=str(ca_file) if ca_file else None,
        BASE_URL=BASE_URL,
        MAIL_FROM=MAIL_FROM,
        ORG_NAME="Riverside Family Practice",
        ORG_ADDRESS="4 Mill Lane, Riverside",
        SUPPORT_CONTACT="reception",
        **overrides,
    )


def make_people(session: Any) -> tuple[User, User]:
    """A staff sender and a patient recipient with a name and a date of birth."""
    staff = accounts.create_user(
        session,
        role="staff",
        email=STAFF_EMAIL,
        name="Gregory Marwick",
        actor=SYSTEM,
        meta=NO_REQUEST,
    ).user
    patient = accounts.create_user(
        session,
        role="patient",
        email=PATIENT_EMAIL,
        name=PATIENT_NAME,
        dob=DOB,
        actor=SYSTEM,
        meta=NO_REQUEST,
    ).user
    return staff, patient


def make_message(
    session: Any,
    sender: User,
    recipient: User,
    *,
    created_at: datetime | None = None,
    expires_at: datetime | None = None,
    **state: Any,
) -> Message:
    """A message with sealed subject, body and one attachment name (as the send service will)."""
    key_row, key = keys.create(session, "message")
    pid = new_public_id()
    created = created_at or datetime.now(UTC)
    message = Message(
        public_id=pid,
        sender_id=sender.id,
        recipient_id=recipient.id,
        data_key_id=key_row.id,
        created_at=created,
        expires_at=expires_at or created + timedelta(days=7),
        subject_sealed=keys.seal_text(key, "messages", "subject", pid, SUBJECT),
        body_sealed=keys.seal_text(key, "messages", "body", pid, BODY),
        **state,
    )
    session.add(message)
    session.flush()
    apid = new_public_id()
    session.add(
        Attachment(
            public_id=apid,
            message_id=message.id,
            blob_id=secrets.token_hex(16),
            filename_sealed=keys.seal_text(key, "attachments", "filename", apid, FILENAME),
            size=1234,
            sha256="0" * 64,
        )
    )
    session.flush()
    return message


def queue_pickup(session: Any, message: Message, recipient: User) -> tuple[int, str]:
    """A pickup link and its notice, as the send service creates them; returns (id, url)."""
    token = new_token()
    link = PickupLink(
        message_id=message.id,
        recipient_id=recipient.id,
        token_hash=token_hash(token),
        expires_at=message.expires_at,
    )
    session.add(link)
    session.flush()
    url = f"{BASE_URL}/p/{token}"
    row = notices.enqueue(
        session, kind="pickup", recipient=recipient, url=url, message=message, link_id=link.id
    )
    return row.id, url


def seed(app: Flask, notices_count: int = 1) -> Seeded:
    """People, one message and ``notices_count`` pickup notices for it, committed."""
    with app.app_context():
        session = db.session
        staff, patient = make_people(session)
        message = make_message(session, staff, patient)
        queued = [queue_pickup(session, message, patient) for _ in range(notices_count)]
        session.commit()
        return Seeded(
            patient.id, staff.id, message.id, [i for i, _ in queued], [u for _, u in queued]
        )


def row(app: Flask, notice_id: int) -> Notification:
    """The notice as stored now."""
    with app.app_context():
        found = db.session.get(Notification, notice_id)
        assert found is not None
        return found


def fixed(moment: datetime) -> Clock:
    """A clock stopped at ``moment``."""
    return lambda: moment


@pytest.fixture
def t0() -> datetime:
    """The moment the worker runs at: just after the test seeded its rows."""
    return datetime.now(UTC) + timedelta(seconds=30)


def readable(msg: EmailMessage) -> str:
    """Every header (but the envelope's address headers) and every text part of ``msg``."""
    skip = {"to", "delivered-to", "return-path"}
    headers = [f"{k}: {v}" for k, v in msg.items() if k.lower() not in skip]
    parts = [p.get_content() for p in msg.walk() if p.get_content_maintype() == "text"]
    raw = msg.as_string()
    return "\n".join([*headers, *parts, raw.replace(PATIENT_EMAIL, "")])


def test_happy_path_sends_a_phi_free_notice_and_erases_the_link(
    make_app: Callable[..., Flask],
    sink: MailSink,
    delivered: Callable[[MailSink], list[EmailMessage]],
    t0: datetime,
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    seeded = seed(app)

    stats = worker.drain(app, "w1", clock=fixed(t0))

    assert (stats.sent, stats.failed, stats.retrying) == (1, 0, 0)
    [msg] = delivered(sink)
    stored = row(app, seeded.notice_ids[0])
    assert msg["To"] == PATIENT_EMAIL
    assert msg["Message-ID"] == make_message_id(stored.public_id, DOMAIN)
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Subject"] == "You have a secure message from Riverside Family Practice"
    assert msg.get_content_type() == "multipart/alternative"
    plain, html = (msg.get_body((kind,)) for kind in ("plain", "html"))
    assert plain is not None
    assert html is not None
    assert seeded.urls[0] in plain.get_content()
    assert f'href="{seeded.urls[0]}"' in html.get_content()
    text = readable(msg)
    for leak in LEAKS:
        assert re.search(re.escape(leak), text, re.IGNORECASE) is None, "PHI in the notice"
    assert (stored.status, stored.payload_sealed, stored.attempts) == ("sent", None, 1)
    assert stored.smtp_response is not None
    assert stored.smtp_response.startswith("250")
    assert stored.sent_at == t0


def test_sending_is_audited_and_the_chain_verifies(
    make_app: Callable[..., Flask], sink: MailSink, t0: datetime
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    seeded = seed(app)

    worker.drain(app, "w1", clock=fixed(t0))

    with app.app_context():
        notice = db.session.get(Notification, seeded.notice_ids[0])
        assert notice is not None
        event = db.session.scalar(select(AuditEvent).where(AuditEvent.action == "notice.sent"))
        assert event is not None
        assert (event.target_id, event.patient_id, event.message_id) == (
            notice.public_id,
            seeded.patient_id,
            seeded.message_id,
        )
        assert json.loads(event.details)["kind"] == "pickup"
        assert audit.verify(db.session).ok


def test_a_second_pass_sends_nothing_again(
    make_app: Callable[..., Flask], sink: MailSink, t0: datetime
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    seed(app, notices_count=3)

    assert worker.run_once(app, "w1", clock=fixed(t0)) == 3
    assert worker.run_once(app, "w1", clock=fixed(t0 + timedelta(hours=1))) == 0
    assert sink.handler.stored == 3
    assert sink.connection_count == 1  # one connection for the batch


def test_server_down_keeps_the_batch_queued_and_sends_it_once_it_is_back(
    make_app: Callable[..., Flask],
    sink_factory: Callable[..., MailSink],
    free_port: int,
    tmp_path: Path,
    delivered: Callable[[MailSink], list[EmailMessage]],
    other_ca_file: str,
    t0: datetime,
) -> None:
    ca_file = tmp_path / "late" / "cert.pem"  # the sink overwrites it with its own when it starts
    ca_file.parent.mkdir()
    ca_file.write_bytes(Path(other_ca_file).read_bytes())
    app = app_for(make_app, free_port, ca_file)
    seeded = seed(app, notices_count=2)

    stats = worker.drain(app, "w1", clock=fixed(t0))

    assert (stats.sent, stats.retrying, stats.failed, stats.delayed) == (0, 0, 0, 2)
    assert stats.transport_error is not None
    assert stats.transport_error.reason == "connect-failed"
    first = row(app, seeded.notice_ids[0])
    # The relay's fault, not the notice's: no attempt counted, still due, link kept.
    assert (first.status, first.attempts, first.failure_reason) == ("queued", 0, "connect-failed")
    assert (first.claimed_by, first.claimed_at) == (None, None)
    assert first.next_attempt_at <= t0
    assert first.payload_sealed is not None

    late = sink_factory("late", port=free_port)
    stats = worker.drain(app, "w1", clock=fixed(t0 + timedelta(seconds=30)))

    assert (stats.sent, stats.transport_error) == (2, None)
    assert len(delivered(late)) == 2
    assert row(app, seeded.notice_ids[1]).status == "sent"


def test_4xx_is_retried_then_sent(
    make_app: Callable[..., Flask], refusing_sink: Callable[..., MailSink], t0: datetime
) -> None:
    sink = refusing_sink(rcpt_reply="451 4.3.0 try again later")
    app = app_for(make_app, sink.port, sink.cert_file)
    seeded = seed(app)

    assert worker.drain(app, "w1", clock=fixed(t0)).retrying == 1
    stored = row(app, seeded.notice_ids[0])
    assert (stored.status, stored.failure_reason) == ("queued", "smtp-4xx:451")

    sink.handler.rcpt_reply = None  # type: ignore[attr-defined]
    assert worker.drain(app, "w1", clock=fixed(t0 + timedelta(minutes=5))).sent == 1
    assert row(app, seeded.notice_ids[0]).attempts == 2
    assert sink.handler.stored == 1


def test_a_row_whose_transaction_the_relay_breaks_off_does_not_block_the_queue(
    make_app: Callable[..., Flask], refusing_sink: Callable[..., MailSink], t0: datetime
) -> None:
    sink = refusing_sink(data_reply="421 4.4.2 closing, timed out")  # after MAIL and RCPT
    app = app_for(make_app, sink.port, sink.cert_file)
    first, second = seed(app, notices_count=2).notice_ids

    stats = worker.drain(app, "w1", clock=fixed(t0))

    assert stats.transport_error is not None
    assert stats.delayed == 2
    stalled = row(app, first)
    assert (stalled.status, stalled.attempts) == ("queued", 0)
    assert stalled.failure_reason == "stalled:smtp-4xx:421"
    assert stalled.next_attempt_at > t0 + timedelta(seconds=30)  # set back behind the rest
    assert row(app, second).next_attempt_at <= t0  # the rest go back at once

    sink.handler.data_reply = None  # type: ignore[attr-defined]
    assert worker.drain(app, "w1", clock=fixed(t0 + timedelta(seconds=5))).sent == 1
    assert (row(app, second).status, row(app, first).status) == ("sent", "queued")

    sink.handler.data_reply = "421 4.4.2 closing"  # type: ignore[attr-defined]
    worker.drain(app, "w1", clock=fixed(t0 + timedelta(minutes=2)))
    again = row(app, first)  # the fault recurs on it: an attempt is counted
    assert (again.status, again.attempts, again.failure_reason) == ("queued", 1, "smtp-4xx:421")


def test_a_database_error_on_one_row_is_logged_by_type_without_its_parameters(
    make_app: Callable[..., Flask],
    sink: MailSink,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    t0: datetime,
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    seeded = seed(app)
    marker = "leak.marker.zq@patients.example.org"

    def failing_mark_sent(session: Any, *args: Any, **kwargs: Any) -> None:
        # An IntegrityError whose text would quote the statement's parameters.
        session.execute(
            text("INSERT INTO users (id, email) VALUES (:id, :email)"),
            {"id": seeded.patient_id, "email": marker},
        )

    # Recording the slice at once fails; then the row alone, which is retried later.
    monkeypatch.setattr(outbox, "mark_sent_many", failing_mark_sent)
    monkeypatch.setattr(outbox, "mark_sent", failing_mark_sent)
    with caplog.at_level(logging.INFO):
        stats = worker.drain(app, "w1", clock=fixed(t0))

    assert stats.retrying == 1
    assert row(app, seeded.notice_ids[0]).failure_reason == "internal-error"
    [record] = [r for r in caplog.records if "database error" in r.getMessage()]
    assert "IntegrityError" in record.getMessage()
    assert record.exc_info is None  # no traceback: it would print the parameters
    assert all(marker not in r.getMessage() for r in caplog.records)


def test_5xx_fails_at_once(
    make_app: Callable[..., Flask], refusing_sink: Callable[..., MailSink], t0: datetime
) -> None:
    sink = refusing_sink(data_reply="550 5.7.1 rejected")
    app = app_for(make_app, sink.port, sink.cert_file)
    seeded = seed(app)

    stats = worker.drain(app, "w1", clock=fixed(t0))

    assert (stats.failed, stats.retrying) == (1, 0)
    stored = row(app, seeded.notice_ids[0])
    assert (stored.status, stored.failure_reason, stored.attempts) == ("failed", "smtp-5xx:550", 1)
    assert stored.payload_sealed is None


def seed_two_patients(app: Flask) -> tuple[int, int]:
    """A pickup notice for the patient, then one for a second patient; returns their ids."""
    with app.app_context():
        session = db.session
        staff, patient = make_people(session)
        other = accounts.create_user(
            session,
            role="patient",
            email="o.second@patients.example.org",
            name="Olwen Second",
            dob=DOB,
            actor=SYSTEM,
            meta=NO_REQUEST,
        ).user
        first, _ = queue_pickup(session, make_message(session, staff, patient), patient)
        second, _ = queue_pickup(session, make_message(session, staff, other), other)
        session.commit()
        return first, second


@pytest.mark.parametrize(
    ("stage", "reply", "status", "reason"),
    [
        ("data-command", "554 5.7.1 <p.quenby@patients.example.org> no", "failed", "smtp-5xx:554"),
        ("data", "554 5.7.1 rejected", "failed", "smtp-5xx:554"),
        ("rcpt", "550 5.1.1 <p.quenby@patients.example.org> unknown", "failed", "smtp-5xx:550"),
        ("data-command", "451 4.3.0 try later", "queued", "smtp-4xx:451"),
    ],
)
def test_a_refused_notice_does_not_poison_the_next_one_on_the_connection(
    make_app: Callable[..., Flask],
    picky_sink: Callable[..., MailSink],
    t0: datetime,
    stage: str,
    reply: str,
    status: str,
    reason: str,
) -> None:
    sink = picky_sink(PATIENT_EMAIL, stage, reply)
    app = app_for(make_app, sink.port, sink.cert_file)
    refused, innocent = seed_two_patients(app)

    stats = worker.drain(app, "w1", clock=fixed(t0))

    assert (stats.sent, stats.processed) == (1, 2)
    assert (row(app, refused).status, row(app, refused).failure_reason) == (status, reason)
    assert row(app, innocent).status == "sent"
    assert sink.connection_count == 1
    [stored] = _delivered_ids(sink)
    assert stored == make_message_id(row(app, innocent).public_id, DOMAIN)
    if status == "queued":  # a 4xx is retried, and goes out once the relay takes it
        sink.handler.address = "nobody@example.org"  # type: ignore[attr-defined]
        assert worker.drain(app, "w1", clock=fixed(t0 + timedelta(minutes=5))).sent == 1
        assert row(app, refused).status == "sent"


@pytest.mark.parametrize("leak", [SUBJECT, "Quenby", "07/03/1984", "carcinoma", FILENAME])
def test_a_template_that_leaks_phi_is_stopped_by_the_guard(
    make_app: Callable[..., Flask],
    sink: MailSink,
    monkeypatch: pytest.MonkeyPatch,
    t0: datetime,
    leak: str,
) -> None:
    def leaky(**kwargs: Any) -> dict[str, Any]:
        return {**render.pickup_context(**kwargs), "support_contact": f"us ({leak})"}

    monkeypatch.setitem(render.CONTEXTS, "pickup", leaky)
    app = app_for(make_app, sink.port, sink.cert_file)
    seeded = seed(app)

    stats = worker.drain(app, "w1", clock=fixed(t0))

    assert stats.failed == 1
    stored = row(app, seeded.notice_ids[0])
    assert (stored.status, stored.failure_reason) == ("failed", "phi-guard")
    assert sink.handler.stored == 0
    assert sink.connection_count == 0


def test_a_revoked_message_is_not_announced(
    make_app: Callable[..., Flask], sink: MailSink, t0: datetime
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    seeded = seed(app)
    with app.app_context():
        message = db.session.get(Message, seeded.message_id)
        assert message is not None
        message.revoked_at = t0
        db.session.commit()

    worker.drain(app, "w1", clock=fixed(t0))

    stored = row(app, seeded.notice_ids[0])
    assert (stored.status, stored.payload_sealed) == ("cancelled", None)
    assert sink.handler.stored == 0


def test_notices_are_dkim_signed_when_a_key_is_set(
    make_app: Callable[..., Flask], sink: MailSink, tmp_path: Path, t0: datetime
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(pem)
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    app = app_for(make_app, sink.port, sink.cert_file, DKIM_KEY=str(key_file), DKIM_SELECTOR="s1")
    seed(app)

    worker.drain(app, "w1", clock=fixed(t0))

    [stored_key] = sink.handler.mailbox.keys()
    raw = sink.handler.mailbox.get_bytes(stored_key)
    signed = raw[raw.index(b"DKIM-Signature:") :]
    assert dkim.verify(
        signed,
        dnsfunc=lambda name, timeout=5: (
            record if name == b"s1._domainkey.portal.example.org." else None
        ),
    )


def _delivered_ids(sink: MailSink) -> Counter[str]:
    box = sink.handler.mailbox
    ids: Counter[str] = Counter()
    for key in box.iterkeys():
        match = re.search(rb"^Message-ID: (<[^>]+>)", box.get_bytes(key), re.MULTILINE)
        assert match is not None
        ids[match.group(1).decode()] += 1
    return ids


def test_two_workers_send_each_notice_exactly_once(
    make_app: Callable[..., Flask], sink: MailSink, backend: str, t0: datetime
) -> None:
    count = 500 if backend == "postgresql" else 60
    app = app_for(make_app, sink.port, sink.cert_file)
    seeded = seed(app, notices_count=count)
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            worker.drain(app, name, clock=fixed(t0), batch=20)
        except BaseException as err:  # surfaced below: a thread cannot fail the test itself
            errors.append(err)

    threads = [threading.Thread(target=work, args=(f"w{n}",)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    ids = _delivered_ids(sink)
    with app.app_context():
        public_ids = db.session.scalars(select(Notification.public_id)).all()
        statuses = Counter(db.session.scalars(select(Notification.status)))
        workers = set(db.session.scalars(select(Notification.claimed_by)))
    assert statuses == {"sent": count}
    assert ids == Counter({make_message_id(p, DOMAIN): 1 for p in public_ids})
    assert len(seeded.notice_ids) == count
    assert workers <= {"w1", "w2"}
    if backend == "postgresql":
        assert workers == {"w1", "w2"}  # both took part


@contextmanager
def _no_send_lock(url: Any) -> Iterator[bool]:
    yield True


def _reclaim_during(
    monkeypatch: pytest.MonkeyPatch,
    target: Any,
    name: str,
    app: Flask,
    t0: datetime,
    *,
    without_send_lock: bool = False,
) -> list[worker.RunStats]:
    """Make ``target.name`` slow: on its first call worker B, after the lease, drains first
    (``without_send_lock``: B ignores SQLite's send lock, to try the database's fence)."""
    real = getattr(target, name)
    stats: list[worker.RunStats] = []

    def slow(*args: Any, **kwargs: Any) -> Any:
        if not stats:  # worker A's call; B's own calls below pass straight through
            stats.append(worker.RunStats())  # first, so B's calls are not slowed again
            late = t0 + outbox.LEASE + timedelta(seconds=1)
            with pytest.MonkeyPatch.context() as patch:
                if without_send_lock:
                    patch.setattr(worker, "send_lock", _no_send_lock)
                stats[0] = worker.drain(app, "B", clock=fixed(late))
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, slow)
    return stats


def _one_record(app: Flask, notice_id: int) -> tuple[str, str | None, int, int]:
    """(status, claimed_by, attempts, notice.sent audit events) of the notice."""
    with app.app_context():
        found = db.session.get(Notification, notice_id)
        assert found is not None
        events = db.session.scalar(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "notice.sent")
        )
        return found.status, found.claimed_by, found.attempts, events or 0


def test_a_worker_whose_lease_was_taken_does_not_send_or_record(
    make_app: Callable[..., Flask], sink: MailSink, monkeypatch: pytest.MonkeyPatch, t0: datetime
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    [notice_id] = seed(app).notice_ids
    # A slow to render; on SQLite B must bypass the send lock to take the row at all.
    b_stats = _reclaim_during(monkeypatch, worker, "_prepare", app, t0, without_send_lock=True)

    a_stats = worker.drain(app, "A", clock=fixed(t0))

    assert (b_stats[0].sent, a_stats.sent, a_stats.skipped) == (1, 0, 1)
    assert _one_record(app, notice_id) == ("sent", "B", 1, 1)
    public_id = row(app, notice_id).public_id
    assert _delivered_ids(sink) == Counter({make_message_id(public_id, DOMAIN): 1})


def test_a_slow_send_is_not_repeated_by_the_worker_that_reclaims_it(
    make_app: Callable[..., Flask],
    sink: MailSink,
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
    t0: datetime,
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    [notice_id] = seed(app).notice_ids
    b_stats = _reclaim_during(monkeypatch, SmtpTransport, "send", app, t0)  # A's send is slow

    a_stats = worker.drain(app, "A", clock=fixed(t0))

    # PostgreSQL: A holds the row lock while sending, B's claim skips it. SQLite: A holds
    # the send lock for its pass, B stands by and claims nothing.
    assert (a_stats.sent, b_stats[0].processed) == (1, 0)
    assert b_stats[0].standby == (backend == "sqlite")
    assert _one_record(app, notice_id) == ("sent", "A", 1, 1)
    public_id = row(app, notice_id).public_id
    assert _delivered_ids(sink) == Counter({make_message_id(public_id, DOMAIN): 1})


def test_an_interrupt_mid_batch_loses_nothing_and_sends_nothing_twice(
    make_app: Callable[..., Flask], sink: MailSink, monkeypatch: pytest.MonkeyPatch, t0: datetime
) -> None:
    """An interrupt the process survives long enough to run its handlers (Ctrl-C on
    ``notifier run --once``, which has no stop flag): what the slice sent is recorded, so
    nothing is sent twice (review of the batch change: it had been left unrecorded)."""
    app = app_for(make_app, sink.port, sink.cert_file)
    seed(app, notices_count=10)
    real_send = SmtpTransport.send
    calls = 0

    def interrupted_on_fourth(self: SmtpTransport, msg: EmailMessage) -> str:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise KeyboardInterrupt
        return real_send(self, msg)

    monkeypatch.setattr(SmtpTransport, "send", interrupted_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        worker.drain(app, "w1", clock=fixed(t0))
    monkeypatch.setattr(SmtpTransport, "send", real_send)

    with app.app_context():
        statuses = Counter(db.session.scalars(select(Notification.status)))
    assert statuses == {"sent": 3, "sending": 7}
    assert worker.run_once(app, "w2", clock=fixed(t0 + outbox.LEASE - timedelta(seconds=1))) == 0
    assert worker.drain(app, "w2", clock=fixed(t0 + outbox.LEASE + timedelta(seconds=1))).sent == 7

    ids = _delivered_ids(sink)
    assert len(ids) == 10
    assert set(ids.values()) == {1}


@pytest.fixture
def reminder_world(
    make_app: Callable[..., Flask], sink: MailSink, t0: datetime
) -> Iterator[tuple[Flask, dict[str, int]]]:
    """Messages in every state a reminder cares about, named."""
    app = app_for(make_app, sink.port, sink.cert_file)
    old = t0 - timedelta(days=4)
    with app.app_context():
        session = db.session
        staff, patient = make_people(session)
        made = {
            "due": make_message(session, staff, patient, created_at=old),
            "opened": make_message(session, staff, patient, created_at=old, first_opened_at=t0),
            "revoked": make_message(session, staff, patient, created_at=old, revoked_at=t0),
            "expired": make_message(
                session, staff, patient, created_at=old, expires_at=t0 - timedelta(hours=1)
            ),
            "recent": make_message(session, staff, patient, created_at=t0 - timedelta(hours=2)),
            "to_staff": make_message(session, patient, staff, created_at=old),
        }
        session.commit()
        yield app, {name: m.id for name, m in made.items()}


def test_one_reminder_only_for_an_unopened_live_message(
    reminder_world: tuple[Flask, dict[str, int]],
    sink: MailSink,
    t0: datetime,
    delivered: Callable[[MailSink], list[EmailMessage]],
) -> None:
    app, ids = reminder_world
    with app.app_context():
        settings = settings_of(app)
        assert worker.enqueue_reminders(db.session, t0, settings) == 1
        assert worker.enqueue_reminders(db.session, t0 + timedelta(hours=1), settings) == 0
        [notice] = db.session.scalars(select(Notification)).all()
        url = notices.open_payload(db.session, notice)
        link = db.session.get(PickupLink, notice.link_id)
        message = db.session.get(Message, ids["due"])
        assert message is not None
        assert link is not None
        assert url is not None
        links = db.session.scalar(select(func.count()).select_from(PickupLink))
    assert (notice.kind, notice.message_id) == ("reminder", ids["due"])
    assert url.startswith(f"{BASE_URL}/p/")
    assert link.token_hash == token_hash(url.rsplit("/", 1)[1])
    assert (link.message_id, link.expires_at) == (ids["due"], message.expires_at)
    assert message.reminded_at == t0
    assert links == 1

    worker.drain(app, "w1", clock=fixed(t0))

    [msg] = delivered(sink)
    assert msg["Subject"].startswith("Reminder:")
    assert url in msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]


def test_log_lines_name_rows_by_id_only(
    make_app: Callable[..., Flask],
    sink: MailSink,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    t0: datetime,
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    seeded = seed(app, notices_count=2)
    capsys.readouterr()

    worker.drain(app, "w1", clock=fixed(t0))
    with app.app_context():  # and a failure path: the PHI guard
        staff = db.session.get(User, seeded.staff_id)
        patient = db.session.get(User, seeded.patient_id)
        assert staff is not None
        assert patient is not None
        message = make_message(db.session, staff, patient)
        queue_pickup(db.session, message, patient)
        db.session.commit()
    monkeypatch.setitem(
        render.CONTEXTS,
        "pickup",
        lambda **kw: {**render.pickup_context(**kw), "org_name": PATIENT_NAME},
    )
    worker.drain(app, "w1", clock=fixed(t0), stop=None)

    lines = [
        json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")
    ]
    ours = [entry for entry in lines if entry["logger"].startswith(("notifier", "portal"))]
    assert any("sent" in entry["message"] for entry in ours)
    assert any("PHI guard" in entry["message"] for entry in ours)
    dumped = json.dumps(ours)
    for secret in (PATIENT_EMAIL, STAFF_EMAIL, MAIL_FROM, "://", "/p/", *seeded.urls, *LEAKS):
        assert secret not in dumped
    assert re.search(r"[\w.+-]+@[\w-]+\.[\w.]+", dumped.replace(f"@{DOMAIN}>", "")) is None


def test_cli_run_once_reports_counts(
    make_app: Callable[..., Flask], sink: MailSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from notifier.cli import main

    app = app_for(make_app, sink.port, sink.cert_file)
    seed(app, notices_count=2)
    for name, value in {
        "DATABASE_URL": app.config["DATABASE_URL"],
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(sink.port),
        "SMTP_CA_FILE": str(sink.cert_file),
        "MAIL_FROM": MAIL_FROM,
        "BASE_URL": BASE_URL,
    }.items():
        monkeypatch.setenv(f"PORTAL_{name}", value)

    result = CliRunner().invoke(main, ["run", "--once"])

    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("sent 2, failed 0, retrying 0")
    assert sink.handler.stored == 2


def test_cli_reports_a_bad_setting_in_one_line(
    monkeypatch: pytest.MonkeyPatch, instance: Path
) -> None:
    from click.testing import CliRunner

    from notifier.cli import main

    monkeypatch.setenv("PORTAL_SMTP_TLS", "none")
    result = CliRunner().invoke(main, ["run", "--once"])

    assert result.exit_code == 2
    assert result.output.strip() == (
        "portal: configuration error: PORTAL_SMTP_TLS: expected starttls or implicit"
    )


def test_cli_offers_the_sink() -> None:
    from click.testing import CliRunner

    from notifier.cli import main

    result = CliRunner().invoke(main, ["sink", "--help"])

    assert result.exit_code == 0
    assert "--maildir" in result.output


def test_a_reply_notice_tells_staff_without_naming_the_patient(
    make_app: Callable[..., Flask],
    sink: MailSink,
    t0: datetime,
    delivered: Callable[[MailSink], list[EmailMessage]],
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    with app.app_context():
        staff, patient = make_people(db.session)
        reply = make_message(db.session, patient, staff)
        notices.enqueue(db.session, kind="reply", recipient=staff, url=None, message=reply)
        db.session.commit()

    assert worker.drain(app, "w1", clock=fixed(t0)).sent == 1

    [msg] = delivered(sink)
    assert msg["To"] == STAFF_EMAIL
    assert f"{BASE_URL}/" in msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    text = readable(msg)
    for leak in LEAKS:
        assert re.search(re.escape(leak), text, re.IGNORECASE) is None, "PHI in the notice"


@pytest.mark.parametrize("kind", ["mfa_changed", "password_changed", "account_locked"])
def test_a_credential_change_notice_is_sent_without_phi(
    make_app: Callable[..., Flask],
    sink: MailSink,
    t0: datetime,
    kind: str,
    delivered: Callable[[MailSink], list[EmailMessage]],
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    with app.app_context():
        _, patient = make_people(db.session)
        notices.enqueue(db.session, kind=kind, recipient=patient, url=None)
        db.session.commit()

    assert worker.drain(app, "w1", clock=fixed(t0)).sent == 1

    [msg] = delivered(sink)
    assert msg["To"] == PATIENT_EMAIL
    assert f"{BASE_URL}/" in msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    text = readable(msg)
    for leak in LEAKS:
        assert re.search(re.escape(leak), text, re.IGNORECASE) is None, "PHI in the notice"


def test_run_forever_sends_and_stops_when_asked(
    make_app: Callable[..., Flask], sink: MailSink
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    stop = threading.Event()
    runner = threading.Thread(
        target=worker.run_forever, args=(app, "w1"), kwargs={"poll_seconds": 0.05, "stop": stop}
    )
    runner.start()
    try:
        seed(app, notices_count=2)
        deadline = datetime.now(UTC) + timedelta(seconds=20)
        while sink.handler.stored < 2 and datetime.now(UTC) < deadline:
            stop.wait(0.05)
    finally:
        stop.set()
        runner.join(timeout=20)

    assert not runner.is_alive()
    assert sink.handler.stored == 2
