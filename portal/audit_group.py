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

import os
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import TimeoutError as PoolTimeout

from portal.database import make_engine
from portal.models import AuditEvent

APPENDER = "audit_appender"  # the Session.info key of the app's appender (or None)
MAX_BATCH = 200  # events in one transaction; the rest wait for the next
WAIT_SECONDS = 40.0  # past SQLite's 30 s busy timeout: an answer is always had first
# The writer's own wait for the head, bounded as SQLite's busy timeout bounds it (a
# PostgreSQL row lock waits for ever by default): then the batch fails, and says so.
LOCK_TIMEOUT_MS = 30_000


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
        self._pid = os.getpid()

    def append(self, audit_event: AuditEvent) -> None:
        """Chain ``audit_event`` after the head and commit it; return once it is durable.

        Raises what the database raised for the transaction that held it (every event
        of that transaction fails with it: none was committed), AppendTimeout when no
        answer came in time (the event may still be committed later: a view recorded
        that was not shown, never the other way round).
        """
        mine = _Waiting(audit_event)
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's queue is not its own
                self._forked()
            self._queued.append(mine)
            if not self._writing:
                self._writing = mine.lead = True
        if not mine.lead and not mine.done.wait(self._wait):
            with self._lock:
                if not mine.lead:  # never handed the turn: no one waits for it
                    if mine in self._queued:
                        self._queued.remove(mine)
                    raise AppendTimeout("the audit trail did not answer in time")
        if mine.lead:
            self._write_queued()
        if mine.error is not None:
            raise mine.error

    def queued(self) -> int:
        """How many events wait for a turn now (not counting the batch being written)."""
        return len(self._queued)

    def engine(self) -> Engine:
        """The engine the appender writes with in this process (made on first use)."""
        with self._lock:
            if self._pid != os.getpid():
                self._forked()
            if self._engine is None:
                self._engine = make_engine(
                    self._url, pool_size=1, max_overflow=0, **_bounded_waits(self._url)
                )
            return self._engine

    def stop(self) -> None:
        """Close the appender's connection (the next event opens one); raises nothing."""
        if self._engine is not None and self._pid == os.getpid():
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
        except BaseException as error:  # each caller raises it; nothing was committed
            for waiting in batch:
                waiting.error = error
                waiting.done.set()
            self.stop()  # a connection that failed may be dead: the next batch opens one
            if not isinstance(error, Exception):
                raise
            return
        for waiting in batch:
            waiting.done.set()

    def _forked(self) -> None:
        """Forget the parent's queue and engine (its connection is the parent's)."""
        self._pid, self._queued, self._writing, self._engine = os.getpid(), deque(), False, None


def _bounded_waits(url: str) -> dict[str, Any]:
    """``create_engine``'s arguments for the lock timeout (kept beside the URL's own
    ``options``, such as a search path)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return {}
    given = parsed.query.get("options", "")
    options = " ".join([*([given] if isinstance(given, str) else given), ""]).strip()
    return {"connect_args": {"options": f"{options} -c lock_timeout={LOCK_TIMEOUT_MS}".strip()}}


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
