"""`portal keys rotate` records its intent before the keyring changes (issue 11 item 14): a
crash between the two leaves the intent on record, and a rerun finishes with one new KEK."""

from __future__ import annotations

import json

import pytest
from flask import Flask
from sqlalchemy import select

from portal import audit
from portal.audit import NO_REQUEST, SYSTEM
from portal.crypto.keyring import Keyring
from portal.extensions import db
from portal.models import AuditEvent
from portal.services import keys
from tests.factories import make_message, make_patient, make_user


class Crash(Exception):
    """The process dying at the worst moment."""


def stages(app: Flask) -> list[tuple[str | None, str]]:
    with app.app_context():
        rows = db.session.scalars(
            select(AuditEvent).where(AuditEvent.action == "key.rotate").order_by(AuditEvent.seq)
        )
        return [(row.target_id, json.loads(row.details)["stage"]) for row in rows]


def seed(app: Flask) -> int:
    """A staff user, a patient and a message; return how many data keys that made."""
    with app.app_context():
        staff, patient = make_user(db.session), make_patient(db.session)
        make_message(db.session, staff, patient)
        db.session.commit()
        return sum(keys.status(db.session).values())


def rotate(app: Flask) -> keys.RotationResult:
    with app.app_context():
        return keys.rotate(
            db.session, actor=SYSTEM, meta=NO_REQUEST, checkpoint=db.session.commit
        )  # as `portal keys rotate` does


def test_intent_is_committed_before_the_keyring_is_written(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    total = seed(app)

    def crash_instead(_ring: Keyring) -> int:
        raise Crash

    monkeypatch.setattr(Keyring, "add_version", crash_instead)
    with pytest.raises(Crash):
        rotate(app)
    assert stages(app) == [("2", "intent")]  # on record although the keyring never changed
    monkeypatch.undo()
    result = rotate(app)
    assert (result.version, result.resumed, result.rewrapped) == (2, False, total)
    assert stages(app) == [("2", "intent"), ("2", "intent"), ("2", "start"), ("2", "batch")]
    with app.app_context():
        assert keys.keyring().versions() == [1, 2]
        assert audit.verify(db.session).ok


@pytest.mark.parametrize("seeded", [False, True])  # no data key at all: only the intent tells
def test_crash_after_the_keyring_write_resumes_without_another_kek(
    app: Flask, monkeypatch: pytest.MonkeyPatch, seeded: bool
) -> None:
    total = seed(app) if seeded else 0
    original = Keyring.add_version

    def write_then_crash(ring: Keyring) -> int:
        original(ring)
        raise Crash

    monkeypatch.setattr(Keyring, "add_version", write_then_crash)
    with pytest.raises(Crash):
        rotate(app)
    monkeypatch.undo()
    result = rotate(app)
    assert (result.version, result.resumed) == (2, True)
    assert stages(app)[:2] == [("2", "intent"), ("2", "start")]
    with app.app_context():
        assert keys.keyring().versions() == [1, 2]  # no third KEK for the same rotation
        assert keys.status(db.session) == ({2: total} if total else {})
    assert rotate(app).version == 3  # the next rotation is a new one
