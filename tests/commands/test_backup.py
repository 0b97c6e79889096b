"""`portal backup DIR` / `portal restore DIR`: a consistent snapshot restored into a new instance.

Messages with attachments are sent through the real services; the backup is
restored into a new instance (SQLite: a new file and blob folder; PostgreSQL: a
new database), where every message and attachment is decrypted and the audit
chain verified. Bad inputs (a tampered or missing file, a non-empty target, a
newer schema, a manifest naming paths outside the backup) are refused before
anything is written.
"""

from __future__ import annotations

import io
import json
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from flask import Flask
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from portal import audit, cli, create_app
from portal.audit import NO_REQUEST, SYSTEM
from portal.extensions import db
from portal.migrate import schema_state
from portal.models import AuditEvent, Message
from portal.services import content, messages, messaging
from portal.services.messages import Upload
from tests.factories import BODY, MINIMAL_PDF, SUBJECT, make_patient, make_user

PDF_2 = MINIMAL_PDF.replace(b"612 792", b"595 842")  # a second, different file


@dataclass
class Target:
    """A fresh, empty instance to restore into."""

    url: str
    folder: Path

    @property
    def env(self) -> dict[str, str]:
        return {"PORTAL_DATABASE_URL": self.url, "PORTAL_INSTANCE_DIR": str(self.folder)}

    @property
    def blobs(self) -> Path:
        return self.folder / "blobs"

    def run(self, *args: str) -> Result:
        return CliRunner().invoke(cli.main, list(args), env=self.env)

    def give_keyring(self, source: Flask) -> None:
        """Restore the keyring from its own (separate) backup, as the operator would."""
        self.folder.mkdir(mode=0o700, exist_ok=True)
        shutil.copy(source.config["KEYRING_PATH"], self.folder / "keyring.json")

    def app(self) -> Flask:
        return create_app(
            {
                "DATABASE_URL": self.url,
                "TESTING": True,
                "BLOB_DIR": str(self.blobs),
                "KEYRING_PATH": str(self.folder / "keyring.json"),
            }
        )


@pytest.fixture
def target(app: Flask, backend: str, tmp_path: Path) -> Iterator[Target]:
    """An empty instance: a new SQLite file, or a new PostgreSQL database with the same schema."""
    folder = tmp_path / "restored"
    if backend == "sqlite":
        yield Target(f"sqlite:///{folder / 'portal.db'}", folder)
        return
    source = make_url(app.config["DATABASE_URL"])
    name = f"pp_restore_{secrets.token_hex(6)}"
    admin = create_engine(source.set(query={}), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    with app.app_context(), db.engine.connect() as connection:
        schema = connection.execute(text("SELECT current_schema()")).scalar()
    fresh = create_engine(source.set(database=name), isolation_level="AUTOCOMMIT")
    with fresh.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    fresh.dispose()
    yield Target(source.set(database=name).render_as_string(hide_password=False), folder)
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


def run(app: Flask, *args: str) -> Result:
    """Run ``portal ARGS`` on the source instance."""
    return CliRunner().invoke(
        cli.main, list(args), env={"PORTAL_DATABASE_URL": app.config["DATABASE_URL"]}
    )


@pytest.fixture
def sent(app: Flask) -> dict[str, tuple[str, list[bytes]]]:
    """Send messages with attachments through the real services, shred one, leave an orphan blob.

    Returns the live messages' bodies and files by public id.
    """
    files = {"one": [MINIMAL_PDF], "two": [MINIMAL_PDF, PDF_2], "none": []}
    expected: dict[str, tuple[str, list[bytes]]] = {}
    with app.app_context():
        staff = make_user(db.session, "staff", "staff@example.org", "Sam Staffer")
        patient = make_patient(db.session)
        for label, pdfs in [*files.items(), ("shredded", [MINIMAL_PDF])]:
            uploads = [Upload(f"{label}-{i}.pdf", io.BytesIO(pdf)) for i, pdf in enumerate(pdfs)]
            done = messaging.send(
                db.session,
                sender=staff,
                recipient=patient,
                subject=SUBJECT,
                body=f"{BODY} ({label})",
                uploads=uploads,
                meta=NO_REQUEST,
            )
            if label == "shredded":
                content.shred(db.session, done.message, actor=SYSTEM, meta=NO_REQUEST)
            else:
                expected[done.message.public_id] = (f"{BODY} ({label})", pdfs)
        db.session.commit()
        content.blob_store().put([b"orphan: written by a transaction that never committed"])
    return expected


def read_everything(app: Flask) -> dict[str, tuple[str, list[bytes]]]:
    """Decrypt every live message's body and attachments on ``app``."""
    found: dict[str, tuple[str, list[bytes]]] = {}
    with app.app_context():
        for message in db.session.scalars(select(Message).where(Message.destroyed_at.is_(None))):
            files = [
                b"".join(content.open_attachment(db.session, attachment))
                for attachment in message.attachments
            ]
            found[message.public_id] = (messages.read(db.session, message).body, files)
    return found


def audit_count(app: Flask) -> int:
    with app.app_context():
        return int(db.session.scalar(select(func.count()).select_from(AuditEvent)) or 0)


def test_restore_into_a_fresh_instance_reads_every_message_and_the_trail_is_intact(
    app: Flask, sent: dict[str, tuple[str, list[bytes]]], target: Target, tmp_path: Path
) -> None:
    events_at_backup = audit_count(app)
    made = run(app, "backup", str(tmp_path / "bk"))
    assert made.exit_code == 0, made.output
    target.give_keyring(app)
    restored = target.run("restore", str(tmp_path / "bk"))
    assert restored.exit_code == 0, restored.output
    assert "WARNING" not in restored.output

    copy = target.app()
    try:
        assert read_everything(copy) == sent
        with copy.app_context():
            current, head = schema_state(db.engine)
            assert current == head
            trail = audit.verify(db.session)
            assert trail.ok, trail.problem
            # Everything the snapshot held, plus the restore's own event.
            assert trail.count == events_at_backup + 1
        verified = target.run("audit", "verify")
        assert verified.exit_code == 0, verified.output
        assert "intact" in verified.output
    finally:
        copy.extensions["engine"].dispose()


def test_backup_is_private_named_in_the_manifest_and_leaves_the_keyring_out(
    app: Flask, sent: dict[str, tuple[str, list[bytes]]], tmp_path: Path
) -> None:
    folder = tmp_path / "bk"
    made = run(app, "backup", str(folder))
    assert made.exit_code == 0, made.output
    assert "keyring" in made.output
    assert "NOT in this backup" in made.output

    manifest = json.loads((folder / "manifest.json").read_text())
    with app.app_context():
        live = {
            a.blob_id
            for m in db.session.scalars(select(Message))
            if m.destroyed_at is None
            for a in m.attachments
        }
        assert manifest["schema_revision"] == schema_state(db.engine)[1]
    blobs = {name.rsplit("/", 1)[1] for name in manifest["files"] if name.startswith("blobs/")}
    assert blobs == live  # the orphan and the shredded message's blob stay behind
    assert manifest["database"] == app.extensions["engine"].dialect.name
    assert manifest["keyring_included"] is False
    assert manifest["kek_versions"] == [1]
    assert manifest["created_at"].endswith("+00:00")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in folder.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
        assert "keyring" not in path.name
    key_material = json.loads(Path(app.config["KEYRING_PATH"]).read_text())["keys"]["1"]
    assert not any(
        key_material.encode() in p.read_bytes() for p in folder.rglob("*") if p.is_file()
    )
    assert audit_count(app)
    assert _last_action(app) == "backup.create"


def _last_action(app: Flask) -> str:
    with app.app_context():
        return str(
            db.session.scalar(select(AuditEvent.action).order_by(AuditEvent.seq.desc()).limit(1))
        )


def test_backup_refuses_an_existing_folder_and_leaves_it_alone(
    app: Flask, sent: Any, tmp_path: Path
) -> None:
    folder = tmp_path / "taken"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    refused = run(app, "backup", str(folder))
    assert refused.exit_code == 1
    assert "exists" in refused.output
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert list(folder.iterdir()) == []


def test_backup_fails_loudly_when_a_named_blob_is_missing(
    app: Flask, sent: dict[str, tuple[str, list[bytes]]], tmp_path: Path
) -> None:
    with app.app_context():
        message = db.session.scalars(
            select(Message).where(Message.public_id == next(iter(sent)))
        ).one()
        content.blob_store().delete(message.attachments[0].blob_id)
    events = audit_count(app)
    failed = run(app, "backup", str(tmp_path / "bk"))
    assert failed.exit_code == 1
    assert "vanished" in failed.output
    assert not (tmp_path / "bk").exists()  # no half backup left to be mistaken for a whole one
    assert audit_count(app) == events


@pytest.fixture
def backup_dir(app: Flask, sent: Any, tmp_path: Path) -> Path:
    folder = tmp_path / "bk"
    assert run(app, "backup", str(folder)).exit_code == 0
    return folder


def assert_nothing_restored(target: Target) -> None:
    blob_files = (
        [p for p in target.blobs.rglob("*") if p.is_file()] if target.blobs.exists() else []
    )
    assert blob_files == []
    engine = create_engine(target.url)
    try:
        with engine.connect() as connection:
            if engine.dialect.name == "sqlite":
                tables = connection.execute(text("SELECT count(*) FROM sqlite_master")).scalar()
            else:
                tables = connection.execute(
                    text(
                        "SELECT count(*) FROM information_schema.tables "
                        "WHERE table_schema = current_schema()"
                    )
                ).scalar()
    finally:
        engine.dispose()
    assert tables == 0


def _blob_file(folder: Path) -> Path:
    return next(p for p in (folder / "blobs").rglob("*") if p.is_file())


@pytest.mark.parametrize("victim", ["blob", "database"])
def test_restore_refuses_a_tampered_file_and_writes_nothing(
    backup_dir: Path, target: Target, victim: str
) -> None:
    path = _blob_file(backup_dir) if victim == "blob" else next(backup_dir.glob("database.*"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    refused = target.run("restore", str(backup_dir))
    assert refused.exit_code == 1
    assert "does not match the manifest" in refused.output
    assert_nothing_restored(target)


def test_restore_refuses_a_missing_file(backup_dir: Path, target: Target) -> None:
    _blob_file(backup_dir).unlink()
    refused = target.run("restore", str(backup_dir))
    assert refused.exit_code == 1
    assert "is missing" in refused.output
    assert_nothing_restored(target)


def test_restore_refuses_an_unfinished_backup(backup_dir: Path, target: Target) -> None:
    (backup_dir / "manifest.json").unlink()
    refused = target.run("restore", str(backup_dir))
    assert refused.exit_code == 1
    assert "no manifest.json" in refused.output
    assert_nothing_restored(target)


def test_restore_refuses_a_non_empty_target(
    app: Flask, backup_dir: Path, target: Target, tmp_path: Path
) -> None:
    into_source = run(app, "restore", str(backup_dir))
    assert into_source.exit_code == 1
    assert "not empty" in into_source.output
    # The database is empty but the blob folder is not.
    target.blobs.mkdir(parents=True)
    (target.blobs / "stray").write_bytes(b"x")
    refused = target.run("restore", str(backup_dir))
    assert refused.exit_code == 1
    assert "blob folder" in refused.output
    assert "not empty" in refused.output


def _edit_manifest(folder: Path, **changes: Any) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_restore_refuses_a_backup_of_a_newer_schema(backup_dir: Path, target: Target) -> None:
    _edit_manifest(backup_dir, schema_revision="9999_from_the_future")
    refused = target.run("restore", str(backup_dir))
    assert refused.exit_code == 1
    assert "unknown to this release" in refused.output
    assert_nothing_restored(target)


def test_restore_refuses_a_manifest_naming_paths_outside_the_backup(
    backup_dir: Path, target: Target, tmp_path: Path
) -> None:
    manifest = json.loads((backup_dir / "manifest.json").read_text())
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of any backup")
    manifest["files"]["../outside.txt"] = {"sha256": "0" * 64, "size": 1}
    _edit_manifest(backup_dir, files=manifest["files"])
    refused = target.run("restore", str(backup_dir))
    assert refused.exit_code == 1
    assert "outside the backup layout" in refused.output
    assert_nothing_restored(target)


def test_restore_without_the_keyring_warns_and_creates_none(
    backup_dir: Path, target: Target
) -> None:
    restored = target.run("restore", str(backup_dir))
    assert restored.exit_code == 0, restored.output
    assert "WARNING: no keyring at" in restored.output
    assert not (target.folder / "keyring.json").exists()
