"""``portal retention run``: housekeeping that keeps storage honest."""

from __future__ import annotations

import click
from flask import current_app

from portal import audit
from portal.audit import NO_REQUEST, SYSTEM, Action
from portal.commands.base import CommandGroup
from portal.extensions import db
from portal.services import content, signin

retention = CommandGroup("retention", help="Retention and clean-up.")


@retention.command("run")
def retention_run() -> None:
    """Delete orphan blobs (written by transactions that never committed), partial uploads
    of killed writers and expired sessions."""
    partial = content.sweep_partial_uploads()
    removed = content.sweep_orphans(db.session)
    sessions = signin.purge_expired_sessions(
        db.session, current_app.config["SESSION_IDLE"], current_app.config["SESSION_LIFETIME"]
    )
    audit.record(
        db.session,
        Action.RETENTION_RUN,
        actor=SYSTEM,
        meta=NO_REQUEST,
        details={
            "orphan_blobs_removed": removed,
            "sessions_removed": sessions,
            "partial_uploads_removed": partial,
        },
    )
    click.echo(
        f"retention: {removed} orphan blobs removed, {partial} partial uploads removed, "
        f"{sessions} expired sessions removed"
    )
