"""``portal retention run``: housekeeping that keeps storage honest."""

from __future__ import annotations

import click
from flask import Flask

from portal import audit
from portal.audit import NO_REQUEST, SYSTEM, Action
from portal.cli import main, with_app


@main.group()
def retention() -> None:
    """Retention and clean-up."""


@retention.command("run")
@with_app
def retention_run(app: Flask) -> None:
    """Delete orphan blobs (written by transactions that never committed), stale temp files
    and expired sessions."""
    from portal.extensions import db
    from portal.services import content, signin

    removed = content.sweep_orphans(db.session)
    sessions = signin.purge_expired_sessions(db.session, app.config["SESSION_IDLE"],
                                             app.config["SESSION_LIFETIME"])
    audit.record(db.session, Action.RETENTION_RUN, actor=SYSTEM, meta=NO_REQUEST,
                 details={"orphan_blobs_removed": removed, "sessions_removed": sessions})
    click.echo(f"retention: {removed} orphan blobs removed, {sessions} expired sessions removed")
