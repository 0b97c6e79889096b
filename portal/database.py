"""The database: declarative base with a stable naming convention, engine and session."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

from flask import current_app
from flask.ctx import AppContext
from flask.globals import app_ctx
from sqlalchemy import CursorResult, DateTime, Engine, MetaData, Result, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Session, scoped_session, sessionmaker
from sqlalchemy.types import TypeDecorator
from werkzeug.local import LocalProxy

# Alembic autogenerate compares constraint names; a convention keeps them stable
# across SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Base of every model."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


_clock_offset = timedelta(0)


def utcnow() -> datetime:
    """Return the current time, timezone-aware UTC (shifted by :func:`travel` in tests)."""
    return datetime.now(UTC) + _clock_offset


def travel(delta: timedelta | None) -> None:
    """Move the clock by ``delta`` (None: back to real time). For tests of expiry."""
    global _clock_offset  # the one clock every expiry reads
    _clock_offset = delta or timedelta(0)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always returned timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: timestamps must be timezone-aware UTC")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Return an engine for ``url``; SQLite gets foreign keys, WAL and a busy timeout."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def pool_for_threads(url: str, threads: int) -> dict[str, Any]:
    """Return ``create_engine``'s pool arguments for a process that serves ``threads``
    requests at once: one pooled connection per thread, and never more.

    A request holds one connection at a time (its ORM session's; the session store's short
    transactions run before the view and after the commit), so no thread ever waits for
    another's connection, and workers x (threads + 1) bounds what one node opens on
    PostgreSQL: the one more is each worker's audit group appender's (portal.audit_group).
    In-memory SQLite keeps SQLAlchemy's single-connection pool (it takes no size).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        return {}
    return {"pool_size": threads, "max_overflow": 0}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA busy_timeout = 30000")
    cursor.close()


def rowcount(result: Result[Any]) -> int:
    """Return how many rows the UPDATE or DELETE that produced ``result`` matched.

    ``Session.execute`` is typed to return ``Result``; for DML it returns the
    ``CursorResult`` that carries ``rowcount``. Raises TypeError for any other result.
    """
    if not isinstance(result, CursorResult):
        raise TypeError("rowcount needs the result of an UPDATE or DELETE")
    return result.rowcount


class _AppSessionMaker(sessionmaker[Session]):
    """Make Sessions bound to the current app's engine (chosen per call, not at import)."""

    def __call__(self, **local_kw: Any) -> Session:
        local_kw.setdefault("bind", current_app.extensions["engine"])
        local_kw.setdefault("info", current_app.extensions.get("session_info"))
        return super().__call__(**local_kw)


class Database:
    """Per-app engine and a session scoped to the current app context.

    Unbound until :meth:`init_app` (flaskr's pattern), so one process can hold
    several apps, each on its own database (the tests run SQLite and PostgreSQL).
    """

    def __init__(self) -> None:
        self._scoped: scoped_session[Session] = scoped_session(
            _AppSessionMaker(expire_on_commit=False), scopefunc=_app_context_id
        )

    @property
    def session(self) -> Session:
        """Return the proxy to the current app context's Session (one per context).

        Typed as ``Session``, which services take: ``scoped_session`` proxies the whole
        public interface of ``Session``. It stays the proxy, not ``self._scoped()``: a
        streamed body's generator outlives its app context (``stream_with_context``
        pushes a new one), and must reach that context's session, which teardown closes.
        The proxy lacks a few Session members (in_transaction, get_transaction,
        in_nested_transaction, get_nested_transaction, invalidate, prepare, bind_mapper,
        bind_table, enable_relationship_loading): use the methods below, never those.
        """
        return cast(Session, self._scoped)

    def has_session(self) -> bool:
        """Return whether the current app context has begun a Session (without starting one)."""
        return self._scoped.registry.has()

    def in_transaction(self) -> bool:
        """Return whether the current app context's Session has a transaction open."""
        return self.has_session() and self._scoped().in_transaction()

    @property
    def engine(self) -> Engine:
        """Return the current app's engine."""
        engine: Engine = current_app.extensions["engine"]
        return engine

    def init_app(self, app: Any) -> None:
        """Create the engine from ``app.config['DATABASE_URL']``, its pool sized for
        ``WEB_THREADS`` (:func:`pool_for_threads`), and the audit trail's group appender
        (``portal.audit_group``); remove sessions at teardown."""
        from portal import audit_group  # it makes its engine here

        url = app.config["DATABASE_URL"]
        threads = int(app.config.get("WEB_THREADS") or 1)
        engine = make_engine(url, **pool_for_threads(url, threads))
        app.extensions["engine"] = engine
        # What each of the app's sessions starts with in its info: the audit trail's group
        # appender (for requests that only read PHI: audit.record_read).
        app.extensions["session_info"] = {audit_group.APPENDER: audit_group.for_engine(engine)}
        app.teardown_appcontext(self._remove)

    def _remove(self, _exc: BaseException | None) -> None:
        # Blobs written by a request that died before its commit: an explicit rollback
        # (close alone does not run after_soft_rollback listeners) deletes them.
        if self._scoped.registry.has() and self._scoped.info.get("new_blobs"):
            self._scoped.rollback()
        self._scoped.remove()


def _app_context_id() -> int:
    # Flask types ``app_ctx`` as the AppContext it proxies; it is a werkzeug LocalProxy.
    return id(cast("LocalProxy[AppContext]", app_ctx)._get_current_object())
