"""``portal backup DIR`` and ``portal restore DIR``: database and blobs, the keyring kept apart."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from flask import Flask

from portal import audit
from portal.audit import NO_REQUEST, SYSTEM, Action
from portal.cli import main, with_app
from portal.services.errors import ServiceError

if TYPE_CHECKING:
    from portal.services.backup import Instance

KEYRING_WARNING = (
    "WARNING: the keyring ({path}) is NOT in this backup, on purpose: blobs and sealed "
    "columns are ciphertext, unreadable without it (KEK versions needed: {versions}). "
    "Back the keyring up separately and keep that copy apart from this one.")


def _instance(app: Flask) -> Instance:
    from portal.extensions import db
    from portal.services.backup import Instance
    from portal.services.content import blob_store

    return Instance(app.config["DATABASE_URL"], db.engine, blob_store())


@main.command("backup")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@with_app
def backup(app: Flask, folder: Path) -> None:
    """Write a consistent snapshot of database and blobs to the new FOLDER (keyring not in it)."""
    from portal.extensions import db
    from portal.services import backup as service

    try:
        done = service.backup(_instance(app), folder)
    except ServiceError as error:
        click.echo(f"portal: {error}", err=True)
        sys.exit(1)
    audit.record(db.session, Action.BACKUP_CREATE, actor=SYSTEM, meta=NO_REQUEST,
                 details={"schema_revision": done.revision, "blobs": done.blobs})
    click.echo(f"backup written to {folder}: schema {done.revision}, {done.blobs} blobs")
    versions = ", ".join(f"v{v}" for v in done.kek_versions) or "none"
    click.echo(KEYRING_WARNING.format(path=app.config["KEYRING_PATH"], versions=versions),
               err=True)


@main.command("restore")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@with_app
def restore(app: Flask, folder: Path) -> None:
    """Load the backup in FOLDER into this empty instance, then upgrade it to this release."""
    from portal.extensions import db
    from portal.migrate import schema_state, upgrade
    from portal.services import backup as service

    try:
        done = service.restore(_instance(app), folder)
    except ServiceError as error:
        click.echo(f"portal: {error}", err=True)
        sys.exit(1)
    upgrade(db.engine)  # a backup of an older release is brought to this one's schema
    audit.record(db.session, Action.BACKUP_RESTORE, actor=SYSTEM, meta=NO_REQUEST,
                 details={"schema_revision": done.revision, "blobs": done.blobs})
    click.echo(f"restored schema {done.revision} and {done.blobs} blobs; database now at "
               f"{schema_state(db.engine)[0]}. Next: `portal audit verify`.")
    problem = service.keyring_problem(app.config["KEYRING_PATH"], done.kek_versions)
    if problem:
        click.echo(f"WARNING: {problem}", err=True)
