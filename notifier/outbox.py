"""The outbox: claim due notices, then mark each sent, retried later, failed or cancelled.

Claiming is one statement that moves rows to ``sending``: on PostgreSQL its
subquery takes ``FOR UPDATE SKIP LOCKED``, so any number of workers claim
disjoint batches; on SQLite the database's single write lock serialises
claims. A worker that dies leaves its rows ``sending``; once their lease
(``PORTAL_NOTIFIER_LEASE``) has run out another worker claims them again, and a
worker started again under the same id takes its own back at once. A worker
renews the lease of the rows it still holds while it sends them
(:func:`renew`), so only a dead or stuck worker's rows expire.

``claim`` commits (the claim must be durable before anything is sent). A
claim is fenced by its :class:`Claim` (``claimed_by`` plus ``claimed_at``): the
check before a send and every ``mark_*`` is an UPDATE or SELECT whose WHERE
names the claim, so a worker whose lease ran out and was taken by another
never sends the row again and never overwrites the new holder's outcome
(it gets :class:`ClaimLost`). The ``mark_*`` functions flush only: the worker
commits once per slice of a batch (notifier.worker), so the status changes and their
audit events land together; :func:`may_send_many` and :func:`mark_sent_many` fence a
slice's rows in one statement each.

SQLite keeps no row lock over a send (its ``FOR UPDATE`` is a no-op), and the
commit of a send's outcome can wait for its write lock for up to the busy
timeout (30 s, portal.database), past the end of the lease, when a second
worker could claim the row and send it again. So on SQLite one worker sends at
a time (notifier.lease.send_lock: an OS lock beside the database file held for
the claim-and-send part of a pass); the others stand by. PostgreSQL keeps the
row locked over the send and needs no such lock.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, case, or_, select, update
from sqlalchemy.orm import Session

from portal import audit
from portal.audit import SYSTEM, Action, Outcome
from portal.database import rowcount, utcnow
from portal.models import Message, Notification, Role, User
from portal.models.notifications import NoticeStatus

LEASE = timedelta(minutes=2)  # default PORTAL_NOTIFIER_LEASE: an unrenewed older claim is dead
BACKOFF_BASE = timedelta(minutes=1)  # first retry delay; doubles with each attempt
BACKOFF_CAP = timedelta(hours=4)  # longest single delay between two attempts
RETRY_WINDOW = timedelta(hours=24)  # give up once the delays so far add up to more
DEFAULT_BATCH = 50  # rows per claim
MAX_REASON = 64  # failure_reason column width

QUEUED, SENDING = NoticeStatus.QUEUED.value, NoticeStatus.SENDING.value

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    """Who holds a claimed row and since when: the fence every send and ``mark_*`` checks."""

    worker_id: str
    claimed_at: datetime


class ClaimLost(Exception):
    """The row is no longer held by this claim (its lease ran out and another worker took
    it, or it is done): do not send it, do not record anything for it."""

    def __init__(self, notice_id: int) -> None:
        super().__init__(f"notification {notice_id}: claim lost")
        self.notice_id = notice_id


def _held(claim: Claim | None) -> ColumnElement[bool]:
    """Rows ``claim`` still holds; for None, rows nobody holds (not being sent)."""
    if claim is None:
        return and_(Notification.status != SENDING, Notification.claimed_by.is_(None))
    return and_(
        Notification.status == SENDING,
        Notification.claimed_by == claim.worker_id,
        Notification.claimed_at == claim.claimed_at,
    )


def may_send_many(
    session: Session, ids: Sequence[int], claim: Claim, now: datetime, lease: timedelta = LEASE
) -> dict[int, bool]:
    """The rows of ``ids`` that ``claim`` still holds with a live ``lease``, locked (one
    statement): {id: True when its message was revoked, destroyed or has expired}.

    The fence of a slice of a batch: call it just before the slice's sends, with no write
    made yet in the transaction (SQLite then reads the latest commit). On PostgreSQL the
    rows stay locked until the caller commits (``FOR UPDATE`` of the notices only, not of
    their messages), so no claim can take them while they are being sent.
    """
    if not ids:
        return {}
    gone = _message_gone(now)
    stmt = (
        select(Notification.id, Notification.message_id, gone)
        .outerjoin(Message, Message.id == Notification.message_id)
        .where(Notification.id.in_(ids), _held(claim), Notification.claimed_at > now - lease)
        .with_for_update(of=Notification)
    )
    return {
        notice_id: bool(message_id is not None and is_gone)
        for notice_id, message_id, is_gone in session.execute(stmt)
    }


def messages_gone(session: Session, message_ids: Collection[int], now: datetime) -> set[int]:
    """The ids among ``message_ids`` whose message was revoked, destroyed or has expired
    (one read, no lock): checked again while a slice is sent, after its fence."""
    if not message_ids:
        return set()
    stmt = select(Message.id).where(Message.id.in_(message_ids), _message_gone(now))
    return set(session.scalars(stmt))


def _message_gone(now: datetime) -> ColumnElement[bool]:
    return or_(
        Message.revoked_at.is_not(None),
        Message.destroyed_at.is_not(None),
        Message.expires_at <= now,
    )


def _due(now: datetime, lease: timedelta, worker_id: str) -> ColumnElement[bool]:
    """Rows ``worker_id`` may take: queued and due, sending with an expired lease, or
    sending under its own id (left by an earlier run of this worker, which is gone)."""
    return or_(
        and_(Notification.status == QUEUED, Notification.next_attempt_at <= now),
        and_(
            Notification.status == SENDING,
            or_(Notification.claimed_at < now - lease, Notification.claimed_by == worker_id),
        ),
    )


def claim(
    session: Session,
    worker_id: str,
    batch: int = DEFAULT_BATCH,
    now: datetime | None = None,
    lease: timedelta = LEASE,
) -> list[int]:
    """Claim up to ``batch`` due notices for ``worker_id`` (flushed) and return their ids.

    The claim is ``Claim(worker_id, now)``: pass it to :func:`may_send_many` and
    the ``mark_*`` functions. Rows still ``sending`` under ``worker_id`` are
    taken back whatever their lease: a worker id names one running worker at a
    time, so they were left by a run that died (a stable ``--worker-id`` lets a
    restarted worker resume at once, without waiting for the lease).

    Oldest due first. Call it as a job of its own, with no transaction open, and
    commit at once (notifier.worker.job): the claim holds row locks (SQLite's
    write lock) until then. Rows another worker holds locked are skipped
    (PostgreSQL) or waited for (SQLite's write lock).
    """
    now = now or utcnow()
    due = _due(now, lease, worker_id)
    candidates = (
        select(Notification.id)
        .where(due)
        .order_by(Notification.next_attempt_at, Notification.id)
        .limit(batch)
    )
    if session.get_bind().dialect.name == "postgresql":
        # Two statements: PostgreSQL may rescan an IN (subquery) per row, and a rescan
        # skips the rows this UPDATE already changed, so LIMIT would not hold.
        ids = list(session.scalars(candidates.with_for_update(skip_locked=True)))
        target: ColumnElement[bool] = Notification.id.in_(ids)
    else:
        # One statement: SQLite's write lock serialises it against every other claim.
        target = and_(Notification.id.in_(candidates.scalar_subquery()), due)
    stmt = (
        update(Notification)
        .where(target)
        .values(status=SENDING, claimed_by=worker_id, claimed_at=now)
        .returning(Notification.id)
        .execution_options(synchronize_session="fetch")
    )
    return sorted(session.scalars(stmt).all())


def renew(session: Session, ids: Sequence[int], claim: Claim, now: datetime) -> list[int]:
    """Renew the lease of the rows of ``ids`` that ``claim`` still holds, from ``now``.

    Returns those rows' ids (flushed; the caller commits): from then on they are
    held by ``Claim(claim.worker_id, now)``, which the caller must use for every
    later fence. Rows missing from the answer were taken or finished meanwhile.
    """
    if not ids:
        return []
    result = session.execute(
        update(Notification)
        .where(Notification.id.in_(ids), _held(claim))
        .values(claimed_at=now)
        .returning(Notification.id)
        .execution_options(synchronize_session=False)
    )
    return sorted(result.scalars().all())


def release(session: Session, ids: Sequence[int], claim: Claim, reason: str | None = None) -> None:
    """Hand the rows of ``ids`` that ``claim`` still holds back to the queue, due at once
    and with their links (graceful shutdown, or a transport fault when ``reason`` is given:
    kept as their failure_reason, no attempt counted); flushes."""
    if ids:
        values: dict[str, object] = {"status": QUEUED, "claimed_by": None, "claimed_at": None}
        if reason is not None:
            values["failure_reason"] = reason[:MAX_REASON]
        session.execute(
            update(Notification)
            .where(Notification.id.in_(ids), _held(claim))
            .values(values)
            .execution_options(synchronize_session="fetch")
        )
        session.flush()


STALLED = "stalled:"  # failure_reason prefix of a row set back by :func:`set_back`


def set_back(
    session: Session, notice_id: int, reason: str, now: datetime, *, claim: Claim
) -> Notification:
    """Queue the notice whose transaction the relay broke off (a fault after its MAIL was
    accepted) behind the others: due after BACKOFF_BASE, no attempt counted, reason kept
    as ``stalled:<reason>``. When it was set back already (the fault recurs on it) it is
    :func:`mark_retry`'d instead, so one row cannot hold the queue forever. Flushes;
    raises ClaimLost when ``claim`` no longer holds it."""
    row = _required(session, notice_id, claim)
    if (row.failure_reason or "").startswith(STALLED):
        return mark_retry(session, notice_id, reason, now, claim=claim)
    row.status = QUEUED
    row.next_attempt_at = now + BACKOFF_BASE
    row.failure_reason = (STALLED + reason)[:MAX_REASON]
    row.claimed_by = row.claimed_at = None
    session.flush()
    return row


def load(session: Session, notice_id: int) -> Notification | None:
    """Return the notice as it is in the database now (never a stale cached copy)."""
    return session.get(Notification, notice_id, populate_existing=True)


def load_many(session: Session, ids: Sequence[int]) -> dict[int, Notification]:
    """Return the notices of ``ids`` as they are in the database now, by id (one query)."""
    if not ids:
        return {}
    stmt = (
        select(Notification)
        .where(Notification.id.in_(ids))
        .execution_options(populate_existing=True)
    )
    return {row.id: row for row in session.scalars(stmt)}


def _audit(
    session: Session, row: Notification, action: Action, outcome: Outcome, reason: str | None
) -> None:
    details: dict[str, object] = {"kind": row.kind, "attempts": row.attempts}
    if reason is not None:
        details["reason"] = reason
    audit.record(
        session,
        action,
        actor=SYSTEM,
        outcome=outcome,
        target_type="notification",
        target_id=row.public_id,
        patient_id=patient_id(session, row),
        message_id=row.message_id,
        details=details,
    )


def patient_id(session: Session, row: Notification) -> int | None:
    """The id of the patient the notice is about (its audit events name them), or None."""
    return _patient_of(session, row.recipient_id, row.message_id)


def _patient_of(session: Session, recipient_id: int, message_id: int | None) -> int | None:
    """The patient a notice is about: its recipient, or its message's sender (a reply).
    No query for people and messages the session holds already."""
    recipient = session.get(User, recipient_id)
    if recipient is not None and recipient.role == Role.PATIENT:
        return recipient.id
    message = session.get(Message, message_id) if message_id else None
    return message.sender_id if message is not None else None


def _required(session: Session, notice_id: int, claim: Claim | None) -> Notification:
    """Lock the row if ``claim`` still holds it and return it as it is now.

    A conditional UPDATE (rowcount 1 required) takes the row lock, so no other
    worker can reclaim it before the caller commits. Raises LookupError for an
    unknown id, ClaimLost when the row is not held by ``claim``.
    """
    result = session.execute(
        update(Notification)
        .where(Notification.id == notice_id, _held(claim))
        .values(claimed_by=Notification.claimed_by)
        .execution_options(synchronize_session=False)
    )
    row = load(session, notice_id)
    if row is None:
        raise LookupError(f"notification {notice_id} does not exist")
    if rowcount(result) != 1:
        log.warning("notice %d: claim lost, outcome not recorded", notice_id)
        raise ClaimLost(notice_id)
    return row


def mark_sent(
    session: Session,
    notice_id: int,
    smtp_response: str,
    now: datetime | None = None,
    *,
    claim: Claim | None,
) -> Notification:
    """Record that the server accepted the notice: status sent, the URL ERASED, audited.

    Returns the row (flushed). Raises LookupError for an unknown id, ClaimLost
    when ``claim`` no longer holds it (None: a row no worker holds).
    """
    row = _required(session, notice_id, claim)
    row.status = NoticeStatus.SENT.value
    row.sent_at = now or utcnow()
    row.smtp_response = smtp_response[:200]
    row.payload_sealed = None
    row.attempts += 1
    row.failure_reason = None
    _audit(session, row, Action.NOTICE_SENT, Outcome.SUCCESS, None)
    session.flush()
    return row


def mark_sent_many(
    session: Session,
    replies: Mapping[int, str],
    now: datetime,
    *,
    claim: Claim,
    patients: Mapping[int, int | None] | None = None,
) -> set[int]:
    """:func:`mark_sent` for the rows of ``replies`` (id: the server's reply) that ``claim``
    still holds: one fenced UPDATE, then one audit event per row marked (flushed; the caller
    commits). Returns the ids marked; a row missing from the answer is no longer held by
    ``claim`` (nothing recorded for it: its holder records). ``patients``: each row's
    :func:`patient_id`, when the caller knows it already (else it is read).

    The rows' ``Notification`` objects in the session are not refreshed: read them again
    (:func:`load`) before using them in the same transaction.
    """
    if not replies:
        return set()
    stmt = (
        update(Notification)
        .where(Notification.id.in_(list(replies)), _held(claim))
        .values(
            status=NoticeStatus.SENT.value,
            sent_at=now,
            smtp_response=_per_row(replies),
            payload_sealed=None,
            attempts=Notification.attempts + 1,
            failure_reason=None,
        )
        .returning(
            Notification.id,
            Notification.public_id,
            Notification.kind,
            Notification.attempts,
            Notification.recipient_id,
            Notification.message_id,
        )
        .execution_options(synchronize_session=False)
    )
    marked = session.execute(stmt).all()
    known = patients or {}
    for notice_id, public_id, kind, attempts, recipient_id, message_id in sorted(marked):
        patient = (
            known[notice_id]
            if notice_id in known
            else _patient_of(session, recipient_id, message_id)
        )
        audit.record(
            session,
            Action.NOTICE_SENT,
            actor=SYSTEM,
            outcome=Outcome.SUCCESS,
            target_type="notification",
            target_id=public_id,
            patient_id=patient,
            message_id=message_id,
            details={"kind": kind, "attempts": attempts},
        )
    lost = set(replies) - {row[0] for row in marked}
    for notice_id in sorted(lost):
        log.warning("notice %d: claim lost, outcome not recorded", notice_id)
    session.flush()
    return {row[0] for row in marked}


def _per_row(replies: Mapping[int, str]) -> ColumnElement[str]:
    """CASE id WHEN ... THEN reply: each row's own reply (at most 200 characters). Padded to
    a power of two of WHENs with an id no row has, so the statement takes a few shapes
    only and its compiled form is reused (a new shape per slice size costs milliseconds)."""
    whens = {notice_id: reply[:200] for notice_id, reply in replies.items()}
    padded = 1 << (len(whens) - 1).bit_length()
    whens.update((-n, "") for n in range(1, padded - len(whens) + 1))  # ids are positive
    return case(whens, value=Notification.id)


def mark_failed(
    session: Session, notice_id: int, reason: str, *, claim: Claim | None
) -> Notification:
    """Give up on the notice: status failed, a short PHI-free ``reason``, URL erased, audited.

    ``reason`` is machine-readable such as ``"smtp-5xx:550"`` or ``"phi-guard"``.
    Returns the row (flushed). Raises LookupError for an unknown id, ClaimLost
    when ``claim`` no longer holds it (None: a row no worker holds).
    """
    row = _required(session, notice_id, claim)
    row.attempts += 1
    return _fail(session, row, reason)


def _fail(session: Session, row: Notification, reason: str) -> Notification:
    row.status = NoticeStatus.FAILED.value
    row.failure_reason = reason[:MAX_REASON]
    row.payload_sealed = None
    _audit(session, row, Action.NOTICE_FAILED, Outcome.FAILURE, row.failure_reason)
    session.flush()
    return row


def total_backoff(attempts: int) -> timedelta:
    """Return the sum of the delays before the first ``attempts`` retries."""
    delays = (min(BACKOFF_BASE * 2**n, BACKOFF_CAP) for n in range(attempts))
    return sum(delays, timedelta())


def mark_retry(
    session: Session,
    notice_id: int,
    reason: str,
    now: datetime | None = None,
    *,
    claim: Claim | None,
) -> Notification:
    """Queue the notice again after an exponential backoff, or fail it once past the window.

    The n-th retry waits ``BACKOFF_BASE * 2**n`` (at most ``BACKOFF_CAP``);
    when the delays add up to more than ``RETRY_WINDOW`` (about a day) the row
    is marked failed with ``reason``. Returns the row (flushed). Raises
    LookupError for an unknown id, ClaimLost when ``claim`` no longer holds it.
    """
    row = _required(session, notice_id, claim)
    row.attempts += 1
    if total_backoff(row.attempts) > RETRY_WINDOW:
        return _fail(session, row, reason)
    delay = min(BACKOFF_BASE * 2 ** (row.attempts - 1), BACKOFF_CAP)
    row.status = QUEUED
    row.next_attempt_at = (now or utcnow()) + delay
    row.failure_reason = reason[:MAX_REASON]
    row.claimed_by = row.claimed_at = None
    session.flush()
    return row


def mark_cancelled(session: Session, notice_id: int, *, claim: Claim | None) -> Notification:
    """Drop the notice unsent (its message was revoked or expired): URL erased; flushes.

    Not audited here: the revocation or expiry that caused it is. Raises
    LookupError for an unknown id, ClaimLost when ``claim`` no longer holds it.
    """
    row = _required(session, notice_id, claim)
    row.status = NoticeStatus.CANCELLED.value
    row.payload_sealed = None
    session.flush()
    return row
