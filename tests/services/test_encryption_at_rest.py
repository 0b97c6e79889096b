"""Encrypted at rest: sealed columns, resumable key rotation, shredding, orphans, PHI scan."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import text

from portal import audit
from portal.audit import NO_REQUEST, SYSTEM
from portal.crypto.errors import ContentDestroyed, ContentTampered
from portal.extensions import db
from portal.models import AuditEvent, DataKey, Message, User
from portal.services import accounts, content, keys, messages
from portal.services.errors import ServiceError
from tests.factories import (
    BODY,
    FILENAME,
    MINIMAL_PDF,
    PATIENT_NAME,
    PHI_STRINGS,
    SUBJECT,
    make_message,
    make_patient,
    make_user,
)


def rotate(**kwargs: Any) -> keys.RotationResult:
    """Rotate as ``portal keys rotate`` does: the caller commits at each checkpoint."""
    return keys.rotate(
        db.session, actor=SYSTEM, meta=NO_REQUEST, checkpoint=db.session.commit, **kwargs
    )


def seed(n_messages: int = 3) -> list[Message]:
    staff = make_user(db.session)
    patient = make_patient(db.session)
    made = [make_message(db.session, staff, patient) for _ in range(n_messages)]
    db.session.commit()
    return made


def read_all() -> list[str]:
    out = []
    for message in db.session.query(Message).all():
        readable = messages.read(db.session, message)
        data = b"".join(
            b"".join(content.open_attachment(db.session, a)) for a in message.attachments
        )
        assert data == MINIMAL_PDF
        out.append(readable.subject)
    for user in db.session.query(User).all():
        out.append(accounts.display_name(db.session, user))
    return out


def test_round_trip(app: Flask) -> None:
    with app.app_context():
        message = seed(1)[0]
        readable = messages.read(db.session, message)
        assert readable.subject == SUBJECT
        assert readable.body == BODY
        assert list(readable.filenames.values()) == [FILENAME]
        attachment = message.attachments[0]
        assert attachment.size == len(MINIMAL_PDF)
        assert len(attachment.sha256) == 64


def test_sealed_value_moved_to_another_row_is_refused(app: Flask) -> None:
    with app.app_context():
        first, second = seed(2)
        second.subject_sealed = first.subject_sealed
        with pytest.raises(ContentTampered):
            messages.read(db.session, second)


def test_plaintext_is_refused_by_phi_columns(app: Flask) -> None:
    with app.app_context():
        message = seed(1)[0]
        message.subject_sealed = "plain subject"  # type: ignore[assignment]
        with pytest.raises(Exception, match="sealed bytes"):
            db.session.flush()
        db.session.rollback()


def test_keyring_file_private(app: Flask) -> None:
    with app.app_context():
        seed(1)
        path = Path(app.config["KEYRING_PATH"])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_rotation_rewraps_without_touching_content(app: Flask) -> None:
    with app.app_context():
        seed(3)
        before_blobs = {
            a: os.stat(content.blob_store()._path(a)).st_mtime_ns
            for a in content.blob_store().iter_ids()
        }
        before_subjects = [m.subject_sealed for m in db.session.query(Message)]
        result = rotate(batch_size=2)
        assert result.version == 2
        assert result.rewrapped == db.session.query(DataKey).count()
        assert keys.status(db.session) == {2: result.rewrapped}
        assert [m.subject_sealed for m in db.session.query(Message)] == before_subjects
        assert {
            a: os.stat(content.blob_store()._path(a)).st_mtime_ns
            for a in content.blob_store().iter_ids()
        } == before_blobs
        assert SUBJECT in read_all()
        assert db.session.query(AuditEvent).filter_by(action="key.rotate").count() >= 2
        assert audit.verify(db.session).ok


def test_interrupted_rotation_resumes(app: Flask) -> None:
    with app.app_context():
        seed(4)
        total = db.session.query(DataKey).count()

        def crash(done: int) -> None:
            if done >= 2:
                raise RuntimeError("power cut")

        with pytest.raises(RuntimeError):
            rotate(batch_size=2, after_batch=crash)
        db.session.rollback()
        spread = keys.status(db.session)
        assert set(spread) == {1, 2}
        assert PATIENT_NAME in read_all()  # readable mid-rotation
        result = rotate(batch_size=2)
        assert result.resumed
        assert result.version == 2
        assert keys.status(db.session) == {2: total}
        assert SUBJECT in read_all()


def test_kek_still_in_use_cannot_be_removed(app: Flask) -> None:
    with app.app_context():
        seed(1)
        with pytest.raises(ServiceError, match="active"):
            keys.remove_kek(db.session, 1)
        keys.keyring().add_version()  # a new KEK, nothing rewrapped yet
        with pytest.raises(ServiceError, match="still wraps 3 data keys"):
            keys.remove_kek(db.session, 1)
        with pytest.raises(ServiceError, match="active"):
            keys.remove_kek(db.session, 2)
        assert rotate().resumed
        keys.remove_kek(db.session, 1)
        assert keys.keyring().versions() == [2]
        assert SUBJECT in read_all()


def test_cli_keys_status_and_rotate(app: Flask) -> None:
    from click.testing import CliRunner

    from portal import cli

    with app.app_context():
        seed(1)
    env = {"PORTAL_DATABASE_URL": app.config["DATABASE_URL"]}
    runner = CliRunner()
    status = runner.invoke(cli.main, ["keys", "status"], env=env)
    assert status.exit_code == 0, status.output
    assert "KEK v1 (active): 3 data keys" in status.output
    rotated = runner.invoke(cli.main, ["keys", "rotate"], env=env)
    assert "rotated to KEK v2: 3 data keys rewrapped" in rotated.output
    removed = runner.invoke(cli.main, ["keys", "remove", "2"], env=env)
    assert removed.exit_code == 1
    assert "active" in removed.output


def test_shredding_makes_content_unrecoverable(app: Flask) -> None:
    with app.app_context():
        message = seed(1)[0]
        blob_id = message.attachments[0].blob_id
        content.shred(db.session, message, actor=SYSTEM, meta=NO_REQUEST)
        db.session.commit()
        assert not content.blob_store().exists(blob_id)
        with pytest.raises(ContentDestroyed):
            messages.read(db.session, message)
        with pytest.raises(ContentDestroyed):
            content.open_attachment(db.session, message.attachments[0])
        row = db.session.get(DataKey, message.data_key_id)
        assert row is not None
        assert row.wrapped is None
        assert db.session.query(AuditEvent).filter_by(action="message.shred").count() == 1


def test_shredding_rolled_back_keeps_content(app: Flask) -> None:
    with app.app_context():
        message = seed(1)[0]
        blob_id = message.attachments[0].blob_id
        content.shred(db.session, message, actor=SYSTEM, meta=NO_REQUEST)
        db.session.rollback()
        assert content.blob_store().exists(blob_id)
        assert messages.read(db.session, db.session.get(Message, message.id)).subject == SUBJECT


def test_failed_transaction_leaves_no_blob(app: Flask) -> None:
    with app.app_context():
        staff = make_user(db.session)
        patient = make_patient(db.session)
        db.session.commit()

        def refuse_second(upload: messages.Upload) -> None:
            if upload.filename == "second.pdf":
                raise ServiceError("second.pdf is not a PDF.")

        with pytest.raises(ServiceError):
            make_message(
                db.session,
                staff,
                patient,
                validate=refuse_second,
                files=[("first.pdf", MINIMAL_PDF), ("second.pdf", b"nope")],
            )
        db.session.rollback()
        assert list(content.blob_store().iter_ids()) == []
        assert db.session.query(Message).count() == 0


def test_sweep_removes_orphans_only(app: Flask) -> None:
    with app.app_context():
        seed(1)
        orphan = content.blob_store().put([b"left behind by a crash"])
        assert content.sweep_orphans(db.session, grace_seconds=3600) == 0
        assert content.sweep_orphans(db.session, grace_seconds=0) == 1
        assert not content.blob_store().exists(orphan)
        assert SUBJECT in read_all()


def test_no_phi_in_database_or_blob_folder(app: Flask, backend: str) -> None:
    with app.app_context():
        seed(2)
        dumps = [p.read_bytes() for p in Path(app.config["BLOB_DIR"]).rglob("*") if p.is_file()]
        if backend == "sqlite":
            db.engine.dispose()
            path = Path(app.config["DATABASE_URL"].removeprefix("sqlite:///"))
            dumps += [p.read_bytes() for p in path.parent.glob(path.name + "*")]
        else:
            for table in (
                "users",
                "patient_profiles",
                "messages",
                "attachments",
                "data_keys",
                "audit_events",
                "notifications",
            ):
                rows = db.session.execute(text(f"SELECT * FROM {table}")).all()
                dumps.append(repr(rows).encode())
    blob = b"\n".join(dumps)
    assert blob
    for phi in PHI_STRINGS:
        assert phi.encode() not in blob, phi
        assert phi.encode("utf-16-le") not in blob


def test_cli_retention_run_sweeps_and_audits(app: Flask) -> None:
    import time as clock

    from click.testing import CliRunner

    from portal import cli

    with app.app_context():
        seed(1)
        orphan = content.blob_store().put([b"orphan"])
        old = clock.time() - 7200
        os.utime(content.blob_store()._path(orphan), (old, old))
    result = CliRunner().invoke(
        cli.main, ["retention", "run"], env={"PORTAL_DATABASE_URL": app.config["DATABASE_URL"]}
    )
    assert result.exit_code == 0, result.output
    assert "1 orphan blobs removed" in result.output
    assert "expired sessions removed" in result.output
    with app.app_context():
        assert not content.blob_store().exists(orphan)
        assert db.session.query(AuditEvent).filter_by(action="retention.run").count() == 1
