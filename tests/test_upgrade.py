"""Upgrades: a database made by the previous release, with data in it, upgraded to this one.

The database is migrated to the previous release's revision only, and filled
with plain SQL through the tables as they were then (reflected, so no model of
today is involved): accounts, data keys, a message with an attachment, and an
audit chain hashed with that release's encoding (copied below, frozen). Then
``portal db upgrade`` takes it to head and the app must still read it all.

At each release, move PREVIOUS_RELEASE to the revision the release before it
shipped (CHANGELOG.md names it), and keep the seed in step with that schema.
"""

from __future__ import annotations

import hashlib
import io
import secrets
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask import Flask
from sqlalchemy import Connection, create_engine, func, select, text
from sqlalchemy.engine import make_url

from portal import audit, cli, create_app
from portal.audit import NO_REQUEST
from portal.crypto.keyring import Keyring
from portal.database import make_engine
from portal.extensions import db
from portal.migrate import schema_state, upgrade
from portal.models import AuditEvent, Message, User
from portal.services import accounts, content, messages, signin
from portal.services.keys import seal_text
from portal.storage import FilesystemBlobStore, put_encrypted
from tests.factories import BODY, MINIMAL_PDF, PATIENT_DOB, PATIENT_NAME, SUBJECT
from tests.support.upgrade import T0, Seed

PREVIOUS_RELEASE = "0002"  # v0.1.0, the first release (CHANGELOG.md)
PASSWORD = "correct horse battery staple 0.1"
STAFF_EMAIL, PATIENT_EMAIL = "staff@example.org", "zq@example.org"


@pytest.fixture
def old_database(app: Flask, backend: str, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database of its own (a new schema on PostgreSQL)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'v010.db'}"
        return
    schema = f"pp_upgrade_{secrets.token_hex(6)}"
    source = make_url(app.config["DATABASE_URL"])
    admin = create_engine(source.set(query={}), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield source.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False
    )
    with admin.connect() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def seed_previous_release(
    connection: Connection, ring: Keyring, blobs: FilesystemBlobStore
) -> tuple[str, int]:
    """Write v0.1.0's data: staff, a patient with a DOB, a message with a PDF, its audit trail.

    Returns the message's public id and the number of audit events.
    """
    seed = Seed(connection, ring, blobs)
    staff_id, _, _ = seed.user("staff", STAFF_EMAIL, "Sam Staffer", PASSWORD)
    patient_id, patient_public, patient_key = seed.user(
        "patient", PATIENT_EMAIL, PATIENT_NAME, None
    )
    seed.insert(
        "patient_profiles",
        user_id=patient_id,
        dob_sealed=seal_text(
            patient_key, "patient_profiles", "dob", patient_public, PATIENT_DOB.isoformat()
        ),
    )
    key_id, key = seed.data_key("message")
    public_id, attachment_id = secrets.token_hex(16), secrets.token_hex(16)
    message_id = seed.insert(
        "messages",
        public_id=public_id,
        sender_id=staff_id,
        recipient_id=patient_id,
        data_key_id=key_id,
        subject_sealed=seal_text(key, "messages", "subject", public_id, SUBJECT),
        body_sealed=seal_text(key, "messages", "body", public_id, BODY),
        body_format="text",
        created_at=T0,
        expires_at=T0 + timedelta(days=3650),
    )
    blob_id = put_encrypted(blobs, key, attachment_id, io.BytesIO(MINIMAL_PDF))
    seed.insert(
        "attachments",
        public_id=attachment_id,
        message_id=message_id,
        position=0,
        blob_id=blob_id,
        content_type="application/pdf",
        size=len(MINIMAL_PDF),
        sha256=hashlib.sha256(MINIMAL_PDF).hexdigest(),
        created_at=T0,
        filename_sealed=seal_text(key, "attachments", "filename", attachment_id, "record.pdf"),
    )
    seed.event(
        "message.send",
        staff_id,
        "staff",
        "message",
        public_id,
        patient_id=patient_id,
        message_id=message_id,
        details='{"attachments":1,"format":"text"}',
    )
    return public_id, len(seed.events)


@pytest.fixture
def upgraded(old_database: str, tmp_path: Path) -> Iterator[tuple[Flask, str, int]]:
    """The previous release's database with data, upgraded by ``portal db upgrade``.

    Yields the app on it, the message's public id and the number of old audit events.
    """
    engine = make_engine(old_database)
    upgrade(engine, PREVIOUS_RELEASE)
    assert schema_state(engine)[0] == PREVIOUS_RELEASE
    ring = Keyring.load_or_create(tmp_path / "keyring.json")
    with engine.begin() as connection:
        message, events = seed_previous_release(
            connection, ring, FilesystemBlobStore(tmp_path / "blobs")
        )
    engine.dispose()
    result = CliRunner().invoke(
        cli.main,
        ["db", "upgrade"],
        env={
            "PORTAL_DATABASE_URL": old_database,
            "PORTAL_KEYRING": str(tmp_path / "keyring.json"),
            "PORTAL_BLOB_DIR": str(tmp_path / "blobs"),
        },
    )
    assert result.exit_code == 0, result.output
    app = create_app(
        {
            "DATABASE_URL": old_database,
            "TESTING": True,
            "KEYRING_PATH": str(tmp_path / "keyring.json"),
            "BLOB_DIR": str(tmp_path / "blobs"),
        }
    )
    yield app, message, events
    app.extensions["engine"].dispose()


def test_previous_release_names_a_real_revision_before_head(app: Flask) -> None:
    from alembic.script import ScriptDirectory

    from portal.migrate import alembic_config

    with app.app_context():
        script = ScriptDirectory.from_config(alembic_config(db.engine))
        assert script.get_revision(PREVIOUS_RELEASE) is not None
        assert PREVIOUS_RELEASE in {r.revision for r in script.walk_revisions()}


def test_upgrade_keeps_the_previous_release_data_readable(upgraded: tuple[Flask, str, int]) -> None:
    app, public_id, events = upgraded
    with app.app_context():
        current, head = schema_state(db.engine)
        assert current == head
        assert db.session.scalar(select(func.count()).select_from(User)) == 2
        message = db.session.scalars(select(Message).where(Message.public_id == public_id)).one()
        readable = messages.read(db.session, message)
        assert (readable.subject, readable.body) == (SUBJECT, BODY)
        assert list(readable.filenames.values()) == ["record.pdf"]
        assert b"".join(content.open_attachment(db.session, message.attachments[0])) == MINIMAL_PDF
        patient = accounts.find_by_email(db.session, PATIENT_EMAIL)
        assert patient is not None
        assert accounts.display_name(db.session, patient) == PATIENT_NAME
        trail = audit.verify(db.session)
        assert trail.ok, trail.problem
        assert trail.count == events


def test_upgraded_database_takes_new_work_on_the_old_chain(
    upgraded: tuple[Flask, str, int],
) -> None:
    app, _, events = upgraded
    with app.app_context():
        # The v0.1.0 password hash still signs in; the new audit event chains onto the old.
        first = signin.check_password(db.session, STAFF_EMAIL, PASSWORD, NO_REQUEST)
        assert first.user.email == STAFF_EMAIL
        db.session.commit()
        trail = audit.verify(db.session)
        assert trail.ok, trail.problem
        assert trail.count > events
        assert db.session.scalar(select(func.count()).select_from(AuditEvent)) == trail.count
