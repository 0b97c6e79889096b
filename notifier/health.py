"""The notifier's health: heartbeats written by ``notifier run``, read by ``notifier status``.

Each worker keeps one row of ``notifier_workers`` (portal.models.NotifierWorker):
its heartbeat, its last pass and its last transport error. The write functions
flush only (the worker commits them in ``worker.job``). :func:`report` reads
them with the queue (depth, oldest due notice) into a :class:`Report`, shown
as text by ``notifier status`` and as JSON by the health endpoint
(notifier.health_server). Nothing here names a person: ids, counts, reasons
and times only.

On SQLite one worker sends at a time (notifier.lease.send_lock); a worker whose
last pass found the send lock taken is a *standby*, shown as such and not as a
fault. Its pass is recorded with ``pass_delayed`` = :data:`STANDBY` (the table
has no column of its own for it).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from flask import Flask
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from notifier.smtp import TransportFault, transport_advice
from portal.database import rowcount
from portal.extensions import db
from portal.models import Notification, NotifierWorker
from portal.models.notifications import NoticeStatus
from portal.services import delivery

FORGET_AFTER = timedelta(days=7)  # a worker silent this long is gone: its row is dropped
STANDBY = delivery.STANDBY  # pass_delayed of a pass that found the send lock held elsewhere


def _upsert(
    session: Session, worker_id: str, now: datetime, lease_seconds: int, values: dict[str, Any]
) -> None:
    """Update this worker's row (its heartbeat now), inserting it the first time; flushes."""
    values = {
        "host": socket.gethostname()[:255],
        "pid": os.getpid(),
        "lease_seconds": lease_seconds,
        "beat_at": now,
        **values,
    }
    result = session.execute(
        update(NotifierWorker).where(NotifierWorker.worker_id == worker_id).values(values)
    )
    if rowcount(result) == 0:
        values.setdefault("started_at", now)
        counts = {"pass_sent": 0, "pass_failed": 0, "pass_retrying": 0, "pass_delayed": 0}
        session.execute(insert(NotifierWorker).values({**counts, **values, "worker_id": worker_id}))
    session.flush()


def register(session: Session, worker_id: str, now: datetime, lease_seconds: int) -> None:
    """Record that ``worker_id`` started now (this host and process), and forget workers
    silent for FORGET_AFTER (default ids are host:pid: one row per run); flushes."""
    session.execute(delete(NotifierWorker).where(NotifierWorker.beat_at < now - FORGET_AFTER))
    _upsert(session, worker_id, now, lease_seconds, {"started_at": now})


def beat(session: Session, worker_id: str, now: datetime, lease_seconds: int) -> None:
    """Write ``worker_id``'s heartbeat: it is alive at ``now``; flushes."""
    _upsert(session, worker_id, now, lease_seconds, {})


@dataclass(frozen=True)
class PassResult:
    """What one pass did, as the heartbeat records it."""

    sent: int
    failed: int
    retrying: int
    delayed: int
    transport_error: TransportFault | None
    reached_relay: bool  # a connection was opened and used without a transport fault
    standby: bool = False  # another worker held the SQLite send lock: nothing claimed


def record_pass(
    session: Session, worker_id: str, now: datetime, lease_seconds: int, result: PassResult
) -> None:
    """Record the end of a pass: its counts, and the relay's state if the pass learned it."""
    values: dict[str, Any] = {
        "pass_at": now,
        "pass_sent": result.sent,
        "pass_failed": result.failed,
        "pass_retrying": result.retrying,
        "pass_delayed": STANDBY if result.standby else result.delayed,
    }
    # A standby used no relay: what its row says of the relay stays as it was (and is not
    # read while it stands by: portal.services.delivery.error_current).
    if result.transport_error is not None and not result.standby:
        values.update(transport_error=result.transport_error.reason[:64], transport_error_at=now)
    elif result.reached_relay and not result.standby:
        values["transport_ok_at"] = now
    _upsert(session, worker_id, now, lease_seconds, values)


def relay_ok(session: Session, worker_id: str, now: datetime, lease_seconds: int) -> None:
    """Record that the relay took a connection again at ``now`` (clears a current transport
    error at once, not only when the queue has drained); flushes."""
    _upsert(session, worker_id, now, lease_seconds, {"transport_ok_at": now})


# -- reading ------------------------------------------------------------------------------


def error_stored(session: Session, worker_id: str) -> bool:
    """Whether ``worker_id``'s row shows a transport error that is still current (not
    cleared by a later use of the relay): the worker then probes the relay, so a fixed
    setting is seen as fixed even when no notice is due."""
    row = session.get(NotifierWorker, worker_id, populate_existing=True)
    return row is not None and delivery.error_current(row)


@dataclass(frozen=True)
class WorkerState:
    """One worker as ``notifier status`` shows it."""

    row: NotifierWorker
    live: bool
    error_current: bool

    @property
    def standby(self) -> bool:
        """True when its last pass found another worker sending (SQLite): a hot standby."""
        return delivery.is_standby(self.row)

    def problems(self) -> list[str]:
        """What is wrong with this worker, PHI-free, one line each (empty: healthy)."""
        name = self.row.worker_id
        if not self.live:
            return [f"worker {name}: no heartbeat since {_when(self.row.beat_at)}"]
        if self.error_current and self.row.transport_error:
            return [f"worker {name}: {describe_transport_error(self.row.transport_error)}"]
        return []

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields of the worker."""
        row = self.row
        return {
            "worker_id": row.worker_id,
            "host": row.host,
            "pid": row.pid,
            "live": self.live,
            "started_at": _iso(row.started_at),
            "last_beat_at": _iso(row.beat_at),
            "last_pass_at": _iso(row.pass_at),
            "standby": self.standby,
            "last_pass": {
                "sent": row.pass_sent,
                "failed": row.pass_failed,
                "retrying": row.pass_retrying,
                "delayed": max(row.pass_delayed, 0),
            },
            "transport_error": _transport(row, self.error_current),
        }


def describe_transport_error(reason: str) -> str:
    """``reason`` with what it means and the setting to check (notifier.smtp's table)."""
    setting, advice = transport_advice(reason)
    return f"cannot use the mail relay ({reason}: {advice}); check {setting}"


@dataclass(frozen=True)
class QueueState:
    """The outbox as ``notifier status`` shows it."""

    queued: int  # waiting, due or not
    due: int  # waiting and due now
    sending: int  # claimed by a worker
    oldest_due_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields of the queue."""
        return {
            "queued": self.queued,
            "due": self.due,
            "sending": self.sending,
            "oldest_due_at": _iso(self.oldest_due_at),
        }


NOBODY_SENDING = (
    "no worker is sending: every live worker stands by while notices wait, so the SQLite"
    " send lock is held by a process that does not send (stopped or hung?); see notifier"
    " status and the holder of <database file>.notifier.lock"
)

DATABASE_PROBLEMS = {
    "unreachable": "database unreachable",
    "unusable": "database unusable (is its schema up to date? run portal db upgrade)",
}


@dataclass(frozen=True)
class Report:
    """The notifier's health at ``checked_at``: ``database`` is "ok", "unreachable" or
    "unusable" (reachable, but the queries failed: a missing table, say)."""

    checked_at: datetime
    database: str
    queue: QueueState | None = None
    workers: tuple[WorkerState, ...] = ()

    def problems(self, worker_id: str | None = None) -> list[str]:
        """What is wrong (empty: healthy): of every worker, or of ``worker_id`` only.

        Unhealthy: the database is unreachable, no worker is live (or ``worker_id``
        is not), a live worker's last transport error is current, or every live worker
        stands by while notices wait (:data:`NOBODY_SENDING`).
        """
        if self.database != "ok":
            return [DATABASE_PROBLEMS.get(self.database, f"database {self.database}")]
        if worker_id is not None:
            mine = [w for w in self.workers if w.row.worker_id == worker_id]
            if not mine:
                return [f"worker {worker_id}: no heartbeat yet"]
            return mine[0].problems()
        live = [w for w in self.workers if w.live]
        if not live:
            return ["no notifier worker is running (no recent heartbeat)"]
        found = [problem for w in live for problem in w.problems()]
        oldest = self.queue.oldest_due_at if self.queue is not None else None
        if delivery.nobody_sending([w.row for w in self.workers], oldest, self.checked_at):
            found.append(NOBODY_SENDING)
        return found

    def last_transport_error(self) -> dict[str, Any] | None:
        """The most recent transport error any worker saw (current or not), or None."""
        seen = [w for w in self.workers if w.row.transport_error_at is not None]
        if not seen:
            return None
        latest = max(seen, key=lambda w: w.row.transport_error_at or w.row.beat_at)
        found = _transport(latest.row, latest.error_current)
        return None if found is None else {"worker_id": latest.row.worker_id, **found}

    def as_dict(self, worker_id: str | None = None) -> dict[str, Any]:
        """JSON-ready report; ``healthy`` and ``problems`` judge ``worker_id`` if given."""
        problems = self.problems(worker_id)
        found: dict[str, Any] = {
            "healthy": not problems,
            "problems": problems,
            "checked_at": _iso(self.checked_at),
            "database": self.database,
        }
        if worker_id is not None:
            found["worker_id"] = worker_id
        if self.queue is not None:
            found["queue"] = self.queue.as_dict()
            found["workers"] = [w.as_dict() for w in self.workers]
            found["last_transport_error"] = self.last_transport_error()
        return found


def report(session: Session, now: datetime) -> Report:
    """Read the queue and every worker's heartbeat at ``now``. Raises the database's error."""
    counts = dict(
        session.execute(
            select(Notification.status, func.count())
            .where(Notification.status.in_([NoticeStatus.QUEUED, NoticeStatus.SENDING]))
            .group_by(Notification.status)
        ).all()
    )
    due = select(func.count(), func.min(Notification.next_attempt_at)).where(
        Notification.status == NoticeStatus.QUEUED, Notification.next_attempt_at <= now
    )
    due_count, oldest = session.execute(due).one()
    queue = QueueState(
        queued=int(counts.get(NoticeStatus.QUEUED, 0)),
        due=int(due_count),
        sending=int(counts.get(NoticeStatus.SENDING, 0)),
        oldest_due_at=oldest,
    )
    rows = list(session.scalars(select(NotifierWorker).order_by(NotifierWorker.worker_id)))
    for row in rows:
        session.expunge(row)  # a snapshot: the report outlives the transaction
    workers = tuple(
        WorkerState(row, delivery.is_live(row, now), delivery.error_current(row)) for row in rows
    )
    return Report(now, "ok", queue, workers)


def read(app: Flask, now: datetime) -> Report:
    """:func:`report` in its own app context; a database error is reported, not raised
    (its text would quote the statement: only the kind of failure is kept)."""
    try:
        with app.app_context():
            try:
                return report(db.session, now)
            finally:
                db.session.rollback()  # read only: end the transaction
    except (OperationalError, InterfaceError):
        return Report(now, "unreachable")
    except DBAPIError:
        return Report(now, "unusable")


def render_text(found: Report) -> str:
    """``found`` as the lines ``notifier status`` prints."""
    lines = [f"checked at {_when(found.checked_at)}; database {found.database}"]
    if found.queue is not None:
        q = found.queue
        oldest = _when(q.oldest_due_at) if q.oldest_due_at else "none"
        lines.append(
            f"queue: {q.queued} queued ({q.due} due, oldest due {oldest}), {q.sending} sending"
        )
        lines += [_worker_line(w) for w in found.workers] or ["workers: none has reported"]
        last = found.last_transport_error()
        if last is not None:
            state = "current" if last["current"] else "cleared"
            lines.append(
                f"last transport error: {last['reason']} at {last['at']} on "
                f"{last['worker_id']} ({state}); check {last['setting']}"
            )
    problems = found.problems()
    lines.append("healthy" if not problems else "UNHEALTHY: " + "; ".join(problems))
    return "\n".join(lines)


def _worker_line(state: WorkerState) -> str:
    row = state.row
    alive = "live" if state.live else "STALE"
    last = (
        f"last pass {_when(row.pass_at)}: sent {row.pass_sent}, failed {row.pass_failed}, "
        f"retrying {row.pass_retrying}, delayed {row.pass_delayed}"
        if row.pass_at
        else "no pass yet"
    )
    if state.standby:
        last = f"standby since {_when(row.pass_at)} (another worker holds the SQLite send lock)"
    relay = "relay ok"
    if state.error_current and row.transport_error:
        relay = f"relay unusable ({row.transport_error})"
    return f"worker {row.worker_id} ({alive}, heartbeat {_when(row.beat_at)}): {last}; {relay}"


def _transport(row: NotifierWorker, current: bool) -> dict[str, Any] | None:
    if row.transport_error is None:
        return None
    setting, advice = transport_advice(row.transport_error)
    return {
        "reason": row.transport_error,
        "at": _iso(row.transport_error_at),
        "current": current,
        "setting": setting,
        "advice": advice,
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") if moment is not None else None


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment is not None else "never"
