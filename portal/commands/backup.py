"""``portal backup DIR`` and ``portal restore DIR``: database and blobs, the keyring kept apart."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from flask import current_app

from portal import audit
from portal.audit import NO_REQUEST, SYSTEM, Action
from portal.commands.base import command
from portal.extensions import db
from portal.migrate import schema_state, upgrade
from portal.services import backup as service
from portal.services.backup import Instance
from portal.services.content import blob_store
from portal.services.errors import ServiceError

KEYRING_WARNING = (
    "WARNING: the keyring ({path}) is NOT in this backup, on purpose: blobs and sealed "
    "columns are ciphertext, unreadable without it (KEK versions needed: {versions}). "
    "Back the keyring up separately and keep that copy apart from this one."
)


def _instance() -> Instance:
    return Instance(current_app.config["DATABASE_URL"], db.engine, blob_store())


@command("backup")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
def backup(folder: Path) -> None:
    """Write a consistent snapshot of database and blobs to the new FOLDER (keyring not in it)."""
    try:
        done = service.backup(_instance(), folder)
    except ServiceError as error:
        click.echo(f"portal: {error}", err=True)
        sys.exit(1)
    audit.record(
        db.session,
        Action.BACKUP_CREATE,
        actor=SYSTEM,
        meta=NO_REQUEST,
        details={"schema_revision": done.revision, "blobs": done.blobs},
    )
    click.echo(f"backup written to {folder}: schema {done.revision}, {done.blobs} blobs")
    versions = ", ".join(f"v{v}" for v in done.kek_versions) or "none"
    ring = current_app.config["KEYRING_PATH"]
    click.echo(KEYRING_WARNING.format(path=ring, versions=versions), err=True)


@command("restore")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
def restore(folder: Path) -> None:
    """Load the backup in FOLDER into this empty instance, then upgrade it to this release."""
    try:
        done = service.restore(_instance(), folder)
    except ServiceError as error:
        click.echo(f"portal: {error}", err=True)
        sys.exit(1)
    upgrade(db.engine)  # a backup of an older release is brought to this one's schema
    audit.record(
        db.session,
        Action.BACKUP_RESTORE,
        actor=SYSTEM,
        meta=NO_REQUEST,
        details={"schema_revision": done.revision, "blobs": done.blobs},
    )
    click.echo(
        f"restored schema {done.revision} and {done.blobs} blobs; database now at "
        f"{schema_state(db.engine)[0]}. Next: `portal audit verify`."
    )
    problem = service.keyring_problem(current_app.config["KEYRING_PATH"], done.kek_versions)
    if problem:
        click.echo(f"WARNING: {problem}", err=True)
