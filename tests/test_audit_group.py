"""The audit trail's group appender (portal.audit_group) and audit.record_read: a read's
event is committed before the caller goes on, several callers' events share one hold of
the head and one commit, a failure reaches every caller of its batch and commits none, and
a session that has written falls back to its own transaction (no wait for its own locks).
Real SQLite files and PostgreSQL; the head is held from a connection of the test's own."""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import Connection, delete, event, insert, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from portal import audit, audit_group
from portal.audit import Action, Actor, RequestMeta
from portal.audit_group import APPENDER, AppendTimeout, GroupAppender
from portal.database import make_engine
from portal.extensions import db
from portal.models import AuditHead, User

PATIENT = Actor(41, "patient")


def appender_of(app: Flask) -> GroupAppender:
    found = app.extensions["session_info"][APPENDER]
    assert isinstance(found, GroupAppender)
    return found


def read(app: Flask, count: int = 1) -> None:
    """One request's read, as the inbox records it."""
    with app.app_context():
        audit.record_read(
            db.session,
            Action.MESSAGE_LIST,
            actor=PATIENT,
            meta=RequestMeta("198.51.100.7", "test", "req-1"),
            patient_id=PATIENT.id,
            details={"count": count},
        )
        db.session.rollback()  # whatever the request does next, the event stays


def outside(app: Flask, sql: str) -> Any:
    """``sql`` on a connection of its own (not the app's pool, not the appender's)."""
    engine = make_engine(app.config["DATABASE_URL"])
    try:
        with engine.connect() as connection:
            return connection.execute(text(sql)).all()
    finally:
        engine.dispose()


def listed_events(app: Flask) -> list[str]:
    return [row[0] for row in outside(app, "SELECT details FROM audit_events ORDER BY seq")]


@contextmanager
def head_held(app: Flask) -> Iterator[Connection]:
    """The trail's head locked by another writer's open transaction (a row lock on
    PostgreSQL, the write lock on SQLite) until the block ends (rolled back)."""
    engine = make_engine(app.config["DATABASE_URL"])
    try:
        with engine.connect() as connection:
            connection.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=AuditHead.seq))
            try:
                yield connection
            finally:
                connection.rollback()
    finally:
        engine.dispose()


def head_takes(appender: GroupAppender) -> list[str]:
    """A list that grows by one per transaction the appender opens on the head."""
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE AUDIT_HEAD SET SEQ"):
            seen.append(statement)

    event.listen(appender.engine(), "before_cursor_execute", before)
    return seen


def wait_for(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_read_is_committed_when_record_read_returns(app: Flask) -> None:
    read(app, 3)  # the session rolled back at once: the event is the appender's
    assert listed_events(app) == ['{"count":3}']
    with app.app_context():
        assert audit.verify(db.session).ok


def test_readers_waiting_on_the_head_share_one_transaction(app: Flask) -> None:
    appender = appender_of(app)
    takes = head_takes(appender)
    threads = [threading.Thread(target=read, args=(app, n)) for n in range(8)]
    with head_held(app):
        for thread in threads:
            thread.start()
        # The first reader writes at once, its own event alone, and waits on the head; the
        # other seven queue behind it, and the first of them writes all seven.
        wait_for(lambda: appender.queued() == 7 and len(takes) == 1)
        assert listed_events(app) == []  # nothing is shown before its event: all still wait
        assert all(thread.is_alive() for thread in threads)
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(listed_events(app)) == sorted(f'{{"count":{n}}}' for n in range(8))
    assert len(takes) == 2  # one head update for the first, one for the other seven
    with app.app_context():
        assert audit.verify(db.session).ok


def test_a_failed_batch_fails_each_of_its_callers_and_commits_none(app: Flask) -> None:
    """The head row gone (a tampered trail): the readers of that batch get the error, none
    of their events is stored, and the appender works again once the row is back."""
    appender = appender_of(app)
    errors: list[BaseException] = []

    def failing_read(n: int) -> None:
        try:
            read(app, n)
        except Exception as error:  # each caller must see it
            errors.append(error)

    engine = make_engine(app.config["DATABASE_URL"])
    with engine.begin() as connection:
        saved = connection.execute(select(AuditHead.seq, AuditHead.hash)).one()
        connection.execute(delete(AuditHead))
    threads = [threading.Thread(target=failing_read, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(errors) == 4
    assert listed_events(app) == []
    with engine.begin() as connection:
        connection.execute(insert(AuditHead).values(id=1, seq=saved[0], hash=saved[1]))
    engine.dispose()
    read(app, 9)
    assert listed_events(app) == ['{"count":9}']
    assert appender.queued() == 0


def test_a_queued_caller_gives_up_after_its_wait_and_leaves_the_queue(app: Flask) -> None:
    """A reader queued behind a writer that waits on the head is not left waiting past
    its wait: AppendTimeout (a 503 for the web, as a pool timeout is), and its event
    leaves the queue (nothing was shown). The writer's own event is committed once the
    head is free."""
    appender = GroupAppender(app.config["DATABASE_URL"], wait=0.5)
    takes = head_takes(appender)

    def first() -> None:
        with app.app_context():
            db.session.info[APPENDER] = appender
            audit.record_read(db.session, Action.MESSAGE_LIST, actor=PATIENT, details={"n": 1})

    try:
        with head_held(app):
            writer = threading.Thread(target=first)
            writer.start()
            wait_for(lambda: len(takes) == 1)  # the first reader waits on the head
            with app.app_context():
                db.session.info[APPENDER] = appender
                began = time.monotonic()
                with pytest.raises(AppendTimeout):
                    audit.record_read(db.session, Action.MESSAGE_LIST, actor=PATIENT)
                assert time.monotonic() - began < 5
            assert appender.queued() == 0
        writer.join(timeout=60)
        assert listed_events(app) == ['{"n":1}']
        assert len(takes) == 1  # no batch for the one that gave up
    finally:
        appender.stop()


def test_a_session_that_wrote_records_in_its_own_transaction(app: Flask) -> None:
    """After a write the caller's transaction holds locks the appender would wait for (on
    SQLite the whole database): record_read appends in the caller's transaction instead,
    and the event commits, or rolls back, with the change it follows."""
    from tests.browser_client import enrolled_user

    user, _, _ = enrolled_user(app, role="patient", email="pat@example.org", name="Pat Ient")
    before = len(listed_events(app))
    with app.app_context():
        db.session.execute(update(User).where(User.id == user.id).values(failed_signins=1))
        began = time.monotonic()
        audit.record_read(db.session, Action.MESSAGE_LIST, actor=PATIENT)
        assert time.monotonic() - began < 5  # no wait for its own lock
        db.session.rollback()
    assert len(listed_events(app)) == before  # rolled back with the write
    with app.app_context():
        db.session.add(db.session.get(User, user.id))
        db.session.get(User, user.id).failed_signins = 2  # an ORM change, not yet flushed
        audit.record_read(db.session, Action.MESSAGE_LIST, actor=PATIENT)
        db.session.commit()
    assert len(listed_events(app)) == before + 1
    with app.app_context():
        assert audit.verify(db.session).ok


def _orm_update_then_savepoint(session: Any, user_id: int) -> None:
    """A write, then a savepoint released (SQLAlchemy's after_commit fires for it)."""
    session.execute(update(User).where(User.id == user_id).values(failed_signins=1))
    with session.begin_nested():
        session.execute(select(User.id))


def _record_then_savepoint(session: Any, _user_id: int) -> None:
    """An event appended (the head taken), then a savepoint rolled back."""
    audit.record(session, Action.MESSAGE_VIEW, actor=PATIENT)
    nested = session.begin_nested()
    nested.rollback()


def _raw_sql_update(session: Any, user_id: int) -> None:
    session.execute(text(f"UPDATE users SET failed_signins = 1 WHERE id = {int(user_id)}"))


def _connection_level_update(session: Any, user_id: int) -> None:
    session.connection().execute(update(User).where(User.id == user_id).values(failed_signins=1))


def _select_for_update(session: Any, _user_id: int) -> None:
    session.execute(select(AuditHead).with_for_update())  # locks the head on PostgreSQL


@pytest.mark.parametrize(
    "lock",
    [
        _orm_update_then_savepoint,
        _record_then_savepoint,
        _raw_sql_update,
        _connection_level_update,
        pytest.param(_select_for_update, marks=pytest.mark.postgres_only),  # SQLite: no-op
    ],
)
def test_a_transaction_holding_locks_however_taken_records_in_its_own(
    app: Flask, lock: Any
) -> None:
    """Writes and row locks taken any way (raw SQL, on the connection, in or before a
    savepoint, SELECT ... FOR UPDATE) keep record_read in the caller's transaction: it
    neither waits for its own locks nor commits apart from them."""
    from tests.browser_client import enrolled_user

    user, _, _ = enrolled_user(app, role="patient", email="pat@example.org", name="Pat Ient")
    before = len(listed_events(app))
    with app.app_context():
        lock(db.session, user.id)
        began = time.monotonic()
        audit.record_read(db.session, Action.MESSAGE_LIST, actor=PATIENT)
        assert time.monotonic() - began < 5  # no wait for its own lock
        db.session.rollback()
    assert len(listed_events(app)) == before  # rolled back with the transaction
    read(app)  # and the next read, on the same pooled connection, is the appender's again
    assert len(listed_events(app)) == before + 1


def test_without_an_appender_record_read_is_record(app: Flask) -> None:
    """The CLI and in-memory databases have none: the event is in the caller's transaction."""
    with app.app_context():
        db.session.info[APPENDER] = None
        audit.record_read(db.session, Action.MESSAGE_LIST, actor=PATIENT)
        assert listed_events(app) == []  # not committed yet
        db.session.commit()
    assert len(listed_events(app)) == 1


def test_an_in_memory_database_gets_no_appender() -> None:
    engine = make_engine("sqlite://")
    try:
        assert audit_group.for_engine(engine) is None
    finally:
        engine.dispose()


def backend_pid(engine: Any) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _append_in_child(result: Any) -> None:
    try:
        appender = _INHERITED[0]
        appender.append(
            audit._new_event(
                Action.MESSAGE_LIST,
                PATIENT,
                audit.NO_REQUEST,
                audit.Outcome.SUCCESS,
                None,
                None,
                None,
                None,
                {"count": 77},
            )
        )
        result.put(backend_pid(appender.engine()))
    except BaseException as error:  # reported to the parent
        result.put(repr(error))


_INHERITED: list[GroupAppender] = []


@pytest.mark.postgres_only
def test_a_forked_worker_appends_on_a_connection_of_its_own(app: Flask) -> None:
    """Forked with the parent's connection open (a preloaded app): the child must not use
    the parent's connection (one server session for two processes), and its queue and
    lock are its own. The server process behind each connection tells them apart."""
    appender = appender_of(app)
    read(app, 1)
    parents = backend_pid(appender.engine())  # the pooled connection, kept open
    _INHERITED[:] = [appender]
    context = multiprocessing.get_context("fork")
    result = context.Queue()
    child = context.Process(target=_append_in_child, args=(result,))
    child.start()
    child.join(timeout=60)
    childs = result.get(timeout=5)
    assert child.exitcode == 0
    assert isinstance(childs, int), childs
    assert childs != parents
    assert backend_pid(appender.engine()) == parents  # the parent's is still its own
    read(app, 2)
    assert listed_events(app) == ['{"count":1}', '{"count":77}', '{"count":2}']
    with app.app_context():
        assert audit.verify(db.session).ok


def test_an_interrupted_caller_leaves_the_queue_going(app: Flask) -> None:
    """A caller interrupted while queued (a signal's exception) leaves the queue: the
    writer's turn is not handed to it, and the next caller is not left waiting."""
    appender = appender_of(app)
    takes = head_takes(appender)
    writer = threading.Thread(target=read, args=(app, 1))

    def interrupt(*_args: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with head_held(app):
            writer.start()
            wait_for(lambda: len(takes) == 1)
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(KeyboardInterrupt):
                read(app, 2)  # queued behind the writer, interrupted
            assert appender.queued() == 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    writer.join(timeout=60)
    began = time.monotonic()
    read(app, 3)
    assert time.monotonic() - began < 5
    assert listed_events(app) == ['{"count":1}', '{"count":3}']


@pytest.mark.postgres_only
def test_the_appenders_lock_timeout_keeps_the_servers_own_options(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock timeout is set on each new connection, not as libpq's ``options``, which
    would replace PGOPTIONS (here the search path to this test's schema, and a statement
    timeout): the appender must write to the same trail as the app."""
    url = make_url(app.config["DATABASE_URL"])
    options = str(url.query["options"])  # the test database's -csearch_path=<schema>
    monkeypatch.setenv("PGOPTIONS", f"{options} -c statement_timeout=4321")
    appender = GroupAppender(url.difference_update_query(["options"]).render_as_string(False))
    try:
        with appender.engine().connect() as connection:
            shown = {
                name: connection.execute(text(f"SHOW {name}")).scalar_one()
                for name in ("lock_timeout", "statement_timeout", "search_path")
            }
    finally:
        appender.stop()
    schema = options.removeprefix("-c").removeprefix(" ").removeprefix("search_path=")
    assert shown == {"lock_timeout": "30s", "statement_timeout": "4321ms", "search_path": schema}


def test_disposing_the_apps_engine_closes_the_appenders_connection(app: Flask) -> None:
    appender = appender_of(app)
    read(app)
    assert appender.engine().pool.checkedin() == 1  # kept for the next batch
    app.extensions["engine"].dispose()
    assert appender.engine().pool.checkedin() == 0
    read(app)  # and opens one again with the next event
    assert len(listed_events(app)) == 2


def test_a_reader_alone_writes_on_its_own_thread_at_once(app: Flask) -> None:
    """No one else writing: the caller writes its event itself (no thread to hand off to,
    so nothing waits for another thread to be scheduled)."""
    appender = appender_of(app)
    threads: list[str] = []

    def before(*_args: Any) -> None:
        threads.append(threading.current_thread().name)

    event.listen(appender.engine(), "before_cursor_execute", before)
    read(app)
    assert set(threads) == {threading.current_thread().name}
    assert not [t for t in threading.enumerate() if "audit" in t.name]


@pytest.mark.postgres_only
def test_the_writers_own_wait_for_the_head_is_bounded_on_postgresql(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PostgreSQL row lock waits for ever by default; the appender's connection has a lock
    timeout (SQLite's busy timeout bounds it there), so a held head fails the batch with
    AppendTimeout (a 503), caused by the database's error."""
    monkeypatch.setattr(audit_group, "LOCK_TIMEOUT_MS", 300)
    appender = GroupAppender(app.config["DATABASE_URL"])
    try:
        with app.app_context(), head_held(app):
            db.session.info[APPENDER] = appender
            began = time.monotonic()
            with pytest.raises(AppendTimeout) as raised:
                audit.record_read(db.session, Action.MESSAGE_LIST, actor=PATIENT)
            assert isinstance(raised.value.__cause__, OperationalError)
            assert "lock timeout" in str(raised.value.__cause__)
            assert time.monotonic() - began < 10
        assert listed_events(app) == []
    finally:
        appender.stop()
