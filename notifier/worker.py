"""The worker: enqueue reminders, claim due notices, render, guard, send, record.

A claimed batch is read in a few queries and every email built (rendered, checked for
PHI) before the first send; then it is sent over the pass's one SMTP connection in
slices of about SLICE_SECONDS, each fenced on the claim in one statement and its
outcomes committed together (see "batches" below). A crash loses nothing: unsent rows,
and the rows of the slice being sent, stay ``sending`` and are claimed again once their
lease runs out, or at once by a worker started again under the same id, and sent with
the same Message-ID. The lease is renewed while the batch is sent (notifier.lease).

A transport fault (notifier.smtp.TransportFault: a wrong CA file, a refused
login, no STARTTLS, the relay down) is no message's fault: what the slice sent is
recorded, the rest of the batch goes back to the queue with its links, no attempt
counted, the pass ends, and :func:`run_forever` backs off, logs one error naming the
setting to check, and records it in its heartbeat (notifier.health) for ``notifier
status`` and the staff pages. When a pass fails on the database, what the worker still
holds is handed back if the database lets it (else the lease, or the worker's next
pass under the same id, brings it back), and the worker tries again within
seconds. Logs name rows by id only.
"""

from __future__ import annotations

import functools
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
from portal import audit
from portal.config import DEFAULT_RELAY_BACKOFF, Settings, settings_of
from portal.crypto.errors import ContentDestroyed, ContentTampered, CryptoError, KeyUnavailable
from portal.database import rowcount, utcnow
from portal.extensions import db
from portal.models import Message, Notification, Role, User
from portal.models.notifications import NoticeKind, NoticeStatus
from portal.services import delivery, keys, messaging, notices

log = logging.getLogger(__name__)

INTERNAL_ERROR = "internal-error"
# An unexpected error is one row's (retried later, its attempt counted) until it happens to
# this many rows in a row: then it is the worker's (a bug every email meets), the pass ends
# and the rows go back unsent and uncounted, as on a transport fault, so a systematic bug
# cannot use up every notice's attempts and fail the whole queue for good.
INTERNAL_ERRORS_IN_A_ROW = 3
POLL_SECONDS = 5.0  # pause between passes of run_forever when nothing is due
REMINDER_BATCH = 200  # messages reminded per pass at most
REMINDER_EVERY = 60.0  # seconds: run_forever scans for due reminders at most this often
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
    ``standby``: another worker held the SQLite send lock, so this one claimed nothing;
    ``more_reminders``: the reminder scan was cut at REMINDER_BATCH, more may be due."""

    sent: int = 0
    failed: int = 0
    retrying: int = 0
    skipped: int = 0
    delayed: int = 0
    transport_error: TransportFault | None = None
    standby: bool = False
    more_reminders: bool = False  # the reminder scan was cut at REMINDER_BATCH

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
    return _domain_of(settings.mail_from)


@functools.lru_cache(maxsize=8)
def _domain_of(mail_from: str) -> str:
    return parseaddr(mail_from)[1].rpartition("@")[2] or "localhost"  # once per notice: cached


def dkim_key(settings: Settings) -> DkimKey | None:
    """Return the DKIM key when DKIM_KEY is set, else None; OSError if it is unreadable."""
    path = settings.dkim_key
    if not path:
        return None
    return DkimKey(settings.dkim_selector, sender_domain(settings), Path(path).read_bytes())


# -- one row's email ----------------------------------------------------------------------


class _Skip(Exception):
    """The row must not be sent; ``mark`` says what to record for it at the slice's
    commit ("failed", "cancelled", "retry"; None: nothing, it is not this worker's)."""

    def __init__(
        self, outcome: RowOutcome, mark: str | None = None, reason: str | None = None
    ) -> None:
        super().__init__(outcome.value)
        self.outcome, self.mark, self.reason = outcome, mark, reason


def _message_gone(message: Message | None, now: datetime) -> bool:
    if message is None:
        return False
    return bool(message.revoked_at or message.destroyed_at or message.expires_at <= now)


def _build(session: Session, row: Notification, settings: Settings, now: datetime) -> EmailMessage:
    """Render the row's email and run the PHI guard; raises _Skip (nothing written)."""
    message = session.get(Message, row.message_id) if row.message_id else None
    if row.kind in (NoticeKind.PICKUP, NoticeKind.REMINDER) and _message_gone(message, now):
        raise _Skip(RowOutcome.SKIPPED, "cancelled")
    recipient = session.get(User, row.recipient_id)
    url = notices.open_payload(session, row)
    if url is None and row.kind in PORTAL_LINK_KINDS:
        url = f"{settings.base_url}/"  # people sign in to the portal: no per-notice link
    if recipient is None or url is None:
        raise _Skip(RowOutcome.FAILED, "failed", "payload-missing")
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
        log.warning("notice %d stopped by the PHI guard", row.id, extra={"notice_id": row.id})
        raise _Skip(RowOutcome.FAILED, "failed", "phi-guard")
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
    session: Session, row: Notification, settings: Settings, now: datetime
) -> EmailMessage:
    """The row's email, or _Skip with what to record: a failure of this row's key, payload
    or template is this row's only. Raises the database's errors."""
    try:
        return _build(session, row, settings, now)
    except _Skip:
        raise
    except CryptoError as err:  # this row's key or payload only: fail it, the pass goes on
        reason = crypto_reason(err)
    except (TemplateError, OSError, ValueError):
        reason = "render-failed"
    log.warning("notice %d could not be rendered", row.id, extra={"notice_id": row.id})
    raise _Skip(RowOutcome.FAILED, "failed", reason)


def _retry_outcome(row: Notification) -> RowOutcome:
    """FAILED when mark_retry gave up (attempts exhausted), else RETRYING."""
    return RowOutcome.FAILED if row.status == NoticeStatus.FAILED else RowOutcome.RETRYING


# -- batches ------------------------------------------------------------------------------
#
# A claimed batch is read in a few queries (its notices, their messages and recipients,
# what the PHI guard needs, with their data keys: phi.prefetch), and every email is
# rendered and guarded before anything is sent. Then it goes out in slices: one fence for
# the slice's rows (outbox.may_send_many, which on PostgreSQL keeps them locked until the
# slice's commit), the sends over the one connection with their outcomes kept in memory,
# and one commit recording them all (outbox.mark_sent_many and one audit event per notice,
# chained under one hold of the audit head: portal.audit.chain_at_commit). A slice ends
# SLICE_SECONDS after its first send, when the lease is due for renewal (renewed in the
# same commit), on a stop, or at the batch's end.
#
# Crash safety: a worker killed mid-slice leaves that slice's rows ``sending`` under its
# claim; they are sent again (the lease, or the same worker id at once) with the same
# Message-ID (derived from the notice's public id); so does a BaseException (the
# stand-in for a crash). Any error the worker lives through records what the slice sent
# first. A refusal, a retry, an unreadable key or an unexpected error while sending is
# its row's outcome only; a transport fault hands the unsent rows back queued.

SLICE_SECONDS = 0.5  # a slice's outcomes are committed at most about this long after its first send
# Within a slice, its messages are checked again for a revocation (or destruction, or
# expiry) at least this often, and after this many sends: a revoked message's later
# notices in the slice are cancelled, not sent.
RECHECK_SECONDS = 0.05
RECHECK_SENDS = 8
MARKS = ("sent", "failed", "retry", "cancelled")


@dataclass
class _Done:
    """A row's outcome, recorded at its slice's commit: ``mark`` one of MARKS, or None
    (nothing to record: not this worker's any more); ``detail`` the server's reply (sent)
    or the PHI-free reason (failed, retry)."""

    notice_id: int
    outcome: RowOutcome
    mark: str | None
    detail: str | None = None
    patient_id: int | None = None  # sent: for its audit event


@dataclass
class _Job:
    """A batch row whose email is built, waiting for its slice."""

    notice_id: int
    kind: str
    email: EmailMessage
    patient_id: int | None  # for its audit event
    message_id: int | None = None  # pickups and reminders: a revocation cancels the send


@contextmanager
def job(session: Session) -> Iterator[None]:
    """One job of the notifier (a claim, a slice's outcomes, a reminder): the one place it
    commits.

    Commits when the block finishes, rolls back when it (or the commit) raises,
    then re-raises: like the portal's request boundary (portal.web.transaction),
    outbox and services only flush, and a slice's outcomes are durable before the
    next slice is sent.
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
    """Process the rows ``lease`` holds, slice by slice, renewing the lease on the way;
    return False when the pass should end (stop). Raises TransportFault (the rows handed
    back, delayed), or the error that failed the pass (what is still held handed back if
    the database allows)."""
    jobs: list[_Job] = []
    try:
        jobs, done = _build_batch(session, settings, lease, clock())
        while lease.pending:
            if stop.is_set():
                _record(session, settings, lease, done, clock, stats)
                _hand_back(session, lease)
                return False
            if lease.due_for_renewal(clock()):  # else a slice's commit renews it when due
                _renew(session, lease, clock, settings, stats)
            jobs = _run_slice(session, transport, settings, lease, jobs, done, clock, stats, stop)
            done = []
            if lease.pending and not jobs:  # none left to send (never expected): back to the queue
                _hand_back(session, lease)
    except TransportFault as fault:
        if fault.mid_transaction and lease.pending:
            stats.delayed += _set_back(session, lease, fault.reason, clock())
        stats.delayed += _hand_back(session, lease, fault.reason)
        raise
    except Exception:
        _hand_back(session, lease)
        raise
    finally:
        jobs.clear()  # the built emails (live links): not kept by an error's frames
    return True


def _build_batch(
    session: Session, settings: Settings, lease: Lease, now: datetime
) -> tuple[list[_Job], list[_Done]]:
    """Read the batch's rows and what their emails need in a few queries, and build every
    email (rendered, PHI-guarded); writes nothing. Returns the jobs to send, in the
    batch's order, and the outcomes of the rows that must not be sent."""
    rows = outbox.load_many(session, lease.pending)
    message_ids = {row.message_id for row in rows.values() if row.message_id}
    # Held here, so that every session.get below is answered from the identity map.
    held = [
        *(
            session.scalars(select(Message).where(Message.id.in_(message_ids)))
            if message_ids
            else ()
        ),
        *session.scalars(select(User).where(User.id.in_({r.recipient_id for r in rows.values()}))),
    ]
    phi.prefetch(session, rows.values())
    jobs: list[_Job] = []
    done: list[_Done] = []
    for notice_id in lease.pending:
        row = rows.get(notice_id)
        if row is None or row.status != NoticeStatus.SENDING:
            done.append(_Done(notice_id, RowOutcome.SKIPPED, None))
            continue
        try:
            email = _prepare(session, row, settings, now)
            revocable = row.kind in (NoticeKind.PICKUP, NoticeKind.REMINDER)
            jobs.append(
                _Job(
                    notice_id,
                    row.kind,
                    email,
                    outbox.patient_id(session, row),
                    row.message_id if revocable else None,
                )
            )
        except _Skip as skip:
            done.append(_Done(notice_id, skip.outcome, skip.mark, skip.reason))
        except DATABASE_DOWN:
            raise
        except Exception as err:  # not this row's outcome to decide: it is tried again later
            _log_unexpected(notice_id, err)
            if isinstance(err, DBAPIError):
                session.rollback()  # PostgreSQL refuses the transaction's next statement
            done.append(_Done(notice_id, RowOutcome.RETRYING, "retry", INTERNAL_ERROR))
    del held
    return jobs, done


def _log_unexpected(notice_id: int, err: Exception) -> None:
    if isinstance(err, DBAPIError):  # its text quotes the statement's parameters: the types only
        log.error(
            "notice %d: database error (%s: %s)",
            notice_id,
            type(err).__name__,
            type(err.orig).__name__,
            extra={"notice_id": notice_id},
        )
    else:
        log.error(
            "notice %d: unexpected error",
            notice_id,
            exc_info=err,
            extra={"notice_id": notice_id},
        )


def _run_slice(
    session: Session,
    transport: SmtpTransport,
    settings: Settings,
    lease: Lease,
    jobs: list[_Job],
    done: list[_Done],
    clock: Clock,
    stats: RunStats,
    stop: threading.Event,
) -> list[_Job]:
    """Fence the jobs still pending, send them for one slice, record the slice's outcomes
    (with ``done``, outcomes decided earlier) in one commit; return the jobs left.

    A message revoked (destroyed, expired) while the slice is sent cancels its rows not
    sent yet: checked every RECHECK_SECONDS or RECHECK_SENDS sends. An error while
    sending (a transport fault, the database, a KeyboardInterrupt of ``notifier run
    --once``) records what the slice sent first, if it still can, and leaves the row being
    sent first in ``lease.pending``; then it is raised. Only a crash that runs no handler
    (SIGKILL, power) records nothing: the slice's rows are sent again, same Message-IDs.
    More than INTERNAL_ERRORS_IN_A_ROW unexpected send errors in a row end the pass as a
    fault of the worker (UnexpectedSendErrors), not of each row.
    """
    now = clock()
    pending = set(lease.pending)
    jobs = [j for j in jobs if j.notice_id in pending]
    fenced = outbox.may_send_many(
        session, [j.notice_id for j in jobs], lease.claim, now, lease.length
    )
    sendable: list[_Job] = []
    for item in jobs:
        notice_id = item.notice_id
        if notice_id not in fenced:  # the lease ran out, or another worker took it
            log.warning(
                "notice %d: lease lost, not sent", notice_id, extra={"notice_id": notice_id}
            )
            done.append(_Done(notice_id, RowOutcome.SKIPPED, None))
        elif fenced[notice_id] and item.kind in (NoticeKind.PICKUP, NoticeKind.REMINDER):
            done.append(_Done(notice_id, RowOutcome.SKIPPED, "cancelled"))  # revoked meanwhile
        else:
            sendable.append(item)
    left: list[_Job] = []
    started: float | None = None
    checked, sends = time.monotonic(), 0  # the fence was the last check for revocations
    unexpected: list[_Done] = []  # the last sends' outcomes, while unexpected errors
    gone: set[int] = set()
    for position, item in enumerate(sendable):
        if started is not None and (
            stop.is_set()
            or time.monotonic() - started >= SLICE_SECONDS
            or lease.due_for_renewal(clock())
        ):
            left = sendable[position:]
            break
        try:
            if sends and (sends >= RECHECK_SENDS or time.monotonic() - checked >= RECHECK_SECONDS):
                # A read only (SQLite: no write before the slice's commit).
                watched = {j.message_id for j in sendable[position:] if j.message_id is not None}
                gone = outbox.messages_gone(session, watched, clock())
                checked, sends = time.monotonic(), 0
            if item.message_id in gone:  # revoked, destroyed or expired since the fence
                done.append(_Done(item.notice_id, RowOutcome.SKIPPED, "cancelled"))
                continue
            started = started if started is not None else time.monotonic()
            transport.deadline = lease.send_deadline()  # the send ends before the lease does
            outcome = _send(transport, item)
            done.append(outcome)
            sends += 1
            unexpected = [*unexpected, outcome] if outcome.detail == INTERNAL_ERROR else []
            if len(unexpected) >= INTERNAL_ERRORS_IN_A_ROW:
                for counted in unexpected:  # handed back with the rest, no attempt counted
                    done.remove(counted)
                raise UnexpectedSendErrors(len(unexpected))
        except BaseException:  # a transport fault, the database, Ctrl-C on --once
            _record_before_raising(session, settings, lease, done, clock, stats, item.notice_id)
            raise
    _record(session, settings, lease, done, clock, stats)
    return left


class UnexpectedSendErrors(RuntimeError):
    """INTERNAL_ERRORS_IN_A_ROW notices in a row met an unexpected error while being sent."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} notices in a row met an unexpected error while sent")


def _send(transport: SmtpTransport, item: _Job) -> _Done:
    """Send one built email; its outcome, to record (any other error of the send is this
    row's: retried later, "internal-error"). Raises TransportFault and the database being
    down (not the row's)."""
    notice_id = item.notice_id
    try:
        reply = transport.send(item.email)
    except TransportFault:
        raise  # every notice would meet it: the batch goes back to the queue as it is
    except TransientDeliveryError as err:
        log.info("notice %d deferred (%s)", notice_id, err.reason, extra={"notice_id": notice_id})
        return _Done(notice_id, RowOutcome.RETRYING, "retry", err.reason)
    except PermanentDeliveryError as err:
        log.warning("notice %d failed (%s)", notice_id, err.reason, extra={"notice_id": notice_id})
        return _Done(notice_id, RowOutcome.FAILED, "failed", err.reason)
    except DATABASE_DOWN:
        raise  # not the row's: the pass ends (what the slice sent is recorded if it can be)
    except Exception as err:  # e.g. flattening or signing the email: this row's, retried later
        # The type only: its text or frames could quote the email.
        log.error(
            "notice %d: unexpected error while sending (%s)",
            notice_id,
            type(err).__name__,
            extra={"notice_id": notice_id},
        )
        return _Done(notice_id, RowOutcome.RETRYING, "retry", INTERNAL_ERROR)
    return _Done(notice_id, RowOutcome.SENT, "sent", reply, item.patient_id)


def _record_before_raising(
    session: Session,
    settings: Settings,
    lease: Lease,
    done: list[_Done],
    clock: Clock,
    stats: RunStats,
    current: int,
) -> None:
    """Record what the slice did before an error; ``current`` (the row being sent) first in
    ``lease.pending``. Never raises: the slice's rows then stay ``sending`` under the claim
    and are sent again, with the same Message-IDs."""
    try:
        _record(session, settings, lease, done, clock, stats)
    except Exception as err:
        log.warning(
            "could not record %d notices (%s); they are sent again with the same Message-ID",
            len(done),
            type(err).__name__,
        )
    if current in lease.pending:
        lease.pending.remove(current)
        lease.pending.insert(0, current)


def _record(
    session: Session,
    settings: Settings,
    lease: Lease,
    done: list[_Done],
    clock: Clock,
    stats: RunStats,
) -> None:
    """Record ``done`` in one commit, renewing the rest of the lease when due, and count
    the outcomes; drop the rows from ``lease.pending``. When the commit fails on anything
    but the database being down, each row is recorded alone (a failing row is retried
    later, "internal-error"). Raises the database's errors when it is unreachable."""
    if not done:
        return
    recorded = {d.notice_id for d in done}
    rest = [i for i in lease.pending if i not in recorded]
    mark, now = time.monotonic(), clock()
    renew = bool(rest) and lease.due_for_renewal(now)
    try:
        with job(session):
            outcomes = _record_all(session, lease.claim, done, now)
            held = outbox.renew(session, rest, lease.claim, now) if renew else rest
            if renew:
                health.beat(session, lease.claim.worker_id, now, settings.notifier_lease)
    except DATABASE_DOWN:
        raise
    except Exception as err:
        log.warning(
            "could not record %d notices at once (%s); recording them one by one",
            len(done),
            type(err).__name__,
        )
        outcomes = [_record_one(session, lease.claim, d, now) for d in done]
        renew = False
        held = rest
    for outcome in outcomes:
        stats.add(outcome)
    lease.pending = rest
    if renew:
        stats.skipped += lease.renewed_to(now, held, mark)  # taken meanwhile: the holder records


def _record_all(
    session: Session, claim: outbox.Claim, done: list[_Done], now: datetime
) -> list[RowOutcome]:
    """Record ``done`` (flushed): the sent rows in one fenced UPDATE, the rest row by row;
    the outcome of each (SKIPPED for a row whose claim was lost: its holder records)."""
    replies = {d.notice_id: d.detail or "" for d in done if d.mark == "sent"}
    patients = {d.notice_id: d.patient_id for d in done if d.mark == "sent"}
    sent = outbox.mark_sent_many(session, replies, now, claim=claim, patients=patients)
    outcomes = []
    for d in done:
        if d.mark == "sent":
            outcomes.append(RowOutcome.SENT if d.notice_id in sent else RowOutcome.SKIPPED)
            if d.notice_id in sent:
                log.info("notice %d sent", d.notice_id, extra={"notice_id": d.notice_id})
        else:
            outcomes.append(_mark(session, claim, d, now))
    return outcomes


def _mark(session: Session, claim: outbox.Claim, d: _Done, now: datetime) -> RowOutcome:
    """Record one outcome other than sent (flushed); SKIPPED when the claim was lost."""
    try:
        if d.mark == "failed":
            outbox.mark_failed(session, d.notice_id, d.detail or "failed", claim=claim)
        elif d.mark == "retry":
            row = outbox.mark_retry(session, d.notice_id, d.detail or "retry", now, claim=claim)
            return _retry_outcome(row)
        elif d.mark == "cancelled":
            outbox.mark_cancelled(session, d.notice_id, claim=claim)
        elif d.mark == "sent":
            outbox.mark_sent(session, d.notice_id, d.detail or "", now, claim=claim)
            log.info("notice %d sent", d.notice_id, extra={"notice_id": d.notice_id})
    except outbox.ClaimLost:
        return RowOutcome.SKIPPED
    return d.outcome


def _record_one(session: Session, claim: outbox.Claim, d: _Done, now: datetime) -> RowOutcome:
    """Record one outcome as a job of its own; when that fails, the row is retried later
    ("internal-error", itself a job). Raises the database's errors when it is down."""
    try:
        with job(session):
            return _mark(session, claim, d, now)
    except DATABASE_DOWN:
        raise
    except Exception as err:
        _log_unexpected(d.notice_id, err)
    try:
        with job(session):
            outbox.mark_retry(session, d.notice_id, INTERNAL_ERROR, now, claim=claim)
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
    reminders: bool = True,
) -> RunStats:
    """Enqueue due reminders (unless ``reminders`` is False), then claim and send batches
    until none is due; return counts.

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
        audit.chain_at_commit(session)  # a slice's events under one hold of the audit head
        keys.keyring()  # unreadable: a misconfiguration, so end the pass before any row fails
        if reminders:
            stats.more_reminders = _enqueue_reminders(session, clock(), settings)[1]
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
                stats.transport_error = _without_frames(fault)
            reached = transport.connections_opened > 0
        _record_pass(session, worker_id, clock(), settings, stats, reached)
    return stats


def _without_frames(fault: TransportFault) -> TransportFault:
    """``fault`` and the errors it chains, with no traceback: their frames hold the batch's
    emails (live links), and the fault is kept for the whole backoff."""
    todo: list[BaseException | None] = [fault]
    seen: set[int] = set()
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        err.__traceback__ = None
        todo += (err.__cause__, err.__context__)
    return fault


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
    writing the heartbeat at least every HEARTBEAT_SECONDS. Scans for due reminders on
    the first pass and then at most every REMINDER_EVERY seconds (a reminder is due days
    after its message: a minute late changes nothing), or at the next pass when a scan
    was cut at REMINDER_BATCH (a backlog is not held to REMINDER_BATCH a minute). On a
    signal the row being sent is finished, the slice's outcomes recorded and the rest of
    the batch handed back.
    """
    stop = stop or threading.Event()
    restore = _install_signals(stop)
    pace = _Pace(poll_seconds, relay_backoff(settings_of(app)))
    log.info("notifier worker started")
    _beat(app, worker_id, register=True)
    reminded: float | None = None  # time.monotonic() of the last pass that scanned for reminders
    more = False  # that scan was cut at REMINDER_BATCH
    try:
        while not stop.is_set():
            scan = reminders_due(reminded, more, time.monotonic())
            try:
                stats = drain(app, worker_id, stop=stop, probe=pace.alarm.active, reminders=scan)
                if scan:
                    reminded, more = time.monotonic(), stats.more_reminders
                wait = pace.passed(stats)
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
    return _enqueue_reminders(session, now, settings)[0]


def _enqueue_reminders(session: Session, now: datetime, settings: Settings) -> tuple[int, bool]:
    """:func:`enqueue_reminders`; also True when the scan was cut at REMINDER_BATCH and
    queued some (more may be due: scan again at the next pass; a scan that queued none,
    its messages all failing, waits REMINDER_EVERY as usual, not to log them every pass)."""
    after = timedelta(seconds=settings.reminder_after)
    candidates = _reminder_candidates(session, now, after)
    queued = sum(_remind_one(session, message_id, now) for message_id in candidates)
    return queued, queued > 0 and len(candidates) >= REMINDER_BATCH


def reminders_due(last_scan: float | None, more: bool, now: float) -> bool:
    """Whether a pass of run_forever scans for due reminders: on the first pass, when the
    last scan was cut at REMINDER_BATCH (``more``), and REMINDER_EVERY seconds after the
    last scan; ``last_scan`` and ``now`` are time.monotonic() readings."""
    return last_scan is None or more or now - last_scan >= REMINDER_EVERY


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
