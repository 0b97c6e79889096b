"""Database outages: one WARNING when one starts, one INFO when it ends, not a stack per request.

Any request that meets an outage answers 503 with ``Retry-After``
(``portal.web.errors``). The outage is over at the first statement that
succeeds after ``QUIET_SECONDS`` without a failure, so a database that fails
some statements and not others (SQLite on a full disk still reads) stays one
outage instead of a start and an end per request.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

log = logging.getLogger("portal.outage")
QUIET_SECONDS = 30.0  # no failure for this long, then a success, ends an outage
RETRY_AFTER_SECONDS = 30

# The exception classes an outage arrives as; is_outage() tells an outage from a bug that
# shares the class (ProgrammingError, IntegrityError are never outages).
DATABASE_DOWN: tuple[type[Exception], ...] = (
    OperationalError,
    InterfaceError,
    DisconnectionError,
    PoolTimeout,
    sqlite3.OperationalError,
    psycopg.OperationalError,
)


# SQLite primary result codes that mean "cannot reach or write the file now" (sqlite.org/rescode).
_SQLITE_DOWN = {5, 6, 8, 10, 13, 14}  # BUSY, LOCKED, READONLY, IOERR, FULL, CANTOPEN
# PostgreSQL SQLSTATEs of the same kind: connection exceptions (class 08), insufficient
# resources (53: disk full, out of memory, too many connections), and the server shutting
# down or not yet started (57P01-57P03).
_PG_DOWN_CLASSES = {"08", "53"}
_PG_DOWN_STATES = {"57P01", "57P02", "57P03"}


def is_outage(error: BaseException) -> bool:
    """Return True when ``error`` says the database cannot answer now, not that code is wrong.

    A missing table, a syntax error, a deadlock, a serialization failure or a
    statement timeout share these exception classes, but they are bugs or
    contention to see with their stack (a 500), never a quiet 503.
    """
    if isinstance(error, DisconnectionError | PoolTimeout):
        return True
    if getattr(error, "connection_invalidated", False):
        return True
    cause = getattr(error, "orig", None) or error
    if isinstance(cause, sqlite3.Error):
        return (getattr(cause, "sqlite_errorcode", 0) & 0xFF) in _SQLITE_DOWN
    if isinstance(cause, psycopg.Error):
        state = cause.sqlstate
        if state is None:  # no answer from a server at all: refused, reset, closed
            return isinstance(cause, psycopg.OperationalError | psycopg.InterfaceError)
        return state[:2] in _PG_DOWN_CLASSES or state in _PG_DOWN_STATES
    return False


class Outage:
    """Thread-safe state of one dependency: down since when, last failure, lines logged."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None
        self._last_failure = 0.0

    @property
    def down(self) -> bool:
        """Return whether an outage is in progress."""
        return self._since is not None

    def failed(self, error: BaseException) -> None:
        """Note a failure; log one WARNING if this starts an outage (the type only: no data)."""
        with self._lock:
            now = self._last_failure = self.clock()
            if self._since is not None:
                return
            self._since = now
        log.warning(
            f"{self.name} unavailable: answering 503 until it recovers",
            extra={
                "event": "outage_started",
                "dependency": self.name,
                "exception": type(error).__name__,
            },
        )

    def succeeded(self) -> None:
        """Note a success; log one INFO if it ends an outage (quiet for ``QUIET_SECONDS``)."""
        if self._since is None:  # the common case, without the lock
            return
        with self._lock:
            now = self.clock()
            if self._since is None or now - self._last_failure < QUIET_SECONDS:
                return
            since, self._since = self._since, None
        log.info(
            f"{self.name} available again",
            extra={
                "event": "outage_ended",
                "dependency": self.name,
                "down_seconds": round(now - since, 1),
            },
        )


database = Outage("database")


@event.listens_for(Engine, "after_cursor_execute")
def _statement_succeeded(*_args: Any) -> None:
    database.succeeded()
