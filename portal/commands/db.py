"""``portal db upgrade``: apply migrations."""

from __future__ import annotations

import click

from portal.commands.base import CommandGroup
from portal.extensions import db
from portal.migrate import schema_state, upgrade

db_group = CommandGroup("db", help="Database schema.")


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Apply migrations up to head."""
    upgrade(db.engine)
    click.echo(f"database at revision {schema_state(db.engine)[0]}")
