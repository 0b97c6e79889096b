"""``portal audit verify [--from-head HASH]`` and ``portal audit export`` (in audit_export)."""

from __future__ import annotations

import os
import sys

import click

from portal import audit as trail
from portal.commands.audit_export import audit_export
from portal.commands.base import CommandGroup
from portal.extensions import db
from portal.services import audit_query
from portal.services.errors import ServiceError

# Without a noted head, deleting the newest events and rewinding the head row leaves a chain
# that verifies: only a head kept off this system shows the cut.
UNANCHORED = (
    "unanchored: events cut from the newest end would not show; note the head above "
    "off this system and pass it with --from-head next time"
)

audit = CommandGroup("audit", help="The audit trail.")
audit.add_command(audit_export)


@audit.command("verify")
@click.option(
    "--from-head",
    "from_head",
    default=None,
    metavar="HASH",
    help="Also require this previously noted head hash to still be in the trail.",
)
@click.option(
    "--jobs",
    default=min(os.cpu_count() or 1, 4),
    show_default=True,
    type=int,
    help="Processes that check parts of a large PostgreSQL trail at once.",
)
def audit_verify(from_head: str | None, jobs: int) -> None:
    """Walk the hash chain: exit 0 when intact, 1 and the first bad event otherwise."""
    try:
        result = (
            audit_query.verify_from_head(db.session, from_head)
            if from_head is not None
            else trail.verify_parallel(db.session, jobs)
        )
    except ServiceError as error:
        click.echo(f"portal: {error}", err=True)
        sys.exit(2)
    if result.ok:
        when = result.head_time.isoformat() if result.head_time else "-"
        click.echo(f"audit trail intact: {result.count} events, head {result.head_hash} at {when}")
        click.echo(
            f"anchored: the noted head {from_head.strip()[:12]} is in the trail"
            if from_head is not None
            else UNANCHORED
        )
        return
    where = f" at event {result.bad_seq}" if result.bad_seq is not None else ""
    click.echo(
        f"audit trail BROKEN{where}: {result.problem} ({result.count} events verified before it)",
        err=True,
    )
    sys.exit(1)
