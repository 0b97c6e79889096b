"""``portal messages send``: send a message (and PDFs) from a script or an EHR export."""

from __future__ import annotations

import re
import sys
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import click

from portal.audit import NO_REQUEST, SYSTEM, actor_of
from portal.commands.base import CommandGroup
from portal.extensions import db
from portal.services import accounts, content, messaging, teams, upload_scans
from portal.services.errors import ServiceError
from portal.services.messages import Upload


def parse_expiry(raw: str | None) -> timedelta | None:
    """Return ``7d``, ``36h`` or ``90m`` as a timedelta (None: the default); BadParameter else."""
    if raw is None:
        return None
    match = re.fullmatch(r"(\d+)([dhm])", raw.strip())
    if not match:
        raise click.BadParameter("use a number of days, hours or minutes: 7d, 36h, 90m")
    unit = {"d": "days", "h": "hours", "m": "minutes"}[match.group(2)]
    return timedelta(**{unit: int(match.group(1))})


messages = CommandGroup("messages", help="Messages.")


@messages.command("send")
@click.option("--from", "sender_email", required=True, help="Sending staff member's email.")
@click.option("--to", "recipient_email", required=True, help="Patient's email.")
@click.option("--subject", required=True)
@click.option("--body", default=None)
@click.option("--body-file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--markdown", is_flag=True, help="The body is Markdown (rendered sanitised).")
@click.option(
    "--attach", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--expires-in", default=None, help="7d (default: PORTAL_LINK_TTL), 36h, 90m.")
@click.option(
    "--team", "team_name", default=None, help="Care team it is from (when the sender has several)."
)
def send(
    sender_email: str,
    recipient_email: str,
    subject: str,
    body: str | None,
    body_file: Path | None,
    markdown: bool,
    attach: tuple[Path, ...],
    expires_in: str | None,
    team_name: str | None,
) -> None:
    """Send a message; the patient gets a PHI-free notice with a pickup link."""
    if (body is None) == (body_file is None):
        raise click.UsageError("give exactly one of --body or --body-file")
    # mypy: click enforces --body or --body-file; body_file is a Path when body is None.
    text = body if body is not None else body_file.read_text(encoding="utf-8")  # type: ignore[union-attr]
    sender = accounts.find_by_email(db.session, sender_email)
    with ExitStack() as files:
        uploads = [Upload(p.name, files.enter_context(p.open("rb"))) for p in attach]
        staging = messaging.ATTACHMENTS.start(content.blob_store())  # scanned as the web's
        files.callback(staging.discard)  # what was staged and not kept
        actor = actor_of(sender) if sender is not None else SYSTEM
        try:
            if sender is None:
                raise ServiceError("No staff account has that --from address.")
            team = teams.find_by_name(db.session, team_name) if team_name else None
            if team_name and team is None:
                raise ServiceError("No care team has that --team name.")
            sent = messaging.send(
                db.session,
                sender=sender,
                recipient=messaging.recipient_for(db.session, recipient_email),
                subject=subject,
                body=text,
                body_format="markdown" if markdown else "text",
                uploads=uploads,
                staged=staging,
                expires_in=parse_expiry(expires_in),
                team=team,
                meta=NO_REQUEST,
            )
        except ServiceError as refused:
            # The refused send rolls back, but the scan verdicts (malware turned away) are
            # kept: committed here, as the command's exit would roll them back.
            db.session.rollback()
            if upload_scans.record_staging(db.session, staging, actor=actor):
                db.session.commit()
            click.echo(f"portal: {refused}", err=True)
            sys.exit(1)
        upload_scans.record_staging(db.session, staging, actor=actor)
    click.echo(f"sent message {sent.message.public_id}; the notice is queued for the notifier")
