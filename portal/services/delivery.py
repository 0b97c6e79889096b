"""Is notice delivery delayed? Read from the notifier workers' heartbeats (notifier_workers).

The notifier writes them (notifier.health); this module only reads, so the
staff pages can say "delivery delayed" while a live worker cannot use the
mail relay (a wrong CA file, a refused login, a relay without STARTTLS, the
relay down). Such notices stay queued with their links and go out once the
cause is fixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from portal.database import utcnow
from portal.models import NotifierWorker
from portal.models.notifications import NoticeStatus, Notification

# pass_delayed of a pass that found the SQLite send lock held by another worker (a standby).
STANDBY = -1

# A worker writes its heartbeat at least this often while it waits, and at every lease
# renewal while it sends (a third of its lease, plus at most one send, apart).
HEARTBEAT_SECONDS = 30


def stale_after(lease_seconds: int) -> timedelta:
    """Return how long after its last heartbeat a worker with this lease counts as gone."""
    return timedelta(seconds=2 * max(lease_seconds, HEARTBEAT_SECONDS))


def is_live(worker: NotifierWorker, now: datetime) -> bool:
    """Return True when ``worker`` wrote a heartbeat recently enough to be running."""
    return worker.beat_at > now - stale_after(worker.lease_seconds)


def is_standby(worker: NotifierWorker) -> bool:
    """Return True when ``worker``'s last pass found another worker holding the SQLite send
    lock (notifier.lease.send_lock): it claimed nothing and used no relay."""
    return worker.pass_delayed == STANDBY


def error_current(worker: NotifierWorker) -> bool:
    """Return True when ``worker``'s last transport error came after it last used the relay
    and the worker still sends: a standby's error is from before it stood by, and whether the
    relay works now is for the worker that sends to say."""
    if worker.transport_error_at is None or is_standby(worker):
        return False
    return worker.transport_ok_at is None or worker.transport_error_at > worker.transport_ok_at


def nobody_sending(
    workers: Sequence[NotifierWorker], oldest_due_at: datetime | None, now: datetime
) -> bool:
    """Return True when live workers exist, every one of them is a standby, and a notice
    has been due for longer than a worker may stay silent: the SQLite send lock is held by
    a process that does not send (stopped, hung, or not a notifier at all)."""
    live = [w for w in workers if is_live(w, now)]
    if not live or not all(is_standby(w) for w in live) or oldest_due_at is None:
        return False
    patience = max(stale_after(w.lease_seconds) for w in live)
    return oldest_due_at < now - patience


def delayed(session: Session, now: datetime | None = None) -> bool:
    """Return True when a live notifier worker cannot use the mail relay right now, or when
    every live worker stands by while notices wait (:func:`nobody_sending`)."""
    now = now or utcnow()
    workers = list(session.scalars(select(NotifierWorker)))
    if any(is_live(w, now) and error_current(w) for w in workers):
        return True
    live = [w for w in workers if is_live(w, now)]
    if not live or not all(is_standby(w) for w in live):
        return False
    oldest = session.scalar(
        select(func.min(Notification.next_attempt_at)).where(
            Notification.status == NoticeStatus.QUEUED, Notification.next_attempt_at <= now
        )
    )
    return nobody_sending(workers, oldest, now)
