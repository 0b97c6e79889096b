"""`portal keys rotate` with a corrupted wrapped key: the rest are rewrapped, the bad one is
reported by id and audited, and the command exits non-zero (issue 10 item 16)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from sqlalchemy import create_engine, select, text

from portal import audit, cli
from portal.audit import NO_REQUEST, SYSTEM
from portal.extensions import db
from portal.models import AuditEvent, DataKey, Message
from portal.services import keys, messages
from tests.factories import PHI_STRINGS, SUBJECT, make_message, make_patient, make_user


def rotate(**kwargs: Any) -> keys.RotationResult:
    """Rotate as ``portal keys rotate`` does: the caller commits at each checkpoint."""
    return keys.rotate(
        db.session, actor=SYSTEM, meta=NO_REQUEST, checkpoint=db.session.commit, **kwargs
    )


def seed_with_one_corrupted_key(app: Flask) -> tuple[int, bytes, int]:
    """Three messages; flip a bit of the second one's wrapped key. Return (id, bytes, total)."""
    with app.app_context():
        staff, patient = make_user(db.session), make_patient(db.session)
        made = [make_message(db.session, staff, patient) for _ in range(3)]
        db.session.commit()
        row = db.session.get(DataKey, made[1].data_key_id)
        assert row is not None
        assert row.wrapped is not None
        row.wrapped = row.wrapped[:-1] + bytes([row.wrapped[-1] ^ 1])
        db.session.commit()
        total = db.session.query(DataKey).count()
        return row.id, row.wrapped, total


def failure_events(app: Flask) -> list[AuditEvent]:
    with app.app_context():
        return list(
            db.session.scalars(select(AuditEvent).where(AuditEvent.action == "key.rewrap.failed"))
        )


def test_rotation_skips_a_corrupted_key_and_finishes_the_rest(app: Flask) -> None:
    bad_id, bad_bytes, total = seed_with_one_corrupted_key(app)
    with app.app_context():
        result = rotate(batch_size=1)
        assert result.failed == (bad_id,)
        assert result.rewrapped == total - 1
        assert keys.status(db.session) == {1: 1, 2: total - 1}
        db.session.expire_all()
        bad = db.session.get(DataKey, bad_id)
        assert bad is not None
        assert (bad.kek_version, bad.wrapped) == (1, bad_bytes)  # left exactly as found
        readable = [m for m in db.session.scalars(select(Message)) if m.data_key_id != bad_id]
        assert [messages.read(db.session, m).subject for m in readable] == [SUBJECT, SUBJECT]
        assert audit.verify(db.session).ok
    [event] = failure_events(app)
    assert (event.outcome, event.target_type, event.target_id) == (
        "failure",
        "data_key",
        str(bad_id),
    )
    assert json.loads(event.details or "{}") == {"kek_version": 1, "purpose": "message"}


def test_rotating_again_retries_the_bad_key_without_a_new_kek(app: Flask) -> None:
    bad_id, _, _ = seed_with_one_corrupted_key(app)
    with app.app_context():
        rotate()
        again = rotate()
        assert (again.resumed, again.version, again.rewrapped, again.failed) == (
            True,
            2,
            0,
            (bad_id,),
        )
        assert keys.keyring().versions() == [1, 2]
    assert len(failure_events(app)) == 2


def test_cli_rotate_reports_bad_keys_and_exits_non_zero(app: Flask) -> None:
    bad_id, _, total = seed_with_one_corrupted_key(app)
    env = {"PORTAL_DATABASE_URL": app.config["DATABASE_URL"]}
    result = CliRunner().invoke(cli.main, ["keys", "rotate", "--batch-size", "2"], env=env)
    assert result.exit_code == 1
    assert f"rotated to KEK v2: {total - 1} data keys rewrapped" in result.stdout
    assert "1 data keys failed authentication" in result.stderr
    assert result.stderr.rstrip().endswith(f"Data key ids: {bad_id}")
    assert "Traceback" not in result.output
    assert not [phi for phi in PHI_STRINGS if phi in result.output]
    with app.app_context():
        assert keys.status(db.session) == {1: 1, 2: total - 1}
    assert len(failure_events(app)) == 1


@pytest.mark.postgres_only
def test_a_key_locked_throughout_is_reported_not_claimed_done(app: Flask) -> None:
    """skip_locked passes over a key another transaction holds: the result must say so."""
    with app.app_context():
        staff, patient = make_user(db.session), make_patient(db.session)
        made = [make_message(db.session, staff, patient) for _ in range(3)]
        db.session.commit()
        held_id = made[0].data_key_id
    engine = create_engine(app.config["DATABASE_URL"])
    with engine.connect() as other:
        other.execute(text("SELECT id FROM data_keys WHERE id = :i FOR UPDATE"), {"i": held_id})
        with app.app_context():
            result = rotate(batch_size=1)
            assert (result.failed, result.left) == ((), 1)
        other.rollback()
    engine.dispose()
    with app.app_context():
        again = rotate()
        assert (again.resumed, again.left, again.rewrapped) == (True, 0, 1)
        assert set(keys.status(db.session)) == {again.version}
