"""Group commit of the audit trail for requests that only read: many requests' events
appended under one hold of the trail's head and made durable by one commit.

Every audited request appends to one hash chain, so appends queue for its head (a row
lock on PostgreSQL, the database's write lock on SQLite) and each holds it through its own
commit, a disk flush. A request that changes nothing but records that it showed PHI (the
patient's inbox) does not need its event in a transaction of its own: it hands the event
to this process's appender and waits until it is committed, so the page is still never
sent before its event is durable.

The appender is a leader/follower queue, as databases do group commit: a caller that finds
no one writing writes at once, on its own thread, its own event alone (no hand-off, no
wait); callers that come meanwhile queue, and when the writer is done it hands the turn to
the first of them, which writes everything queued by then in one transaction. So eight
readers at once cost two head updates and two flushes instead of eight in a row, and no
thread of a process waits in SQLite's busy handler for another of the same process (it
sleeps there, in naps of up to 100 ms, rather than queueing: README "Inbox"). Between
worker processes on SQLite that busy handler still decides (a file lock to queue the
workers' appenders in the kernel was measured slower: README "Inbox"). The writes use a
connection of the appender's own, never one a request holds.

A request whose own transaction has written anything (or holds the head) must not wait
for the appender, which would wait for that request's locks: ``audit.record_read`` falls
back to appending in the request's transaction then. One appender per app; after a fork
the child starts with an empty queue and a connection of its own.
"""

from __future__ import annotations

import copy
import os
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.exc import TimeoutError as PoolTimeout

from portal.database import make_engine
from portal.models import AuditEvent

APPENDER = "audit_appender"  # the Session.info key of the app's appender (or None)
MAX_BATCH = 200  # events in one transaction; the rest wait for the next
# A queued caller's wait for its answer. Past the 30 s a writer may wait on the head
# (SQLite's busy timeout, LOCK_TIMEOUT_MS on PostgreSQL), but a caller queued behind two
# slow batches can still give up first: its event may then be committed after it
# answered 503 (recorded, not shown: never the other way round).
WAIT_SECONDS = 40.0
# The writer's own wait for the head, bounded as SQLite's busy timeout bounds it (a
# PostgreSQL row lock waits for ever by default): then the batch fails with AppendTimeout.
LOCK_TIMEOUT_MS = 30_000
LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE for a lock timeout


@dataclass
class _Waiting:
    """One caller's event and its answer: written (``error`` None), failed, or ``lead``:
    the caller's turn to write what is queued."""

    event: AuditEvent
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    lead: bool = False


class AppendTimeout(PoolTimeout):
    """The appender did not answer within its wait (a 503, as a pool timeout is)."""


class GroupAppender:
    """Appends events for callers that wait (module doc). Thread-safe."""

    def __init__(self, url: str, *, wait: float = WAIT_SECONDS) -> None:
        """Append on the database at ``url`` (a connection of the appender's own)."""
        self._url = url
        self._wait = wait
        self._lock = threading.Lock()
        self._queued: deque[_Waiting] = deque()
        self._writing = False  # a caller is writing a batch (the leader)
        self._engine: Engine | None = None
        me = weakref.ref(self)  # the hook must not keep every app's appender alive
        os.register_at_fork(after_in_child=lambda: _forked(me))

    def append(self, audit_event: AuditEvent) -> None:
        """Chain ``audit_event`` after the head and commit it; return once it is durable.

        Raises what the database raised for the transaction that held it (every event
        of that transaction fails with it: none was committed), AppendTimeout when no
        answer came in time (the event may still be committed later: a view recorded
        that was not shown, never the other way round).
        """
        mine = _Waiting(audit_event)
        with self._lock:
            self._queued.append(mine)
            if not self._writing:
                self._writing = mine.lead = True
        if not mine.lead:
            try:
                answered = mine.done.wait(self._wait)
            except BaseException:  # interrupted while queued: the queue must go on
                if not self._leave(mine):
                    self._write_queued()  # handed the turn meanwhile: take it, then go
                raise
            if not answered and self._leave(mine):
                raise AppendTimeout("the audit trail did not answer in time")
        if mine.lead:
            self._write_queued()
        if mine.error is not None:
            raise _fresh(mine.error)

    def _leave(self, mine: _Waiting) -> bool:
        """Take ``mine`` out of the queue for a caller that stops waiting; return True.
        False when it was handed the turn meanwhile (it must write after all)."""
        with self._lock:
            if mine.lead:
                return False
            if mine in self._queued:  # else it is in the batch being written
                self._queued.remove(mine)
            return True

    def queued(self) -> int:
        """How many events wait for a turn now (not counting the batch being written)."""
        return len(self._queued)

    def engine(self) -> Engine:
        """The engine the appender writes with in this process (made on first use)."""
        with self._lock:
            if self._engine is None:
                self._engine = make_engine(self._url, pool_size=1, max_overflow=0)
                if self._engine.dialect.name == "postgresql":
                    event.listen(self._engine, "connect", _bound_lock_waits)
            return self._engine

    def stop(self) -> None:
        """Close the appender's connection (the next event opens one); raises nothing."""
        if self._engine is not None:
            self._engine.dispose()

    def _write_queued(self) -> None:
        """The leader's turn: write what is queued (its own event first), then hand the
        turn to the first caller queued meanwhile, or end it."""
        with self._lock:
            batch = [self._queued.popleft() for _ in range(min(MAX_BATCH, len(self._queued)))]
        try:
            self._write(batch)
        finally:
            with self._lock:
                if self._queued:
                    following = self._queued[0]
                    following.lead = True
                    following.done.set()
                else:
                    self._writing = False

    def _write(self, batch: list[_Waiting]) -> None:
        from portal.audit import append_events  # audit imports this module

        try:
            with self.engine().begin() as connection:
                append_events(connection, [waiting.event for waiting in batch])
        except BaseException as error:  # each caller raises a copy; nothing was committed
            failure: BaseException = error
            if getattr(getattr(error, "orig", None), "sqlstate", None) == LOCK_NOT_AVAILABLE:
                failure = AppendTimeout("the audit trail's head stayed locked")
                failure.__cause__ = error
            for waiting in batch:
                waiting.error = failure
                waiting.done.set()
            self.stop()  # a connection that failed may be dead: the next batch opens one
            if not isinstance(error, Exception):
                raise
            return
        for waiting in batch:
            waiting.done.set()


def _forked(appender: weakref.ref[GroupAppender]) -> None:
    """In a forked child: forget the parent's queue, lock and engine (its connection is the
    parent's, and its lock may have been held by a thread that is not in the child)."""
    found = appender()
    if found is not None:
        found._lock = threading.Lock()
        found._queued, found._writing, found._engine = deque(), False, None


def _fresh(error: BaseException) -> BaseException:
    """A copy of ``error`` for one caller (each raise adds to an exception's traceback, and
    the callers of a batch raise on threads of their own), caused by the original."""
    try:
        copied = copy.copy(error)
    except Exception:  # an exception that cannot be copied: raised as it is
        return error
    copied.__cause__ = error.__cause__ or error
    return copied


def _bound_lock_waits(dbapi_connection: Any, _record: object) -> None:
    """The appender's PostgreSQL connections wait at most LOCK_TIMEOUT_MS for a lock (a
    session setting: the URL's and PGOPTIONS's own options, a search path, stay)."""
    cursor = dbapi_connection.cursor()
    cursor.execute(f"SET lock_timeout = {int(LOCK_TIMEOUT_MS)}")
    cursor.close()
    dbapi_connection.commit()


def for_engine(engine: Engine) -> GroupAppender | None:
    """An appender on ``engine``'s database, its connection closed when ``engine`` is
    disposed; None for an in-memory SQLite database, which a second connection would not
    share."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        return None
    appender = GroupAppender(url.render_as_string(hide_password=False))
    event.listen(engine, "engine_disposed", lambda _engine: appender.stop())
    return appender
