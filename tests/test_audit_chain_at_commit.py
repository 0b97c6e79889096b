"""audit.chain_at_commit: a session's events are chained at its commit, under one short
hold of the head lock; the chain stays whole, rollbacks and savepoints take their events."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select, text

from portal import audit
from portal.audit import Action, Actor
from portal.extensions import db
from portal.models import AuditEvent, AuditHead

STAFF = Actor(7, "staff")


def record(session: Any, target: str) -> AuditEvent:
    return audit.record(
        session, Action.MESSAGE_VIEW, actor=STAFF, target_type="message", target_id=target
    )


def chain(session: Any) -> list[tuple[int, str | None]]:
    """(seq, target) of every event, in chain order."""
    return list(
        session.execute(select(AuditEvent.seq, AuditEvent.target_id).order_by(AuditEvent.seq))
    )


def head(session: Any) -> tuple[int, str]:
    row = session.execute(select(AuditHead.seq, AuditHead.hash)).one()
    return int(row[0]), str(row[1])


def test_events_are_chained_in_order_when_the_session_commits(app: Flask) -> None:
    with app.app_context():
        session = db.session
        record(session, "before")
        session.commit()
        audit.chain_at_commit(session)
        staged = [record(session, f"m{i}") for i in range(3)]

        assert [event.seq for event in staged] == [None, None, None]  # staged, not chained
        assert chain(session) == [(1, "before")]
        session.commit()

        assert [event.seq for event in staged] == [2, 3, 4]
        assert chain(session) == [(1, "before"), (2, "m0"), (3, "m1"), (4, "m2")]
        assert head(session) == (4, staged[-1].hash)
        assert staged[0].prev_hash == session.scalar(
            select(AuditEvent.hash).where(AuditEvent.seq == 1)
        )
        assert audit.verify(session).ok


def test_a_rollback_drops_the_staged_events(app: Flask) -> None:
    with app.app_context():
        session = db.session
        audit.chain_at_commit(session)
        record(session, "kept")
        session.commit()
        record(session, "undone")
        session.rollback()
        record(session, "next")
        session.commit()

        assert chain(session) == [(1, "kept"), (2, "next")]
        assert audit.verify(session).ok


def test_a_savepoint_takes_its_own_events_with_it(app: Flask) -> None:
    with app.app_context():
        session = db.session
        audit.chain_at_commit(session)
        record(session, "outside")
        savepoint = session.begin_nested()
        record(session, "inside")
        savepoint.rollback()
        kept = session.begin_nested()
        record(session, "inside-kept")
        kept.commit()
        session.commit()

        assert sorted(target for _, target in chain(session)) == ["inside-kept", "outside"]
        assert audit.verify(session).ok


def test_a_savepoint_released_inside_one_rolled_back_loses_no_outer_event(app: Flask) -> None:
    """Regression (issue 13 review): releasing a savepoint fires before_commit too, which
    chained the transaction's staged events inside the outer savepoint; its rollback then
    took them away, though the transaction that recorded them committed."""
    with app.app_context():
        session = db.session
        audit.chain_at_commit(session)
        record(session, "outer")
        rolled_back = session.begin_nested()
        released = session.begin_nested()
        released.commit()
        rolled_back.rollback()
        session.commit()

        assert [target for _, target in chain(session)] == ["outer"]
        assert audit.verify(session).ok


def test_record_returns_the_event_as_stored_without_attaching_it(app: Flask) -> None:
    """The contract of record() since events are inserted by one Core statement: the event
    returned carries the stored seq and hash, and is not in the session."""
    with app.app_context():
        session = db.session
        event = record(session, "m1")
        session.commit()
        assert event not in session
        stored = session.execute(
            select(AuditEvent.seq, AuditEvent.hash).where(AuditEvent.target_id == "m1")
        ).one()
        assert (stored.seq, stored.hash) == (event.seq, event.hash)


def test_a_commit_with_nothing_recorded_leaves_the_head_alone(app: Flask) -> None:
    with app.app_context():
        session = db.session
        audit.chain_at_commit(session)
        record(session, "one")
        session.commit()
        before = head(session)
        session.execute(text("SELECT 1"))
        session.commit()

        assert head(session) == before
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == 1


def test_chained_and_immediate_writers_make_one_chain(app: Flask, backend: str) -> None:
    threads, per_thread = (6, 20) if backend == "postgresql" else (4, 10)
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def writer(number: int) -> None:
        try:
            with app.app_context():
                if number % 2:
                    audit.chain_at_commit(db.session)
                barrier.wait()
                for i in range(per_thread):
                    record(db.session, f"w{number}-{i}a")
                    record(db.session, f"w{number}-{i}b")
                    db.session.commit()
        except BaseException as error:
            errors.append(error)

    pool = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert errors == []
    with app.app_context():
        result = audit.verify(db.session)
        assert result.ok, result.problem
        assert result.count == threads * per_thread * 2
        seqs = {target: seq for seq, target in chain(db.session)}
        # A transaction's events stay together and in the order recorded.
        assert all(seqs[f"w1-{i}b"] == seqs[f"w1-{i}a"] + 1 for i in range(per_thread))


@pytest.mark.postgres_only
def test_a_transaction_that_has_recorded_does_not_hold_the_head_until_it_commits(
    app: Flask,
) -> None:
    """The head lock is taken at commit: a long transaction with staged events does not make
    another writer wait (with immediate chaining the second writer would time out)."""
    with app.app_context():
        audit.chain_at_commit(db.session)
        record(db.session, "long-transaction")  # staged; the transaction stays open
        errors: list[BaseException] = []
        other = threading.Thread(target=_write_once, args=(app, errors))
        other.start()
        other.join()
        assert errors == []
        db.session.commit()
        assert [target for _, target in chain(db.session)] == ["quick", "long-transaction"]
        assert audit.verify(db.session).ok


def _write_once(app: Flask, errors: list[BaseException]) -> None:
    try:
        with app.app_context():
            db.session.execute(text("SET LOCAL lock_timeout = '5s'"))
            record(db.session, "quick")
            db.session.commit()
    except BaseException as error:
        errors.append(error)
