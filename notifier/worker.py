"""The worker: enqueue reminders, claim due notices, render, guard, send, record.

Every row is its own job: loaded by id, rendered, checked for PHI, sent over
the batch's one SMTP connection, and its outcome committed before the next
row, so a crash loses nothing (unsent rows stay ``sending`` and are claimed
again once their lease runs out, or at once by a worker started again under
the same id). The lease is renewed while the batch is sent (notifier.lease).

A transport fault (notifier.smtp.TransportFault: a wrong CA file, a refused
login, no STARTTLS, the relay down) is no message's fault: the batch goes back
to the queue with its links, no attempt counted, the pass ends, and
:func:`run_forever` backs off, logs one error naming the setting to check,
and records it in its heartbeat (notifier.health) for ``notifier status`` and
the staff pages. When a pass fails on the database, what the worker still holds
is handed back if the database lets it (else the lease, or the worker's next
pass under the same id, brings it back), and the worker tries again within
seconds. Logs name rows by id only.
"""

from __future__ import annotations

import html
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import parseaddr
from enum import StrEnum
from pathlib import Path

from flask import Flask
from jinja2 import TemplateError
from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from notifier import bounces, health, outbox, phi, render
from notifier.lease import Lease, send_lock
from notifier.smtp import (
    DkimKey,
    PermanentDeliveryError,
    SmtpSettings,
    SmtpTransport,
    TransientDeliveryError,
    TransportFault,
)
from portal.config import DEFAULT_RELAY_BACKOFF, Settings, settings_of
from portal.crypto.errors import ContentDestroyed, ContentTampered, CryptoError, KeyUnavailable
from portal.database import rowcount, utcnow
from portal.extensions import db
from portal.models import Message, Notification, Role, User
from portal.models.notifications import NoticeKind, NoticeStatus
from portal.services import delivery, keys, messaging, notices

log = logging.getLogger(__name__)

POLL_SECONDS = 5.0  # pause between passes of run_forever when nothing is due
REMINDER_BATCH = 200  # messages reminded per pass at most
# Seconds before the next pass after a transport fault (first, most) at the default
# PORTAL_NOTIFIER_RELAY_BACKOFF; tests shorten them below the setting's 1 s.
RELAY_BACKOFF = (15.0, 300.0)
RELAY_BACKOFF_GROWTH, RELAY_BACKOFF_MOST = 20, 300.0  # most wait: 20x the first, at most 5 min
FAILED_PASS_RETRY = (0.5, 5.0)  # seconds before the next pass after a failed one: first, most
# The database is unreachable (or gave up on the statement): no row's fault, the pass ends.
DATABASE_DOWN = (OperationalError, InterfaceError)
# Notices with no link of their own: they point at the portal's front page.
PORTAL_LINK_KINDS = frozenset(
    {
        NoticeKind.REPLY,
        NoticeKind.TEAM_MESSAGE,
        NoticeKind.MFA_CHANGED,
        NoticeKind.PASSWORD_CHANGED,
        NoticeKind.ACCOUNT_LOCKED,
    }
)

Clock = Callable[[], datetime]


class RowOutcome(StrEnum):
    """What processing one claimed row came to; each names a :class:`RunStats` counter."""

    SENT = "sent"
    FAILED = "failed"  # given up: the row is failed, staff see the reason
    RETRYING = "retrying"  # back in the queue with a later next_attempt_at
    SKIPPED = "skipped"  # not sent and nothing to retry: cancelled, or no longer ours


@dataclass
class RunStats:
    """What one pass did; ``delayed`` rows were handed back, unsent, by ``transport_error``;
    ``standby``: another worker held the SQLite send lock, so this one claimed nothing."""

    sent: int = 0
    failed: int = 0
    retrying: int = 0
    skipped: int = 0
    delayed: int = 0
    transport_error: TransportFault | None = None
    standby: bool = False

    @property
    def processed(self) -> int:
        """Rows that reached an outcome (sent, failed, retrying or skipped)."""
        return self.sent + self.failed + self.retrying + self.skipped

    def add(self, outcome: RowOutcome) -> None:
        """Count one row's outcome."""
        name = RowOutcome(outcome).value
        setattr(self, name, getattr(self, name) + 1)


def smtp_settings(settings: Settings) -> SmtpSettings:
    """Return the transport settings from the app's settings."""
    return SmtpSettings(
        host=settings.smtp_host,
        port=settings.smtp_port,
        tls=settings.smtp_tls,
        ca_file=settings.smtp_ca_file,
        username=settings.smtp_username,
        password=settings.smtp_password,
        local_hostname=sender_domain(settings),
    )


def sender_domain(settings: Settings) -> str:
    """Return the domain of MAIL_FROM: Message-IDs, DKIM and EHLO use it."""
    return parseaddr(settings.mail_from)[1].rpartition("@")[2] or "localhost"


def dkim_key(settings: Settings) -> DkimKey | None:
    """Return the DKIM key when DKIM_KEY is set, else None; OSError if it is unreadable."""
    path = settings.dkim_key
    if not path:
        return None
    return DkimKey(settings.dkim_selector, sender_domain(settings), Path(path).read_bytes())


# -- one row ------------------------------------------------------------------------------


class _Skip(Exception):
    """The row must not be sent: its outcome has been recorded already."""

    def __init__(self, outcome: RowOutcome) -> None:
        super().__init__(outcome.value)
        self.outcome = outcome


def _message_gone(message: Message | None, now: datetime) -> bool:
    if message is None:
        return False
    return bool(message.revoked_at or message.destroyed_at or message.expires_at <= now)


def _build(
    session: Session, row: Notification, settings: Settings, now: datetime, claim: outbox.Claim
) -> EmailMessage:
    """Render the row's email and run the PHI guard; records the outcome and raises _Skip
    (ClaimLost when the claim was taken meanwhile)."""
    message = session.get(Message, row.message_id) if row.message_id else None
    if row.kind in (NoticeKind.PICKUP, NoticeKind.REMINDER) and _message_gone(message, now):
        outbox.mark_cancelled(session, row.id, claim=claim)
        raise _Skip(RowOutcome.SKIPPED)
    recipient = session.get(User, row.recipient_id)
    url = notices.open_payload(session, row)
    if url is None and row.kind in PORTAL_LINK_KINDS:
        url = f"{settings.base_url}/"  # people sign in to the portal: no per-notice link
    if recipient is None or url is None:
        outbox.mark_failed(session, row.id, "payload-missing", claim=claim)
        raise _Skip(RowOutcome.FAILED)
    email = render.render(
        row,
        url=url,
        org_name=settings.org_name,
        org_address=settings.org_address,
        support_contact=settings.support_contact,
        expires_at=message.expires_at if message is not None else None,
        mail_from=settings.mail_from,
        to_address=recipient.email,
        message_id_domain=sender_domain(settings),
        now=now,
    )
    # The link is random by construction; leave it out so a token cannot match a name.
    texts = [
        t.replace(url, " ").replace(html.escape(url), " ") for t in render.readable_texts(email)
    ]
    if phi.find_phi(texts, phi.phi_terms(session, row)):
        outbox.mark_failed(session, row.id, "phi-guard", claim=claim)
        log.warning("notice %d stopped by the PHI guard", row.id, extra={"notice_id": row.id})
        raise _Skip(RowOutcome.FAILED)
    return email


def crypto_reason(err: CryptoError) -> str:
    """Return the PHI-free failure reason staff see for a key or sealed value that won't open."""
    if isinstance(err, KeyUnavailable):
        return "key-unavailable"  # its KEK version is not in the keyring
    if isinstance(err, ContentTampered):
        return "content-tampered"  # wrapped key or sealed payload fails authentication
    if isinstance(err, ContentDestroyed):
        return "content-destroyed"  # the data key was shredded
    return "content-unavailable"


def _prepare(
    session: Session, row: Notification, settings: Settings, now: datetime, claim: outbox.Claim
) -> EmailMessage:
    try:
        return _build(session, row, settings, now, claim)
    except (_Skip, outbox.ClaimLost):
        raise
    except CryptoError as err:  # this row's key or payload only: fail it, the pass goes on
        outbox.mark_failed(session, row.id, crypto_reason(err), claim=claim)
    except (TemplateError, OSError, ValueError):
        outbox.mark_failed(session, row.id, "render-failed", claim=claim)
    log.warning("notice %d could not be rendered", row.id, extra={"notice_id": row.id})
    raise _Skip(RowOutcome.FAILED)


def process(
    session: Session,
    transport: SmtpTransport,
    settings: Settings,
    notice_id: int,
    now: datetime,
    claim: outbox.Claim,
    lease: timedelta = outbox.LEASE,
) -> tuple[RowOutcome, str | None]:
    """Send one notice ``claim`` holds and record the outcome (flushed; the caller commits).

    Returns (outcome, delivery failure reason or None); SKIPPED, unsent, when
    the lease ran out or another worker took the row. Raises ClaimLost when
    the claim is taken after the send (nothing recorded: the holder records),
    TransportFault when the relay cannot be used (nothing recorded: the row is
    not at fault), else only for unexpected errors.
    """
    row = outbox.load(session, notice_id)
    if row is None or row.status != NoticeStatus.SENDING:
        return RowOutcome.SKIPPED, None
    try:
        email = _prepare(session, row, settings, now, claim)
    except _Skip as skip:
        return skip.outcome, None
    if not outbox.may_send(session, notice_id, claim, now, lease):  # the fence: one sender
        log.warning("notice %d: lease lost, not sent", notice_id, extra={"notice_id": notice_id})
        return RowOutcome.SKIPPED, None
    try:
        reply = transport.send(email)
    except TransportFault:
        raise  # every notice would meet it: the batch goes back to the queue as it is
    except TransientDeliveryError as err:
        outbox.mark_retry(session, notice_id, err.reason, now, claim=claim)
        log.info("notice %d deferred (%s)", notice_id, err.reason, extra={"notice_id": notice_id})
        return _retry_outcome(row), err.reason
    except PermanentDeliveryError as err:
        outbox.mark_failed(session, notice_id, err.reason, claim=claim)
        log.warning("notice %d failed (%s)", notice_id, err.reason, extra={"notice_id": notice_id})
        return RowOutcome.FAILED, err.reason
    outbox.mark_sent(session, notice_id, reply, now, claim=claim)
    log.info("notice %d sent", notice_id, extra={"notice_id": notice_id})
    return RowOutcome.SENT, None


def _retry_outcome(row: Notification) -> RowOutcome:
    """FAILED when mark_retry gave up (attempts exhausted), else RETRYING."""
    return RowOutcome.FAILED if row.status == NoticeStatus.FAILED else RowOutcome.RETRYING


# -- batches ------------------------------------------------------------------------------


@contextmanager
def job(session: Session) -> Iterator[None]:
    """One job of the notifier (a claim, a notice, a reminder): the one place it commits.

    Commits when the block finishes, rolls back when it (or the commit) raises,
    then re-raises: like the portal's request boundary (portal.web.transaction),
    outbox and services only flush, and each notice's outcome is durable
    before the next one is tried.
    """
    try:
        yield
        session.commit()
    except BaseException:
        session.rollback()
        raise


def _hand_back(session: Session, lease: Lease, reason: str | None = None) -> int:
    """Release the rows ``lease`` still holds (as a job); return how many. Never raises:
    when the database is gone too, they come back when the lease runs out, or at once
    to this worker id's next pass."""
    pending = list(lease.pending)
    try:
        with job(session):
            outbox.release(session, pending, lease.claim, reason)
    except Exception as err:  # the pass is failing already: keep its error, not this one
        log.warning(
            "could not hand back %d notices (%s); they return when their lease ends",
            len(pending),
            type(err).__name__,
        )
        return 0
    lease.pending = []
    return len(pending)


def _set_back(session: Session, lease: Lease, reason: str, now: datetime) -> int:
    """The relay broke off the transaction of the batch's first row after accepting its
    MAIL: queue that row behind the others (outbox.set_back), as a job, so it cannot be
    first again at every pass; return 1 when done. Never raises (the rest go back
    anyway)."""
    notice_id = lease.pending[0]
    try:
        with job(session):
            outbox.set_back(session, notice_id, reason, now, claim=lease.claim)
    except Exception as err:  # ClaimLost, or the database: the row comes back as the rest do
        log.warning("notice %d could not be set back (%s)", notice_id, type(err).__name__)
        return 0
    log.info("notice %d set back (%s)", notice_id, reason, extra={"notice_id": notice_id})
    lease.pending.pop(0)
    return 1


def _renew(
    session: Session, lease: Lease, clock: Clock, settings: Settings, stats: RunStats
) -> None:
    """Renew the batch's lease and write the heartbeat, as one job."""
    mark, now = time.monotonic(), clock()
    with job(session):
        held = outbox.renew(session, lease.pending, lease.claim, now)
        health.beat(session, lease.claim.worker_id, now, settings.notifier_lease)
    stats.skipped += lease.renewed_to(now, held, mark)  # taken meanwhile: the holder records


def _run_batch(
    session: Session,
    transport: SmtpTransport,
    settings: Settings,
    lease: Lease,
    clock: Clock,
    stats: RunStats,
    stop: threading.Event,
) -> bool:
    """Process the rows ``lease`` holds, renewing it on the way; return False when the pass
    should end (stop). Raises TransportFault (the rows handed back, delayed), or the error
    that failed the pass (what is still held handed back if the database allows)."""
    try:
        while lease.pending:
            if stop.is_set():
                _hand_back(session, lease)
                return False
            if lease.due_for_renewal(clock()):
                _renew(session, lease, clock, settings, stats)
                if not lease.pending:  # all taken meanwhile
                    break
            transport.deadline = lease.send_deadline()  # the send ends before the lease does
            stats.add(_send_one(session, transport, settings, lease, clock()))
            lease.pending.pop(0)
    except TransportFault as fault:
        if fault.mid_transaction and lease.pending:
            stats.delayed += _set_back(session, lease, fault.reason, clock())
        stats.delayed += _hand_back(session, lease, fault.reason)
        raise
    except Exception:
        _hand_back(session, lease)
        raise
    return True


def _send_one(
    session: Session,
    transport: SmtpTransport,
    settings: Settings,
    lease: Lease,
    now: datetime,
) -> RowOutcome:
    """Process the batch's next notice as a job of its own; an unexpected error rolls it
    back and the notice is retried later (itself a job). Returns the outcome; SKIPPED when
    the claim was taken (the new holder records it). Raises TransportFault, and the
    database's errors when it is unreachable (the pass ends)."""
    notice_id, claim, length = lease.pending[0], lease.claim, lease.length
    try:
        with job(session):
            return process(session, transport, settings, notice_id, now, claim, length)[0]
    except outbox.ClaimLost:
        return RowOutcome.SKIPPED
    except (TransportFault, *DATABASE_DOWN):
        raise  # not this row's fault
    except DBAPIError as err:  # its text quotes the statement's parameters: the types only
        log.error(
            "notice %d: database error (%s: %s)",
            notice_id,
            type(err).__name__,
            type(err.orig).__name__,
            extra={"notice_id": notice_id},
        )
    except Exception:
        log.exception("notice %d: unexpected error", notice_id, extra={"notice_id": notice_id})
    try:
        with job(session):
            outbox.mark_retry(session, notice_id, "internal-error", now, claim=claim)
    except outbox.ClaimLost:
        return RowOutcome.SKIPPED
    return RowOutcome.RETRYING


def drain(
    app: Flask,
    worker_id: str,
    *,
    clock: Clock = utcnow,
    batch: int = outbox.DEFAULT_BATCH,
    stop: threading.Event | None = None,
    probe: bool = False,
) -> RunStats:
    """Enqueue due reminders, then claim and send batches until none is due; return counts.

    Runs inside its own app context with one SMTP connection for the pass; with
    ``probe``, or when the worker's stored row shows a current transport error, it
    connects to the relay first (the last pass met a transport fault), and claims
    nothing if that fails. A transport fault ends the pass with the rows still
    queued: it is in the result's ``transport_error``. On SQLite it claims and sends
    only while holding the send lock (notifier.lease.send_lock); when another worker
    holds it the pass claims nothing and the result is ``standby``. Writes the worker's
    heartbeat at the end. Raises OSError when DKIM_KEY cannot be read, KeyUnavailable when the
    keyring cannot be (rows stay queued, links kept), and the database's errors.
    """
    stop = stop or threading.Event()
    stats = RunStats()
    settings = settings_of(app)
    with app.app_context():
        session = db.session
        keys.keyring()  # unreadable: a misconfiguration, so end the pass before any row fails
        enqueue_reminders(session, clock(), settings)
        bounces.collect(session, settings, clock())  # DSNs that came back (notifier.bounces)
        probe = probe or health.error_stored(session, worker_id)  # e.g. a restart after a fix
        transport = SmtpTransport(smtp_settings(settings), dkim_key=dkim_key(settings))
        with send_lock(session.get_bind().engine.url) as sending, transport:
            stats.standby = not sending  # SQLite: another worker is sending
            try:
                if probe and sending:
                    transport.open()
                    with job(session):  # staff pages and /health stop saying "delayed" now
                        health.relay_ok(session, worker_id, clock(), settings.notifier_lease)
                if sending:
                    _claim_and_send(
                        session, transport, settings, worker_id, clock, batch, stats, stop
                    )
            except TransportFault as fault:
                stats.transport_error = fault
            reached = transport.connections_opened > 0
        _record_pass(session, worker_id, clock(), settings, stats, reached)
    return stats


def _claim_and_send(
    session: Session,
    transport: SmtpTransport,
    settings: Settings,
    worker_id: str,
    clock: Clock,
    batch: int,
    stats: RunStats,
    stop: threading.Event,
) -> None:
    """Claim a batch, send it, repeat until none is due or the pass must end."""
    length = timedelta(seconds=settings.notifier_lease)
    while not stop.is_set():
        mark, now = time.monotonic(), clock()
        with job(session):  # the claim is visible to other workers before any send
            ids = outbox.claim(session, worker_id, batch, now=now, lease=length)
        lease = Lease(outbox.Claim(worker_id, now), ids, length, mark)
        if not ids or not _run_batch(session, transport, settings, lease, clock, stats, stop):
            return


def _record_pass(
    session: Session,
    worker_id: str,
    now: datetime,
    settings: Settings,
    stats: RunStats,
    reached: bool,
) -> None:
    result = health.PassResult(
        stats.sent,
        stats.failed,
        stats.retrying,
        stats.delayed,
        stats.transport_error,
        reached,
        stats.standby,
    )
    with job(session):
        health.record_pass(session, worker_id, now, settings.notifier_lease, result)


def run_once(
    app: Flask, worker_id: str, *, clock: Clock = utcnow, batch: int = outbox.DEFAULT_BATCH
) -> int:
    """Process notices until none is due; return how many rows were processed."""
    return drain(app, worker_id, clock=clock, batch=batch).processed


# -- running ------------------------------------------------------------------------------


class TransportAlarm:
    """Logs a transport fault once, when it starts or changes, and once when it ends."""

    def __init__(self) -> None:
        self.reason: str | None = None

    @property
    def active(self) -> bool:
        """True while the last pass met a transport fault."""
        return self.reason is not None

    def update(self, fault: TransportFault | None, delayed: int = 0) -> None:
        """Take note of a pass's transport fault (None: the pass met none)."""
        if fault is None:
            if self.reason is not None:
                log.info("mail relay usable again (was %s); sending resumed", self.reason)
            self.reason = None
            return
        if fault.reason != self.reason:
            log.error(
                "cannot send notices: %s (%s); check %s. %d notices handed back to the "
                "queue with their links; they are sent once this is fixed",
                fault.advice,
                fault.reason,
                fault.setting,
                delayed,
            )
        self.reason = fault.reason


def relay_backoff(settings: Settings) -> tuple[float, float]:
    """The first and the longest wait after a transport fault (PORTAL_NOTIFIER_RELAY_BACKOFF
    first, doubling to 20 times that, at most 5 min)."""
    first = settings.notifier_relay_backoff
    if first == DEFAULT_RELAY_BACKOFF:
        return RELAY_BACKOFF
    return float(first), min(float(first * RELAY_BACKOFF_GROWTH), RELAY_BACKOFF_MOST)


class _Backoff:
    """Waits that double from ``first`` to ``most``, and start again after a reset."""

    def __init__(self, first: float, most: float) -> None:
        self.first, self.most, self.next = first, most, first

    def take(self) -> float:
        """Return the wait now, doubling the next one."""
        wait, self.next = self.next, min(self.next * 2, self.most)
        return wait

    def reset(self) -> None:
        """Start again from ``first``."""
        self.next = self.first


class _Pace:
    """How long run_forever waits after each pass, and the one log line per failure streak."""

    def __init__(
        self, poll_seconds: float, relay_backoff: tuple[float, float] | None = None
    ) -> None:
        self.poll_seconds = poll_seconds
        self.alarm = TransportAlarm()
        self.relay = _Backoff(*(relay_backoff or RELAY_BACKOFF))
        self.failing = _Backoff(*FAILED_PASS_RETRY)
        self.failure: str | None = None
        self.standing_by = False

    def passed(self, stats: RunStats) -> float:
        """A pass ended: return the wait before the next (a backoff after a transport fault)."""
        if self.failure is not None:
            log.info("notifier pass succeeded again after %s", self.failure)
        self.failure = None
        self.failing.reset()
        if stats.standby != self.standing_by:
            if stats.standby:
                log.info("another notifier holds the SQLite send lock; standing by")
            else:
                log.info("notifier took over sending (the SQLite send lock was free)")
            self.standing_by = stats.standby
        if stats.standby:  # poll for the lock; a relay fault seen before is probed on taking over
            return self.poll_seconds
        self.alarm.update(stats.transport_error, stats.delayed)
        if stats.transport_error is None:
            self.relay.reset()
            return self.poll_seconds
        if stats.sent:  # the relay worked again since the last fault: a new streak
            self.relay.reset()
        return self.relay.take()

    def failed(self, err: Exception) -> float:
        """A pass raised ``err``: log it once per streak; return a short wait (retry soon)."""
        name = type(err).__name__
        if isinstance(err, DBAPIError):  # its text quotes the statement: the kinds only
            what = "unreachable" if isinstance(err, DATABASE_DOWN) else "error"
            name = f"database {what}: {name} ({type(err.orig).__name__})"
            if self.failure is None:
                log.warning("notifier pass failed, %s; trying again within seconds", name)
        elif self.failure is None:
            log.exception("notifier pass failed; trying again")
        self.failure = name
        return self.failing.take()


def run_forever(
    app: Flask,
    worker_id: str,
    poll_seconds: float = POLL_SECONDS,
    stop: threading.Event | None = None,
) -> None:
    """Drain, wait, repeat; return after SIGTERM or SIGINT (or ``stop``).

    Waits ``poll_seconds`` after a pass, PORTAL_NOTIFIER_RELAY_BACKOFF (15 s) doubling
    to 20 times that (at most 5 min) after a transport fault (probing the relay first
    the next time), and 0.5 s doubling to 5 s after a failed pass (the database down),
    writing the heartbeat at least every HEARTBEAT_SECONDS. On a signal the row being
    sent is finished and the rest of the batch handed back to the queue.
    """
    stop = stop or threading.Event()
    restore = _install_signals(stop)
    pace = _Pace(poll_seconds, relay_backoff(settings_of(app)))
    log.info("notifier worker started")
    _beat(app, worker_id, register=True)
    try:
        while not stop.is_set():
            try:
                wait = pace.passed(drain(app, worker_id, stop=stop, probe=pace.alarm.active))
            except Exception as err:
                wait = pace.failed(err)
            _pause(app, worker_id, stop, wait)
    finally:
        restore()
    log.info("notifier worker stopped")


def _pause(app: Flask, worker_id: str, stop: threading.Event, seconds: float) -> None:
    """Wait ``seconds`` (or until ``stop``), writing the heartbeat while waiting long."""
    until = time.monotonic() + seconds
    while not stop.wait(min(max(until - time.monotonic(), 0), delivery.HEARTBEAT_SECONDS)):
        if until - time.monotonic() <= 0:
            return
        _beat(app, worker_id)


def _beat(app: Flask, worker_id: str, *, register: bool = False) -> None:
    """Write the heartbeat as a job of its own; a database outage only skips it."""
    lease = settings_of(app).notifier_lease
    try:
        with app.app_context(), job(db.session):
            write = health.register if register else health.beat
            write(db.session, worker_id, utcnow(), lease)
    except DBAPIError as err:
        log.debug("heartbeat not written (%s)", type(err.orig).__name__)


def _install_signals(stop: threading.Event) -> Callable[[], None]:
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


# -- reminders ----------------------------------------------------------------------------


def _reminder_candidates(session: Session, now: datetime, after: timedelta) -> list[int]:
    stmt = (
        select(Message.id)
        .join(User, User.id == Message.recipient_id)
        .where(
            User.role == Role.PATIENT,
            Message.first_opened_at.is_(None),
            Message.revoked_at.is_(None),
            Message.destroyed_at.is_(None),
            Message.reminded_at.is_(None),
            Message.expires_at > now,
            Message.created_at <= now - after,
        )
        .order_by(Message.id)
        .limit(REMINDER_BATCH)
    )
    return list(session.scalars(stmt))


def _take_reminder(session: Session, message_id: int, now: datetime) -> bool:
    """Set reminded_at if still unset; True for the one worker that did (race-safe)."""
    result = session.execute(
        update(Message)
        .where(Message.id == message_id, Message.reminded_at.is_(None))
        .values(reminded_at=now)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) > 0


def enqueue_reminders(session: Session, now: datetime, settings: Settings) -> int:
    """Queue one reminder per unopened message older than REMINDER_AFTER; return how many.

    Skips opened, revoked, expired, destroyed and already reminded messages.
    Each message is a job (committed on its own), so concurrent workers never
    remind twice. The fresh link and notice come from services.messaging.remind.
    A message whose reminder fails is confined to itself (see _remind_one); raises
    only for database errors, which end the pass.
    """
    after = timedelta(seconds=settings.reminder_after)
    return sum(
        _remind_one(session, message_id, now)
        for message_id in _reminder_candidates(session, now, after)
    )


def _remind_one(session: Session, message_id: int, now: datetime) -> int:
    """Remind about one message as a job of its own; return 1 if a reminder was queued.

    A data key that cannot be opened rolls back this job only, then records a
    failed reminder (audited, shown on the staff status page) so it is not tried
    on every pass. Any other error is logged by id and tried again next pass.
    """
    try:
        with job(session):
            return _remind(session, message_id, now)
    except CryptoError as err:
        reason = crypto_reason(err)
    except DBAPIError:
        raise  # the database's fault, not this message's: the pass ends
    except Exception:
        log.exception("message %d: reminder failed", message_id)
        return 0
    with job(session):
        _reminder_failed(session, message_id, reason, now)
    return 0


def _reminder_failed(session: Session, message_id: int, reason: str, now: datetime) -> None:
    """Record the message's reminder as a failed notice with no link (flushed), unless another
    worker reminded it meanwhile; marks the message reminded so no pass retries it."""
    if not _take_reminder(session, message_id, now):
        return
    message = session.get(Message, message_id, populate_existing=True)
    assert message is not None  # _take_reminder just updated it
    recipient = session.get(User, message.recipient_id)
    assert recipient is not None  # a foreign key guarantees it
    notice = notices.enqueue(
        session, kind=NoticeKind.REMINDER, recipient=recipient, url=None, message=message, due=now
    )
    outbox.mark_failed(session, notice.id, reason, claim=None)  # a new row nobody holds
    log.warning(
        "message %d: reminder notice %d failed (%s)",
        message_id,
        notice.id,
        reason,
        extra={"notice_id": notice.id},
    )


def _remind(session: Session, message_id: int, now: datetime) -> int:
    """Remind about one message unless another worker took it; return 1 if reminded, else 0."""
    if not _take_reminder(session, message_id, now):
        return 0
    message = session.get(Message, message_id, populate_existing=True)
    assert message is not None
    notice = messaging.remind(session, message, now)
    log.info(
        "message %d: reminder notice %d queued",
        message_id,
        notice.id,
        extra={"notice_id": notice.id},
    )
    return 1
