"""``portal keys status | rotate | remove``."""

from __future__ import annotations

import sys

import click

from portal.audit import NO_REQUEST, SYSTEM
from portal.commands.base import CommandGroup
from portal.extensions import db
from portal.services import keys as key_service
from portal.services.errors import ServiceError

keys = CommandGroup("keys", help="Key-encryption keys (KEKs) and the data keys they wrap.")


@keys.command("status")
def keys_status() -> None:
    """Print the live data keys per KEK version, and which version is active."""
    ring = key_service.keyring()
    counts = key_service.status(db.session)
    click.echo(f"keyring: {ring.path}")
    for version in sorted(set(ring.versions()) | set(counts)):
        marker = " (active)" if version == ring.active_version else ""
        missing = "" if version in ring.versions() else "  MISSING FROM KEYRING"
        click.echo(f"  KEK v{version}{marker}: {counts.get(version, 0)} data keys{missing}")


@keys.command("rotate")
@click.option("--batch-size", default=500, show_default=True, type=int)
def keys_rotate(batch_size: int) -> None:
    """Make a new KEK active and rewrap every data key (resumes an interrupted rotation)."""
    # A long job commits per batch at the command layer; the service only flushes.
    result = key_service.rotate(
        db.session,
        actor=SYSTEM,
        meta=NO_REQUEST,
        checkpoint=db.session.commit,
        batch_size=batch_size,
    )
    verb = "resumed rotation to" if result.resumed else "rotated to"
    click.echo(f"{verb} KEK v{result.version}: {result.rewrapped} data keys rewrapped")
    if result.failed:
        ids = ", ".join(str(key_id) for key_id in result.failed)
        click.echo(
            f"portal: {len(result.failed)} data keys failed authentication (corrupted "
            f"or altered) and stay under their old KEK; restore them from a backup, "
            f"then run 'portal keys rotate' again. Data key ids: {ids}",
            err=True,
        )
        sys.exit(1)  # every batch (and each failure's audit event) is already committed
    if result.left:
        click.echo(
            f"portal: {result.left} data keys were held by other transactions and "
            f"stay under an older KEK; run 'portal keys rotate' again.",
            err=True,
        )
        sys.exit(1)


@keys.command("remove")
@click.argument("version", type=int)
def keys_remove(version: int) -> None:
    """Delete an old KEK version once no data key is wrapped by it."""
    try:
        key_service.remove_kek(db.session, version)
    except ServiceError as error:
        click.echo(f"portal: {error}", err=True)
        sys.exit(1)
    click.echo(f"removed KEK v{version}")
