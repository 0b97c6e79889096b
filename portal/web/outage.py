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

# "The database cannot answer now": connection refused or lost, pool exhausted, disk full,
# locked. Not programming errors (ProgrammingError, IntegrityError stay 500s).
DATABASE_DOWN: tuple[type[Exception], ...] = (
    OperationalError,
    InterfaceError,
    DisconnectionError,
    PoolTimeout,
    sqlite3.OperationalError,
    psycopg.OperationalError,
)


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
