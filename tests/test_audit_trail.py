"""The hash-chained audit trail: append, verify, tamper detection, concurrency, PG trigger."""

from __future__ import annotations

import itertools
import threading
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from portal import audit
from portal.audit import Action, Actor, AuditDetailError, Outcome, RequestMeta
from portal.extensions import db
from portal.models import AuditEvent

STAFF = Actor(7, "staff")
META = RequestMeta(client_ip="192.0.2.10", user_agent="pytest", request_id="r-1")


def append(n: int, **kwargs: Any) -> None:
    for i in range(n):
        audit.record(
            db.session,
            Action.MESSAGE_VIEW,
            actor=STAFF,
            meta=META,
            target_type="message",
            target_id=f"m{i}",
            patient_id=3,
            **kwargs,
        )
    db.session.commit()


def tamper(session: Any, backend: str, sql: str, **params: Any) -> None:
    """Change rows as an attacker with table-owner rights would (PostgreSQL: trigger bypassed)."""
    if backend == "postgresql":
        session.execute(text("SET LOCAL session_replication_role = replica"))
    session.execute(text(sql), params)
    session.commit()


def test_append_and_verify(app: Flask) -> None:
    with app.app_context():
        append(5)
        result = audit.verify(db.session)
        assert result.ok
        assert result.count == 5
        events = db.session.query(AuditEvent).order_by(AuditEvent.seq).all()
        assert [e.seq for e in events] == [1, 2, 3, 4, 5]
        assert events[0].prev_hash == audit.GENESIS_HASH
        assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(events))
        assert result.head_hash == events[-1].hash
        assert events[0].occurred_at.tzinfo is not None
        assert events[0].client_ip == "192.0.2.10"
        assert events[0].outcome == "success"


def test_empty_trail_verifies(app: Flask) -> None:
    with app.app_context():
        result = audit.verify(db.session)
        assert result.ok
        assert result.count == 0


def test_event_is_in_callers_transaction(app: Flask) -> None:
    with app.app_context():
        audit.record(db.session, Action.MESSAGE_SEND, actor=STAFF)
        db.session.rollback()
        assert db.session.query(AuditEvent).count() == 0
        append(1)
        assert audit.verify(db.session).count == 1


@pytest.mark.parametrize(
    "details",
    [
        {"note": "x" * 500},
        {"Free Text": "a"},
        {"nested": {"a": 1}},
    ],
)
def test_details_refuse_free_text(app: Flask, details: dict[str, Any]) -> None:
    with app.app_context(), pytest.raises(AuditDetailError):
        audit.record(db.session, Action.MESSAGE_SEND, details=details)


def test_unknown_action_refused(app: Flask) -> None:
    with app.app_context(), pytest.raises(ValueError, match="not a valid Action"):
        audit.record(db.session, "message.eat", actor=STAFF)  # type: ignore[arg-type]


def test_detects_edit(app: Flask, backend: str) -> None:
    with app.app_context():
        append(5)
        tamper(db.session, backend, "UPDATE audit_events SET outcome = 'denied' WHERE seq = 3")
        result = audit.verify(db.session)
        assert not result.ok
        assert result.bad_seq == 3
        assert "edited" in (result.problem or "")


def test_detects_deletion(app: Flask, backend: str) -> None:
    with app.app_context():
        append(5)
        tamper(db.session, backend, "DELETE FROM audit_events WHERE seq = 2")
        result = audit.verify(db.session)
        assert not result.ok
        assert result.bad_seq == 3


def test_detects_deletion_of_the_last_event(app: Flask, backend: str) -> None:
    with app.app_context():
        append(5)
        tamper(db.session, backend, "DELETE FROM audit_events WHERE seq = 5")
        result = audit.verify(db.session)
        assert not result.ok
        assert result.bad_seq == 5


def test_detects_swap(app: Flask, backend: str) -> None:
    with app.app_context():
        append(5)
        tamper(db.session, backend, "UPDATE audit_events SET seq = -1 WHERE seq = 2")
        tamper(db.session, backend, "UPDATE audit_events SET seq = 2 WHERE seq = 3")
        tamper(db.session, backend, "UPDATE audit_events SET seq = 3 WHERE seq = -1")
        result = audit.verify(db.session)
        assert not result.ok
        assert result.bad_seq == 2


def test_cli_verify_exit_codes(app: Flask, backend: str) -> None:
    from click.testing import CliRunner

    from portal import cli

    with app.app_context():
        append(3)
    runner = CliRunner()
    env = {"PORTAL_DATABASE_URL": app.config["DATABASE_URL"]}
    ok = runner.invoke(cli.main, ["audit", "verify"], env=env)
    assert ok.exit_code == 0, ok.output
    assert "intact: 3 events" in ok.output
    with app.app_context():
        tamper(db.session, backend, "UPDATE audit_events SET action = 'x' WHERE seq = 2")
    bad = runner.invoke(cli.main, ["audit", "verify"], env=env)
    assert bad.exit_code == 1
    assert "BROKEN at event 2" in bad.output


@pytest.mark.postgres_only
def test_trigger_refuses_update_and_delete(app: Flask) -> None:
    with app.app_context():
        append(2)
        for sql in (
            "UPDATE audit_events SET outcome = 'denied'",
            "DELETE FROM audit_events",
            "TRUNCATE audit_events",
        ):
            with pytest.raises(DBAPIError, match="append-only"):
                db.session.execute(text(sql))
            db.session.rollback()
        assert audit.verify(db.session).count == 2


def test_concurrent_appends_make_one_chain(app: Flask, backend: str) -> None:
    threads, per_thread = (8, 25) if backend == "postgresql" else (4, 10)
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def worker() -> None:
        try:
            with app.app_context():
                barrier.wait()
                for _ in range(per_thread):
                    audit.record(
                        db.session, Action.AUTH_SIGNIN, actor=STAFF, outcome=Outcome.SUCCESS
                    )
                    db.session.commit()
        except BaseException as error:
            errors.append(error)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert errors == []
    with app.app_context():
        result = audit.verify(db.session)
        assert result.ok, result.problem
        assert result.count == threads * per_thread


@pytest.mark.postgres_only
def test_insert_select_only_role_from_readme(app: Flask) -> None:
    """The README's grants: the app role can append and read, never edit or delete."""
    import secrets as random_names

    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    role = f"pp_app_{random_names.token_hex(4)}"
    url = make_url(app.config["DATABASE_URL"])
    schema = url.query["options"].split("=", 1)[1]
    with app.app_context():
        for sql in (
            f"CREATE ROLE {role} LOGIN",
            f"GRANT USAGE ON SCHEMA {schema} TO {role}",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}",
            f"REVOKE UPDATE, DELETE, TRUNCATE ON audit_events FROM {role}",
            f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {role}",
        ):
            db.session.execute(text(sql))
        db.session.commit()
    engine = create_engine(url.set(username=role))
    try:
        with engine.begin() as connection:
            from sqlalchemy.orm import Session

            session = Session(bind=connection)
            audit.record(session, Action.AUTH_SIGNIN, actor=STAFF)
        with engine.connect() as connection:
            for sql in ("UPDATE audit_events SET outcome = 'denied'", "DELETE FROM audit_events"):
                with pytest.raises(DBAPIError, match="permission denied"):
                    connection.execute(text(sql))
                connection.rollback()
    finally:
        engine.dispose()
        with app.app_context():
            db.session.execute(text(f"DROP OWNED BY {role}"))
            db.session.execute(text(f"DROP ROLE {role}"))
            db.session.commit()
    with app.app_context():
        assert audit.verify(db.session).count == 1


@pytest.mark.postgres_only
def test_parallel_verify_agrees_and_falls_back(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "PARALLEL_MIN_EVENTS", 10)
    with app.app_context():
        append(40)
        serial = audit.verify(db.session)
        parallel = audit.verify_parallel(db.session, 3)
        assert parallel == serial
        assert parallel.ok
        tamper(db.session, "postgresql", "UPDATE audit_events SET outcome = 'x' WHERE seq = 27")
        broken = audit.verify_parallel(db.session, 3)
        assert not broken.ok
        assert broken.bad_seq == 27


def _appenders(
    app: Flask, stop: threading.Event, errors: list[BaseException], threads: int = 3
) -> list[threading.Thread]:
    """Threads that append (and commit) through the audit service until ``stop`` is set."""

    def worker() -> None:
        try:
            with app.app_context():
                while not stop.is_set():
                    audit.record(db.session, Action.AUTH_SIGNIN, actor=STAFF)
                    db.session.commit()
        except BaseException as error:
            errors.append(error)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    return pool


@pytest.mark.postgres_only
@pytest.mark.parametrize("how", ["serial", "parallel"])
def test_verify_is_intact_while_others_append(
    app: Flask, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Issue 10 item 19: the head is read first, so concurrent appends never look missing."""
    monkeypatch.setattr(audit, "PARALLEL_MIN_EVENTS", 10)
    with app.app_context():
        append(3000)
    stop, errors = threading.Event(), []
    pool = _appenders(app, stop, errors)
    try:
        with app.app_context():
            results = []
            for _ in range(8):
                results.append(
                    audit.verify(db.session)
                    if how == "serial"
                    else audit.verify_parallel(db.session, 2)
                )
                db.session.rollback()
    finally:
        stop.set()
        for thread in pool:
            thread.join()
    assert errors == []
    assert [(r.ok, r.problem) for r in results] == [(True, None)] * len(results)
    assert results[-1].count > 3000  # the appenders really ran during the walks


def test_events_past_the_head_are_found(app: Flask, backend: str) -> None:
    with app.app_context():
        append(3)
        tamper(
            db.session,
            backend,
            "UPDATE audit_head SET seq = 2, hash = (SELECT hash FROM audit_events WHERE seq = 2)",
        )
        result = audit.verify(db.session)
        assert not result.ok
        assert result.bad_seq == 3


def test_a_deleted_head_row_is_found(app: Flask, backend: str) -> None:
    """Without the head row a cut end would pass unnoticed: its absence is itself a break."""
    with app.app_context():
        append(3)
        tamper(db.session, backend, "DELETE FROM audit_events WHERE seq = 3")
        tamper(db.session, backend, "DELETE FROM audit_head")
        result = audit.verify(db.session)
        assert not result.ok
        assert "head row is missing" in (result.problem or "")


def test_cli_verify_says_unanchored_without_a_noted_head(app: Flask) -> None:
    """Issue 10 item 18: an intact chain without --from-head cannot rule out a cut end."""
    from click.testing import CliRunner

    from portal import cli

    with app.app_context():
        append(2)
        head = audit.verify(db.session).head_hash
    runner, env = CliRunner(), {"PORTAL_DATABASE_URL": app.config["DATABASE_URL"]}
    plain = runner.invoke(cli.main, ["audit", "verify"], env=env)
    assert plain.exit_code == 0, plain.output
    assert "unanchored" in plain.output
    assert "--from-head" in plain.output
    pinned = runner.invoke(cli.main, ["audit", "verify", "--from-head", head], env=env)
    assert pinned.exit_code == 0, pinned.output
    assert "unanchored" not in pinned.output
    assert f"anchored: the noted head {head[:12]}" in pinned.output
