"""Bounces end to end: a real STARTTLS relay (the sink) that bounces, the worker reading its
delivery status notifications from the bounce Maildir, staff seeing the outcome."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from sqlalchemy import select
from sqlalchemy.engine import make_url

from notifier import bounces, dsn, outbox, worker
from notifier.cli import main as notifier_main
from notifier.sink import MailSink
from notifier.smtp import make_message_id
from portal import audit
from portal.config import settings_of
from portal.database import utcnow
from portal.extensions import db
from portal.models import AuditEvent, Message, Notification, PickupLink, User
from portal.security.tokens import token_hash
from portal.services import account_links, messaging, notices
from tests.browser_client import Browser, enrolled_user
from tests.factories import PATIENT_DOB, PATIENT_NAME, PHI_STRINGS, SUBJECT, make_patient
from tests.support import bounces as mail
from tests.support.faults import TcpProxy
from tests.support.pickup import PASSWORD, STAFF_EMAIL, SentMessage, send

PATIENT_EMAIL = "zq.bounces@patients.example.org"
BASE_URL = "https://portal.example.org"
DOMAIN = "portal.example.org"
LINK = re.compile(re.escape(BASE_URL) + r"/p/[A-Za-z0-9_-]+")

Clock = Callable[[], datetime]


def app_for(make_app: Callable[..., Flask], sink: MailSink, **overrides: Any) -> Flask:
    """An app whose notifier sends through ``sink`` and reads bounces from its bounce Maildir."""
    settings: dict[str, Any] = {
        "SMTP_HOST": sink.host,
        "SMTP_PORT": sink.port,
        "SMTP_CA_FILE": str(sink.cert_file),
        "BASE_URL": BASE_URL,
        "MAIL_FROM": f"no-reply@{DOMAIN}",
        "BOUNCE_MAILDIR": str(sink.handler.bounce_path),
    }
    return make_app(**{**settings, **overrides})


def fixed(moment: datetime) -> Clock:
    """A clock stopped at ``moment``."""
    return lambda: moment


@pytest.fixture
def t0() -> datetime:
    """When the worker first runs: just after the test sent its message."""
    return datetime.now(UTC) + timedelta(seconds=30)


def people(app: Flask, *patients: str) -> None:
    """The staff sender (sam@example.org, enrolled) and a patient for each address."""
    enrolled_user(app)
    with app.app_context():
        for address in patients:
            make_patient(db.session, email=address)
        db.session.commit()


def notice_of(app: Flask, sent: SentMessage) -> Notification:
    """The newest notice of the message ``sent``."""
    with app.app_context():
        found = db.session.scalars(
            select(Notification)
            .join(Message, Message.id == Notification.message_id)
            .where(Message.public_id == sent.public_id)
            .order_by(Notification.id.desc())
        ).first()
        assert found is not None
        return found


def events(app: Flask, action: str) -> list[AuditEvent]:
    with app.app_context():
        return list(
            db.session.scalars(
                select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)
            )
        )


def link_revoked(app: Flask, url_or_token: str) -> bool:
    """Whether the pickup link behind ``url_or_token`` is revoked."""
    token = url_or_token.rsplit("/", 1)[-1]
    with app.app_context():
        link = db.session.scalar(
            select(PickupLink).where(PickupLink.token_hash == token_hash(token))
        )
        assert link is not None
        return link.revoked_at is not None


def process(app: Flask, now: datetime) -> bounces.BounceStats:
    """One ``notifier bounces`` pass, as the command runs it."""
    with app.app_context():
        return bounces.process(db.session, settings_of(app), now)


def sent_notice(app: Flask, sink: MailSink, t0: datetime, to: str = PATIENT_EMAIL) -> SentMessage:
    """Send a message to ``to`` through the worker and the sink; its notice is now ``sent``."""
    sent = send(app, to=to, files=[])
    assert worker.drain(app, "w1", clock=fixed(t0)).sent == 1
    assert notice_of(app, sent).status == "sent"
    return sent


# -- hard bounces -----------------------------------------------------------------------------


def test_a_hard_bounce_shows_bounced_to_staff_and_is_audited(
    make_app: Callable[..., Flask], bounce_sink: MailSink, t0: datetime
) -> None:
    address = "bounce-hard+zq@patients.example.org"  # the sink's reserved local part
    app = app_for(make_app, bounce_sink)
    _, secret, _ = enrolled_user(app)  # the staff sender
    with app.app_context():
        patient = make_patient(db.session, email=address)
        db.session.commit()
        patient_id = patient.id
    sent = send(app, to=address, files=[])

    assert worker.drain(app, "w1", clock=fixed(t0)).sent == 1
    assert (bounce_sink.handler.stored, bounce_sink.handler.bounced) == (0, 1)
    assert notice_of(app, sent).status == "sent"  # the relay said 250; the DSN comes after
    worker.drain(app, "w1", clock=fixed(t0 + timedelta(minutes=1)))  # the next pass reads it

    notice = notice_of(app, sent)
    assert (notice.status, notice.failure_reason, notice.payload_sealed) == (
        "bounced",
        "bounce:5.1.1",
        None,
    )
    browser = Browser(app)
    assert browser.sign_in(STAFF_EMAIL, PASSWORD, secret).status_code == 302
    page = browser.get(f"/staff/messages/{sent.public_id}")
    text = page.get_data(as_text=True)
    assert page.status_code == 200
    assert "Email notice bounced: check the patient&#39;s address" in text
    assert "Email bounced: check the patient&#39;s address</span>" in text  # the badge
    assert "bounce:5.1.1" in text
    assert "delivered to the mail server" not in text
    [event] = events(app, "notice.bounced")
    assert (event.target_id, event.patient_id, event.outcome) == (
        notice.public_id,
        patient_id,
        "failure",
    )
    assert json.loads(event.details) == {
        "kind": "pickup",
        "attempts": 1,
        "status": "5.1.1",
        "result": "bounced",
    }
    assert link_revoked(app, sent.token)  # its copy lies in the bounce mailbox
    with app.app_context():
        assert audit.verify(db.session).ok
    root = bounce_sink.handler.bounce_path
    assert root is not None
    box = mail.state(root)
    assert (box.new, len(box.flagged(":2,S")), len(box.cur)) == ([], 1, 1)


# -- soft bounces ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bounce", "headers_only"), [(dsn.SOFT, False), (dsn.SOFT, True)], ids=["full", "headers"]
)
def test_a_soft_bounce_is_sent_again_with_a_fresh_link(
    make_app: Callable[..., Flask],
    bounce_sink: MailSink,
    delivered: Callable[[MailSink], list[EmailMessage]],
    t0: datetime,
    bounce: dsn.Bounce,
    headers_only: bool,
) -> None:
    app = app_for(make_app, bounce_sink)
    people(app, PATIENT_EMAIL)
    bounce_sink.handler.bounce_rules[PATIENT_EMAIL] = bounce
    bounce_sink.handler.return_headers_only = headers_only
    sent = sent_notice(app, bounce_sink, t0)
    del bounce_sink.handler.bounce_rules[PATIENT_EMAIL]  # the mailbox has room again

    read_at = t0 + timedelta(seconds=10)
    assert worker.drain(app, "w1", clock=fixed(read_at)).sent == 0  # queued, not due yet
    queued = notice_of(app, sent)
    assert (queued.status, queued.failure_reason, queued.attempts, queued.claimed_by) == (
        "queued",
        f"bounce:{bounce.status}",
        1,
        None,
    )
    assert queued.next_attempt_at == read_at + outbox.BACKOFF_BASE
    assert queued.payload_sealed is not None
    assert link_revoked(app, sent.token)

    assert worker.drain(app, "w1", clock=fixed(read_at + timedelta(minutes=2))).sent == 1
    [again] = delivered(bounce_sink)
    assert again["Message-ID"] == make_message_id(queued.public_id, DOMAIN)  # the same notice
    body = again.get_body(("plain",))
    assert body is not None
    [url] = LINK.findall(body.get_content())
    assert url != BASE_URL + sent.path
    assert not link_revoked(app, url)
    resent = notice_of(app, sent)
    assert (resent.status, resent.attempts, resent.payload_sealed) == ("sent", 2, None)
    [event] = events(app, "notice.bounced")
    assert json.loads(event.details)["result"] == "retrying"
    reissued = events(app, "link.reissue")
    assert [json.loads(e.details) for e in reissued] == [{"reason": "bounce"}]
    assert len(events(app, "notice.sent")) == 2


def test_a_delay_report_is_recorded_but_neither_resends_nor_revokes(
    make_app: Callable[..., Flask],
    bounce_sink: MailSink,
    delivered: Callable[[MailSink], list[EmailMessage]],
    t0: datetime,
) -> None:
    app = app_for(make_app, bounce_sink)
    people(app, PATIENT_EMAIL)
    bounce_sink.handler.bounce_rules[PATIENT_EMAIL] = dsn.DELAYED
    sent = sent_notice(app, bounce_sink, t0)
    del bounce_sink.handler.bounce_rules[PATIENT_EMAIL]

    stats = worker.drain(app, "w1", clock=fixed(t0 + timedelta(minutes=5)))

    assert stats.sent == 0
    kept = notice_of(app, sent)  # the relay is still trying: still sent, its link valid
    assert (kept.status, kept.failure_reason, kept.attempts) == ("sent", "delayed:4.4.1", 1)
    assert not link_revoked(app, sent.token)
    [event] = events(app, "notice.bounced")  # audited
    assert json.loads(event.details)["result"] == "delayed"
    assert events(app, "link.reissue") == []
    assert delivered(bounce_sink) == []  # nothing sent again
    assert worker.drain(app, "w1", clock=fixed(t0 + timedelta(hours=1))).sent == 0


@pytest.mark.parametrize("mismatch", ["other-domain", "other-recipient"])
def test_a_report_for_another_domain_or_recipient_is_kept_aside(
    make_app: Callable[..., Flask], bounce_sink: MailSink, t0: datetime, mismatch: str
) -> None:
    app = app_for(make_app, bounce_sink)
    people(app, PATIENT_EMAIL)
    sent = sent_notice(app, bounce_sink, t0)
    public_id = notice_of(app, sent).public_id
    root = bounce_sink.handler.bounce_path
    assert root is not None
    if mismatch == "other-domain":  # our notice id, in a Message-ID of another domain
        raw = mail.report(make_message_id(public_id, "elsewhere.example"), to=PATIENT_EMAIL)
    else:  # a forged or misrouted report about somebody else
        raw = mail.report(make_message_id(public_id, DOMAIN), to="someone.else@example.net")
    key = mail.deliver(root, raw)

    stats = process(app, t0 + timedelta(seconds=5))

    assert (stats.kept_aside, stats.total) == (1, 1)
    assert mail.state(root).flagged(":2,F") == [f"{key}:2,F"]
    assert notice_of(app, sent).status == "sent"
    assert not link_revoked(app, sent.token)
    assert events(app, "notice.bounced") == []


def test_soft_bounces_give_up_when_the_retry_window_is_spent(
    make_app: Callable[..., Flask], bounce_sink: MailSink, t0: datetime
) -> None:
    app = app_for(make_app, bounce_sink)
    people(app, PATIENT_EMAIL)
    bounce_sink.handler.bounce_rules[PATIENT_EMAIL] = dsn.SOFT
    sent = send(app, to=PATIENT_EMAIL, files=[])
    last = next(n for n in range(1, 100) if outbox.total_backoff(n) > outbox.RETRY_WINDOW)

    now = t0
    for _ in range(3 * last):  # a pass sends what is due, the next reads its bounce
        worker.drain(app, "w1", clock=fixed(now))
        row = notice_of(app, sent)
        if row.status == "failed":
            break
        now = max(now + timedelta(seconds=1), row.next_attempt_at)

    assert (row.status, row.failure_reason, row.attempts) == ("failed", "bounce:4.2.2", last)
    assert bounce_sink.handler.bounced == last
    results = [json.loads(e.details)["result"] for e in events(app, "notice.bounced")]
    assert results == ["retrying"] * (last - 1) + ["failed"]
    with app.app_context():
        links = db.session.scalars(select(PickupLink.revoked_at)).all()
    assert len(links) == last
    assert all(links)  # every link it carried is revoked


def test_a_soft_bounce_for_a_revoked_message_fails_without_a_new_link(
    make_app: Callable[..., Flask], bounce_sink: MailSink, t0: datetime
) -> None:
    app = app_for(make_app, bounce_sink)
    people(app, PATIENT_EMAIL)
    bounce_sink.handler.bounce_rules[PATIENT_EMAIL] = dsn.Bounce(
        "failed", "4.4.1", "421 4.4.1 gave up"
    )
    sent = sent_notice(app, bounce_sink, t0)
    with app.app_context():
        message = db.session.scalar(select(Message).where(Message.public_id == sent.public_id))
        assert message is not None
        messaging.revoke(db.session, message, actor=audit.SYSTEM, meta=audit.NO_REQUEST)
        db.session.commit()

    assert process(app, t0 + timedelta(seconds=5)).failed == 1

    row = notice_of(app, sent)
    assert (row.status, row.failure_reason, row.payload_sealed) == ("failed", "bounce:4.4.1", None)
    with app.app_context():
        assert db.session.query(PickupLink).count() == 1  # no fresh link for a revoked message
    assert events(app, "link.reissue") == []


def test_a_soft_bounce_sends_a_security_notice_again_but_never_reissues_an_invite(
    make_app: Callable[..., Flask],
    bounce_sink: MailSink,
    delivered: Callable[[MailSink], list[EmailMessage]],
    t0: datetime,
) -> None:
    app = app_for(make_app, bounce_sink)
    people(app, PATIENT_EMAIL)
    with app.app_context():
        user = db.session.scalar(select(User).where(User.email == PATIENT_EMAIL))
        assert user is not None
        security = notices.enqueue(db.session, kind="password_changed", recipient=user, url=None)
        account_links.send_link(db.session, user, "invite")
        invite = db.session.scalar(select(Notification).where(Notification.kind == "invite"))
        assert invite is not None
        ids = {"security": security.public_id, "invite": invite.public_id}
        db.session.commit()
    assert worker.drain(app, "w1", clock=fixed(t0)).sent == 2
    root = bounce_sink.handler.bounce_path
    assert root is not None
    for public_id in ids.values():
        mail.deliver(
            root, mail.report(make_message_id(public_id, DOMAIN), dsn.SOFT, to=PATIENT_EMAIL)
        )

    stats = process(app, t0 + timedelta(seconds=1))

    assert (stats.retrying, stats.failed) == (1, 1)
    with app.app_context():
        rows = {
            kind: db.session.scalar(select(Notification).where(Notification.public_id == pid))
            for kind, pid in ids.items()
        }
    assert {kind: (r.status, r.failure_reason) for kind, r in rows.items() if r} == {
        "security": ("queued", "bounce:4.2.2"),
        "invite": ("failed", "bounce:4.2.2"),
    }
    assert worker.drain(app, "w1", clock=fixed(t0 + timedelta(minutes=2))).sent == 1
    assert len(delivered(bounce_sink)) == 3  # the two, then the security notice again


# -- what is not ours, or not a DSN ---------------------------------------------------------


def test_mail_that_is_no_report_on_a_notice_of_ours_is_kept_aside(
    make_app: Callable[..., Flask],
    bounce_sink: MailSink,
    t0: datetime,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = app_for(make_app, bounce_sink)
    people(app, PATIENT_EMAIL)
    sent = sent_notice(app, bounce_sink, t0)
    notice = make_message_id(notice_of(app, sent).public_id, DOMAIN)
    root = bounce_sink.handler.bounce_path
    assert root is not None
    keys = [mail.deliver(root, make(notice)) for make in mail.SET_ASIDE.values()]

    with caplog.at_level(logging.INFO, logger="notifier.bounces"):
        stats = process(app, t0 + timedelta(seconds=5))

    assert (stats.kept_aside, stats.total) == (len(keys), len(keys))
    assert notice_of(app, sent).status == "sent"
    assert events(app, "notice.bounced") == []
    assert mail.state(root).flagged(":2,F") == sorted(f"{key}:2,F" for key in keys)
    for key in keys:  # each named once, by its key
        assert [r.name for r in caplog.records if key in r.getMessage()] == ["notifier.bounces"]
    assert process(app, t0 + timedelta(seconds=6)).total == 0  # read once, never again


def test_a_pass_whose_time_budget_is_spent_leaves_the_rest_for_the_next_pass(
    make_app: Callable[..., Flask], bounce_sink: MailSink, t0: datetime
) -> None:
    app = app_for(make_app, bounce_sink)
    root = bounce_sink.handler.bounce_path
    assert root is not None
    for n in range(3):
        mail.deliver(root, mail.SET_ASIDE["empty"](f"<x{n}@example.org>"))

    with app.app_context():  # a spent budget: one DSN is read, the others wait in new/
        first = bounces.process(db.session, settings_of(app), t0, budget=0.0)
        assert (first.total, len(mail.state(root).new)) == (1, 2)
        rest = bounces.process(db.session, settings_of(app), t0, budget=60.0)
    assert (rest.total, mail.state(root).new) == (2, [])


def test_a_success_report_or_a_second_report_changes_nothing(
    make_app: Callable[..., Flask], bounce_sink: MailSink, t0: datetime
) -> None:
    app = app_for(make_app, bounce_sink)
    people(app, PATIENT_EMAIL)
    sent = sent_notice(app, bounce_sink, t0)
    message_id = make_message_id(notice_of(app, sent).public_id, DOMAIN)
    root = bounce_sink.handler.bounce_path
    assert root is not None
    delivered_report = dsn.Bounce("delivered", "2.0.0", "250 2.0.0 OK")
    mail.deliver(root, mail.report(message_id, delivered_report, to=PATIENT_EMAIL))
    assert (process(app, t0).ignored, notice_of(app, sent).status) == (1, "sent")

    mail.deliver(root, mail.report(message_id, to=PATIENT_EMAIL))
    mail.deliver(
        root, mail.report(message_id, dsn.SOFT, to=PATIENT_EMAIL)
    )  # a late report for the same send
    stats = process(app, t0 + timedelta(seconds=1))

    assert (stats.bounced, stats.ignored, stats.retrying) == (1, 1, 0)
    assert notice_of(app, sent).status == "bounced"
    assert len(events(app, "notice.bounced")) == 1
    assert len(mail.state(root).flagged(":2,S")) == 3


# -- several workers, crashes, misconfiguration ---------------------------------------------


def test_two_workers_record_each_report_once(
    make_app: Callable[..., Flask], bounce_sink: MailSink, backend: str, t0: datetime
) -> None:
    count = 12 if backend == "postgresql" else 6  # messages per patient
    hard, soft = "hard.patient@patients.example.org", "soft.patient@patients.example.org"
    overrides = {"BOUNCE_MAILDIR": str(bounce_sink.handler.bounce_path)}
    app = app_for(make_app, bounce_sink, **overrides)
    people(app, hard, soft)
    bounce_sink.handler.bounce_rules.update({hard: dsn.HARD, soft: dsn.SOFT})
    for address in [hard, soft] * count:
        send(app, to=address, files=[])
    assert worker.drain(app, "w1", clock=fixed(t0)).sent == 2 * count
    root = bounce_sink.handler.bounce_path
    assert root is not None
    for name in mail.state(root).new:  # each relay reports twice
        mail.deliver(root, (root / "new" / name).read_bytes())
    second = app_for(make_app, bounce_sink, **overrides)  # another process's engine
    start = threading.Barrier(2)
    results: list[bounces.BounceStats] = []
    errors: list[BaseException] = []

    def work(each: Flask) -> None:
        try:
            with each.app_context():
                start.wait(timeout=30)
                results.append(bounces.process(db.session, settings_of(each), t0))
        except BaseException as err:  # surfaced below: a thread cannot fail the test itself
            errors.append(err)

    threads = [threading.Thread(target=work, args=(each,)) for each in (app, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    totals = Counter[str]()
    for stats in results:
        totals.update({name: getattr(stats, name) for name in ("bounced", "retrying", "ignored")})
        assert stats.kept_aside == stats.failed == 0
    assert totals == Counter(bounced=count, retrying=count, ignored=2 * count)
    targets = Counter(e.target_id for e in events(app, "notice.bounced"))
    assert len(targets) == 2 * count
    assert set(targets.values()) == {1}
    assert len(events(app, "link.reissue")) == count
    box = mail.state(root)
    assert (box.new, len(box.flagged(":2,S")), len(box.cur)) == ([], 4 * count, 4 * count)
    with app.app_context():
        assert audit.verify(db.session).ok


def test_a_claim_left_by_a_stopped_worker_is_taken_back_after_the_lease(
    make_app: Callable[..., Flask], bounce_sink: MailSink, t0: datetime
) -> None:
    app = app_for(make_app, bounce_sink)
    people(app, PATIENT_EMAIL)
    sent = sent_notice(app, bounce_sink, t0)
    root = bounce_sink.handler.bounce_path
    assert root is not None
    key = mail.deliver(
        root, mail.report(make_message_id(notice_of(app, sent).public_id, DOMAIN), to=PATIENT_EMAIL)
    )
    (root / "new" / key).rename(root / "cur" / f"{key}:2,")  # claimed, then the worker died
    now = utcnow()

    assert process(app, now).total == 0  # still within the lease: someone may be on it
    assert notice_of(app, sent).status == "sent"
    stats = process(app, now + bounces.CLAIM_LEASE + timedelta(seconds=1))

    assert stats.bounced == 1
    assert mail.state(root).cur == [f"{key}:2,S"]


@pytest.mark.postgres_only
def test_a_database_outage_puts_the_report_back_for_the_next_pass(
    make_app: Callable[..., Flask],
    bounce_sink: MailSink,
    t0: datetime,
    caplog: pytest.LogCaptureFixture,
) -> None:
    direct = make_url(app_for(make_app, bounce_sink).config["DATABASE_URL"])
    proxy = TcpProxy((direct.host or "127.0.0.1", direct.port or 5432))
    proxied = direct.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    app = app_for(make_app, bounce_sink, DATABASE_URL=proxied)
    people(app, PATIENT_EMAIL)
    sent = sent_notice(app, bounce_sink, t0)
    root = bounce_sink.handler.bounce_path
    assert root is not None
    key = mail.deliver(
        root, mail.report(make_message_id(notice_of(app, sent).public_id, DOMAIN), to=PATIENT_EMAIL)
    )

    proxy.cut()
    app.extensions["engine"].dispose()
    with app.app_context(), caplog.at_level(logging.ERROR, logger="notifier.bounces"):
        assert bounces.collect(db.session, settings_of(app), t0) is None
    proxy.restore()

    assert mail.state(root) == mail.MaildirState([key], [])  # back in new/, unflagged
    [error] = [r.getMessage() for r in caplog.records if r.name == "notifier.bounces"]
    assert error.startswith("bounce pass stopped by a database error (")
    assert process(app, t0 + timedelta(seconds=1)).bounced == 1
    assert mail.state(root).cur == [f"{key}:2,S"]


def test_an_unusable_bounce_maildir_never_stops_sending(
    make_app: Callable[..., Flask],
    bounce_sink: MailSink,
    tmp_path: Path,
    t0: datetime,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = app_for(make_app, bounce_sink, BOUNCE_MAILDIR=str(tmp_path / "missing"))
    people(app, PATIENT_EMAIL)
    send(app, to=PATIENT_EMAIL, files=[])
    send(app, to=PATIENT_EMAIL, files=[])

    with caplog.at_level(logging.ERROR, logger="notifier.bounces"):
        assert worker.drain(app, "w1", clock=fixed(t0)).sent == 2
        worker.drain(app, "w1", clock=fixed(t0 + timedelta(seconds=1)))

    errors = [r.getMessage() for r in caplog.records if r.name == "notifier.bounces"]
    assert len(errors) == 1  # once, not every pass
    assert "PORTAL_BOUNCE_MAILDIR" in errors[0]


def test_the_bounces_command_reads_the_maildir_once(
    make_app: Callable[..., Flask], bounce_sink: MailSink, t0: datetime
) -> None:
    app = app_for(make_app, bounce_sink)
    people(app, PATIENT_EMAIL)
    sent = sent_notice(app, bounce_sink, t0)
    root = bounce_sink.handler.bounce_path
    assert root is not None
    mail.deliver(
        root, mail.report(make_message_id(notice_of(app, sent).public_id, DOMAIN), to=PATIENT_EMAIL)
    )
    mail.deliver(root, b"not a report")
    env = {
        "PORTAL_DATABASE_URL": app.config["DATABASE_URL"],
        "PORTAL_BOUNCE_MAILDIR": str(root),
        "PORTAL_MAIL_FROM": settings_of(app).mail_from,  # our Message-IDs' domain
    }

    done = CliRunner().invoke(notifier_main, ["bounces"], env=env)
    unset = CliRunner().invoke(notifier_main, ["bounces"], env={**env, "PORTAL_BOUNCE_MAILDIR": ""})

    assert done.exit_code == 0, done.output
    assert done.stdout.strip() == (
        "bounced 1, retrying 0, failed 0, delayed 0, ignored 0, kept aside 1"
    )
    assert notice_of(app, sent).status == "bounced"
    assert unset.exit_code == 1
    assert "PORTAL_BOUNCE_MAILDIR: not set" in unset.output
    assert "Traceback" not in unset.output


# -- PHI ------------------------------------------------------------------------------------


def test_phi_in_a_report_never_reaches_logs_or_the_audit_trail(
    make_app: Callable[..., Flask],
    bounce_sink: MailSink,
    t0: datetime,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = app_for(make_app, bounce_sink)
    people(app, PATIENT_EMAIL)
    sent = sent_notice(app, bounce_sink, t0)
    notice = make_message_id(notice_of(app, sent).public_id, DOMAIN)
    root = bounce_sink.handler.bounce_path
    assert root is not None
    phi = f"{PATIENT_NAME} born {PATIENT_DOB.isoformat()} re {SUBJECT} <{PATIENT_EMAIL}>"
    leaky = dsn.Bounce("failed", "5.1.1", f"550 5.1.1 {phi}: user unknown")
    for raw in (
        mail.report(notice, leaky, to=PATIENT_EMAIL),  # recorded
        mail.report(notice, leaky, to=PATIENT_EMAIL),  # ignored: the notice is bounced already
        mail.report(f"<{PATIENT_NAME.split()[0]}@{DOMAIN}>", leaky, to=PATIENT_EMAIL),  # not ours
        mail.handmade(mail.encoded("message/delivery-status", "7bit", phi.encode())),  # malformed
    ):
        mail.deliver(root, raw)

    with caplog.at_level(logging.DEBUG):
        stats = process(app, t0 + timedelta(seconds=5))

    assert (stats.bounced, stats.ignored, stats.kept_aside) == (1, 1, 2)
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    with app.app_context():
        trail = [
            f"{e.details} {e.target_id} {e.target_type}"
            for e in db.session.scalars(select(AuditEvent))
        ]
        reasons = [n.failure_reason for n in db.session.scalars(select(Notification))]
        recipient = db.session.scalar(select(User).where(User.email == PATIENT_EMAIL))
    assert reasons == ["bounce:5.1.1"]
    assert recipient is not None
    for leak in (*PHI_STRINGS, PATIENT_EMAIL, "user unknown", "patients.example.org"):
        assert leak not in logged
        assert all(leak not in line for line in trail)


# -- the sink as a bouncing relay -----------------------------------------------------------


def test_the_sink_bounces_reserved_recipients_and_delivers_the_rest(
    make_notice: Callable[..., EmailMessage],
    sink_factory: Callable[..., MailSink],
    smtp_settings: Callable[..., Any],
    tmp_path: Path,
) -> None:
    from notifier.smtp import SmtpTransport

    relay = sink_factory("relay", bounce_maildir=tmp_path / "bounces")
    plain = sink_factory("plain-relay")  # no bounce Maildir: reserved names are ordinary mail
    recipients = [
        "bounce-hard@example.net",
        "Bounce-Soft+7@example.net",
        "bounce-delay@example.net",
        "someone@example.net",
    ]
    for target in (relay, plain):
        with SmtpTransport(smtp_settings(target)) as transport:
            for n, address in enumerate(recipients):
                assert transport.send(make_notice(n, to=address)).startswith("250 ")

    assert (relay.handler.stored, relay.handler.bounced) == (1, 3)
    assert (plain.handler.stored, plain.handler.bounced) == (4, 0)
    root = relay.handler.bounce_path
    assert root is not None
    reports = {dsn.parse((root / "new" / name).read_bytes()) for name in mail.state(root).new}
    assert reports == {  # make_notice(n) is <notice-n{n}@...>
        dsn.Report(dsn.Severity.HARD, "5.1.1", "n0"),
        dsn.Report(dsn.Severity.SOFT, "4.2.2", "n1"),
        dsn.Report(dsn.Severity.DELAYED, "4.4.1", "n2"),
    }
