"""``portal keys status | rotate | remove``."""

from __future__ import annotations

import sys

import click
from flask import Flask

from portal.audit import NO_REQUEST, SYSTEM
from portal.cli import main, with_app
from portal.services.errors import ServiceError


@main.group()
def keys() -> None:
    """Key-encryption keys (KEKs) and the data keys they wrap."""


@keys.command("status")
@with_app
def keys_status(app: Flask) -> None:
    """Print the live data keys per KEK version, and which version is active."""
    from portal.extensions import db
    from portal.services import keys as key_service

    ring = key_service.keyring()
    counts = key_service.status(db.session)
    click.echo(f"keyring: {ring.path}")
    for version in sorted(set(ring.versions()) | set(counts)):
        marker = " (active)" if version == ring.active_version else ""
        missing = "" if version in ring.versions() else "  MISSING FROM KEYRING"
        click.echo(f"  KEK v{version}{marker}: {counts.get(version, 0)} data keys{missing}")


@keys.command("rotate")
@click.option("--batch-size", default=500, show_default=True, type=int)
@with_app
def keys_rotate(app: Flask, batch_size: int) -> None:
    """Make a new KEK active and rewrap every data key (resumes an interrupted rotation)."""
    from portal.extensions import db
    from portal.services import keys as key_service

    result = key_service.rotate(db.session, actor=SYSTEM, meta=NO_REQUEST,
                                batch_size=batch_size)
    verb = "resumed rotation to" if result.resumed else "rotated to"
    click.echo(f"{verb} KEK v{result.version}: {result.rewrapped} data keys rewrapped")
    if result.failed:
        ids = ", ".join(str(key_id) for key_id in result.failed)
        click.echo(f"portal: {len(result.failed)} data keys failed authentication (corrupted "
                   f"or altered) and stay under their old KEK; restore them from a backup, "
                   f"then run 'portal keys rotate' again. Data key ids: {ids}", err=True)
        sys.exit(1)  # every batch (and each failure's audit event) is already committed
    if result.left:
        click.echo(f"portal: {result.left} data keys were held by other transactions and "
                   f"stay under an older KEK; run 'portal keys rotate' again.", err=True)
        sys.exit(1)


@keys.command("remove")
@click.argument("version", type=int)
@with_app
def keys_remove(app: Flask, version: int) -> None:
    """Delete an old KEK version once no data key is wrapped by it."""
    from portal.extensions import db
    from portal.services import keys as key_service

    try:
        key_service.remove_kek(db.session, version)
    except ServiceError as error:
        click.echo(f"portal: {error}", err=True)
        sys.exit(1)
    click.echo(f"removed KEK v{version}")
