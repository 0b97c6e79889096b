"""The worker: enqueue reminders, claim due notices, render, guard, send, record.

Every row is its own job: loaded by id, rendered, checked for PHI, sent over
the batch's one SMTP connection, and its outcome committed before the next
row, so a crash loses nothing (unsent rows stay ``sending`` and are claimed
again once their lease runs out). Logs name rows by id only.
"""

from __future__ import annotations

import html
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from flask import Flask, current_app
from jinja2 import TemplateError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from notifier import outbox, phi, render
from notifier.smtp import (
    DkimKey,
    PermanentDeliveryError,
    SmtpSettings,
    SmtpTransport,
    TransientDeliveryError,
)
from portal import audit
from portal.audit import SYSTEM, Action
from portal.crypto.errors import CryptoError
from portal.database import utcnow
from portal.extensions import db
from portal.models import Message, Notification, PickupLink, Role, User
from portal.models.notifications import NoticeKind, NoticeStatus
from portal.security.tokens import new_token, token_hash
from portal.services import notices

log = logging.getLogger(__name__)

POLL_SECONDS = 5.0  # pause between passes of run_forever when nothing is due
REMINDER_BATCH = 200  # messages reminded per pass at most
CONNECTION_DOWN = frozenset({"connect-failed", "timeout"})  # no point trying the rest of a batch
# Notices with no link of their own: they point at the portal's front page.
PORTAL_LINK_KINDS = frozenset({NoticeKind.REPLY, NoticeKind.MFA_CHANGED,
                               NoticeKind.PASSWORD_CHANGED, NoticeKind.ACCOUNT_LOCKED})

Clock = Callable[[], datetime]


@dataclass
class RunStats:
    """What one pass did."""

    sent: int = 0
    failed: int = 0
    retrying: int = 0
    skipped: int = 0

    @property
    def processed(self) -> int:
        """Rows that reached an outcome (sent, failed, retrying or skipped)."""
        return self.sent + self.failed + self.retrying + self.skipped

    def add(self, outcome: str) -> None:
        """Count one row's outcome."""
        setattr(self, outcome, getattr(self, outcome) + 1)


def smtp_settings(config: dict[str, Any] | Any) -> SmtpSettings:
    """Return the transport settings from the app's config."""
    return SmtpSettings(
        host=config["SMTP_HOST"], port=int(config["SMTP_PORT"]), tls=config["SMTP_TLS"],
        ca_file=config.get("SMTP_CA_FILE"), username=config.get("SMTP_USERNAME"),
        password=config.get("SMTP_PASSWORD"), local_hostname=sender_domain(config))


def sender_domain(config: dict[str, Any] | Any) -> str:
    """Return the domain of MAIL_FROM: Message-IDs, DKIM and EHLO use it."""
    return parseaddr(config["MAIL_FROM"])[1].rpartition("@")[2] or "localhost"


def dkim_key(config: dict[str, Any] | Any) -> DkimKey | None:
    """Return the DKIM key when DKIM_KEY is set, else None; OSError if it is unreadable."""
    path = config.get("DKIM_KEY")
    if not path:
        return None
    return DkimKey(config["DKIM_SELECTOR"], sender_domain(config), Path(path).read_bytes())


# -- one row ------------------------------------------------------------------------------


class _Skip(Exception):
    """The row must not be sent: its outcome has been recorded already."""


def _message_gone(message: Message | None, now: datetime) -> bool:
    if message is None:
        return False
    return bool(message.revoked_at or message.destroyed_at or message.expires_at <= now)


def _build(session: Session, row: Notification, config: Any, now: datetime) -> EmailMessage:
    """Render the row's email and run the PHI guard; records the outcome and raises _Skip."""
    message = session.get(Message, row.message_id) if row.message_id else None
    if row.kind in (NoticeKind.PICKUP, NoticeKind.REMINDER) and _message_gone(message, now):
        outbox.mark_cancelled(session, row.id)
        raise _Skip("cancelled")
    recipient = session.get(User, row.recipient_id)
    url = notices.open_payload(session, row)
    if url is None and row.kind in PORTAL_LINK_KINDS:
        url = f"{config['BASE_URL']}/"  # people sign in to the portal: no per-notice link
    if recipient is None or url is None:
        outbox.mark_failed(session, row.id, "payload-missing")
        raise _Skip("failed")
    email = render.render(
        row, url=url, org_name=config["ORG_NAME"], org_address=config["ORG_ADDRESS"],
        support_contact=config["SUPPORT_CONTACT"],
        expires_at=message.expires_at if message is not None else None,
        mail_from=config["MAIL_FROM"], to_address=recipient.email,
        message_id_domain=sender_domain(config), now=now)
    # The link is random by construction; leave it out so a token cannot match a name.
    texts = [t.replace(url, " ").replace(html.escape(url), " ")
             for t in render.readable_texts(email)]
    if phi.find_phi(texts, phi.phi_terms(session, row)):
        outbox.mark_failed(session, row.id, "phi-guard")
        log.warning("notice %d stopped by the PHI guard", row.id, extra={"notice_id": row.id})
        raise _Skip("failed")
    return email


def _prepare(session: Session, row: Notification, config: Any, now: datetime) -> EmailMessage:
    try:
        return _build(session, row, config, now)
    except _Skip:
        raise
    except CryptoError:
        outbox.mark_failed(session, row.id, "content-unavailable")
    except (TemplateError, OSError, ValueError):
        outbox.mark_failed(session, row.id, "render-failed")
    log.warning("notice %d could not be rendered", row.id, extra={"notice_id": row.id})
    raise _Skip("failed")


def process(session: Session, transport: SmtpTransport, config: Any, notice_id: int,
            now: datetime) -> tuple[str, str | None]:
    """Send one claimed notice and record the outcome (flushed; the caller commits).

    Returns (outcome, delivery failure reason or None), outcome being "sent",
    "failed", "retrying" or "skipped". Raises only for unexpected errors.
    """
    row = outbox.load(session, notice_id)
    if row is None or row.status != NoticeStatus.SENDING:
        return "skipped", None
    try:
        email = _prepare(session, row, config, now)
    except _Skip as skip:
        return ("skipped" if str(skip) == "cancelled" else "failed"), None
    try:
        reply = transport.send(email)
    except TransientDeliveryError as err:
        outbox.mark_retry(session, notice_id, err.reason, now)
        log.info("notice %d deferred (%s)", notice_id, err.reason, extra={"notice_id": notice_id})
        return ("failed" if row.status == NoticeStatus.FAILED else "retrying"), err.reason
    except PermanentDeliveryError as err:
        outbox.mark_failed(session, notice_id, err.reason)
        log.warning("notice %d failed (%s)", notice_id, err.reason,
                    extra={"notice_id": notice_id})
        return "failed", err.reason
    outbox.mark_sent(session, notice_id, reply, now)
    log.info("notice %d sent", notice_id, extra={"notice_id": notice_id})
    return "sent", None


# -- batches ------------------------------------------------------------------------------


def _defer_rest(session: Session, ids: list[int], reason: str, now: datetime,
                stats: RunStats) -> None:
    """The server is unreachable: retry the rest of the batch later without trying each."""
    for notice_id in ids:
        row = outbox.mark_retry(session, notice_id, reason, now)
        session.commit()
        stats.add("failed" if row.status == NoticeStatus.FAILED else "retrying")


def _run_batch(session: Session, transport: SmtpTransport, config: Any, ids: list[int],
               clock: Clock, stats: RunStats, stop: threading.Event) -> bool:
    """Process claimed ``ids``; return False when the pass should end (server down, stop)."""
    for position, notice_id in enumerate(ids):
        if stop.is_set():
            outbox.release(session, ids[position:])
            session.commit()
            return False
        now = clock()
        try:
            outcome, reason = process(session, transport, config, notice_id, now)
        except Exception:
            session.rollback()
            log.exception("notice %d: unexpected error", notice_id,
                          extra={"notice_id": notice_id})
            outbox.mark_retry(session, notice_id, "internal-error", now)
            outcome, reason = "retrying", None
        session.commit()
        stats.add(outcome)
        if reason in CONNECTION_DOWN:
            _defer_rest(session, ids[position + 1:], reason, now, stats)
            return False
    return True


def drain(app: Flask, worker_id: str, *, clock: Clock = utcnow,
          batch: int = outbox.DEFAULT_BATCH, stop: threading.Event | None = None) -> RunStats:
    """Enqueue due reminders, then claim and send batches until none is due; return counts.

    Runs inside its own app context with one SMTP connection for the pass.
    Raises OSError when DKIM_KEY cannot be read.
    """
    stop = stop or threading.Event()
    stats = RunStats()
    with app.app_context():
        session = db.session
        enqueue_reminders(session, clock())
        session.commit()
        with SmtpTransport(smtp_settings(app.config), dkim_key=dkim_key(app.config)) as transport:
            while not stop.is_set():
                ids = outbox.claim(session, worker_id, batch, now=clock())
                if not ids or not _run_batch(session, transport, app.config, ids, clock,
                                             stats, stop):
                    break
    return stats


def run_once(app: Flask, worker_id: str, *, clock: Clock = utcnow,
             batch: int = outbox.DEFAULT_BATCH) -> int:
    """Process notices until none is due; return how many rows were processed."""
    return drain(app, worker_id, clock=clock, batch=batch).processed


def run_forever(app: Flask, worker_id: str, poll_seconds: float = POLL_SECONDS,
                stop: threading.Event | None = None) -> None:
    """Drain, sleep ``poll_seconds``, repeat; return after SIGTERM or SIGINT (or ``stop``).

    On a signal the row being sent is finished and the rest of the batch handed
    back to the queue.
    """
    stop = stop or threading.Event()
    restore = _install_signals(stop)
    log.info("notifier worker started")
    try:
        while not stop.is_set():
            try:
                drain(app, worker_id, stop=stop)
            except Exception:
                log.exception("notifier pass failed; trying again")
            stop.wait(poll_seconds)
    finally:
        restore()
    log.info("notifier worker stopped")


def _install_signals(stop: threading.Event) -> Callable[[], None]:
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


# -- reminders ----------------------------------------------------------------------------


def _reminder_candidates(session: Session, now: datetime, after: timedelta) -> list[int]:
    stmt = (select(Message.id).join(User, User.id == Message.recipient_id)
            .where(User.role == Role.PATIENT, Message.first_opened_at.is_(None),
                   Message.revoked_at.is_(None), Message.destroyed_at.is_(None),
                   Message.reminded_at.is_(None), Message.expires_at > now,
                   Message.created_at <= now - after)
            .order_by(Message.id).limit(REMINDER_BATCH))
    return list(session.scalars(stmt))


def _take_reminder(session: Session, message_id: int, now: datetime) -> bool:
    """Set reminded_at if still unset; True for the one worker that did (race-safe)."""
    result = session.execute(
        update(Message).where(Message.id == message_id, Message.reminded_at.is_(None))
        .values(reminded_at=now).execution_options(synchronize_session=False))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def remind(session: Session, message: Message, base_url: str, now: datetime) -> Notification:
    """Create a fresh pickup link for ``message`` and queue a reminder carrying it (flushed).

    Only token hashes are stored, so a reminder cannot reuse the first link's
    URL; the first link stays valid. Returns the notice.
    """
    recipient = session.get(User, message.recipient_id)
    assert recipient is not None  # a foreign key guarantees it
    token = new_token()
    link = PickupLink(message_id=message.id, recipient_id=recipient.id,
                      token_hash=token_hash(token), expires_at=message.expires_at)
    session.add(link)
    session.flush()
    audit.record(session, Action.LINK_REISSUE, actor=SYSTEM, target_type="pickup_link",
                 target_id=link.public_id, patient_id=recipient.id, message_id=message.id,
                 details={"reason": "reminder"})
    return notices.enqueue(session, kind=NoticeKind.REMINDER, recipient=recipient,
                           url=f"{base_url}/p/{token}", message=message, link_id=link.id,
                           due=now)


def enqueue_reminders(session: Session, now: datetime) -> int:
    """Queue one reminder per unopened message older than REMINDER_AFTER; return how many.

    Skips opened, revoked, expired, destroyed and already reminded messages.
    Commits after each message (a job each), so concurrent workers never
    remind twice.
    """
    after = timedelta(seconds=int(current_app.config["REMINDER_AFTER"]))
    count = 0
    for message_id in _reminder_candidates(session, now, after):
        if _take_reminder(session, message_id, now):
            message = session.get(Message, message_id, populate_existing=True)
            assert message is not None
            notice = remind(session, message, current_app.config["BASE_URL"], now)
            log.info("message %d: reminder notice %d queued", message_id, notice.id,
                     extra={"notice_id": notice.id})
            count += 1
        session.commit()
    return count
