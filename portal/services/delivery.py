"""Is notice delivery delayed? Read from the notifier workers' heartbeats (notifier_workers).

The notifier writes them (notifier.health); this module only reads, so the
staff pages can say "delivery delayed" while a live worker cannot use the
mail relay (a wrong CA file, a refused login, a relay without STARTTLS, the
relay down). Such notices stay queued with their links and go out once the
cause is fixed.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from portal.database import utcnow
from portal.models import NotifierWorker

# A worker writes its heartbeat at least this often while it waits, and at every lease
# renewal while it sends (a third of its lease, plus at most one send, apart).
HEARTBEAT_SECONDS = 30


def stale_after(lease_seconds: int) -> timedelta:
    """Return how long after its last heartbeat a worker with this lease counts as gone."""
    return timedelta(seconds=2 * max(lease_seconds, HEARTBEAT_SECONDS))


def is_live(worker: NotifierWorker, now: datetime) -> bool:
    """Return True when ``worker`` wrote a heartbeat recently enough to be running."""
    return worker.beat_at > now - stale_after(worker.lease_seconds)


def error_current(worker: NotifierWorker) -> bool:
    """Return True when ``worker``'s last transport error came after it last used the relay."""
    if worker.transport_error_at is None:
        return False
    return worker.transport_ok_at is None or worker.transport_error_at > worker.transport_ok_at


def delayed(session: Session, now: datetime | None = None) -> bool:
    """Return True when a live notifier worker cannot use the mail relay right now."""
    now = now or utcnow()
    workers = session.scalars(
        select(NotifierWorker).where(NotifierWorker.transport_error_at.is_not(None))
    )
    return any(is_live(w, now) and error_current(w) for w in workers)
