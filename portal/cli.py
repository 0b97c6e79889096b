"""The ``portal`` command (DESIGN.md's contract). Each command runs in its own app context."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import click
from flask import Flask

from portal.config import ConfigError


def make_app(overrides: dict[str, Any] | None = None) -> Flask:
    """Return the app, or exit 2 with the one-line settings error."""
    from portal import create_app

    try:
        return create_app(overrides)
    except ConfigError as error:
        click.echo(f"portal: configuration error: {error}", err=True)
        sys.exit(2)


def with_app(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run a click command inside an app context; commit on success, roll back on error."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from portal.extensions import db

        app = make_app()
        with app.app_context():
            try:
                result = func(app, *args, **kwargs)
                db.session.commit()
                return result
            except BaseException:
                db.session.rollback()
                raise

    return wrapper


@click.group()
def main() -> None:
    """Pickup Portal: secure patient messages."""


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@with_app
def db_upgrade(app: Flask) -> None:
    """Apply migrations up to head."""
    from portal.extensions import db as database
    from portal.migrate import schema_state, upgrade

    upgrade(database.engine)
    click.echo(f"database at revision {schema_state(database.engine)[0]}")


# Without a noted head, deleting the newest events and rewinding the head row leaves a chain
# that verifies: only a head kept off this system shows the cut.
UNANCHORED = ("unanchored: events cut from the newest end would not show; note the head above "
              "off this system and pass it with --from-head next time")


@main.group()
def audit() -> None:
    """The audit trail."""


@audit.command("verify")
@click.option("--from-head", "from_head", default=None, metavar="HASH",
              help="Also require this previously noted head hash to still be in the trail.")
@click.option("--jobs", default=min(os.cpu_count() or 1, 4), show_default=True, type=int,
              help="Processes that check parts of a large PostgreSQL trail at once.")
@with_app
def audit_verify(app: Flask, from_head: str | None, jobs: int) -> None:
    """Walk the hash chain: exit 0 when intact, 1 and the first bad event otherwise."""
    from portal import audit as trail
    from portal.extensions import db as database
    from portal.services import audit_query
    from portal.services.errors import ServiceError

    try:
        result = (audit_query.verify_from_head(database.session, from_head)
                  if from_head is not None else trail.verify_parallel(database.session, jobs))
    except ServiceError as error:
        click.echo(f"portal: {error}", err=True)
        sys.exit(2)
    if result.ok:
        when = result.head_time.isoformat() if result.head_time else "-"
        click.echo(f"audit trail intact: {result.count} events, head {result.head_hash} at {when}")
        click.echo(f"anchored: the noted head {from_head.strip()[:12]} is in the trail"
                   if from_head is not None else UNANCHORED)
        return
    where = f" at event {result.bad_seq}" if result.bad_seq is not None else ""
    click.echo(f"audit trail BROKEN{where}: {result.problem} "
               f"({result.count} events verified before it)", err=True)
    sys.exit(1)


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--workers", default=None, type=click.IntRange(1, 64),
              help="Worker processes [default: 2 with PORTAL_REDIS_URL, else 1].")
def serve(host: str, port: int, workers: int | None) -> None:
    """Run the portal under gunicorn (production WSGI server)."""
    app = make_app()  # fail fast, with the one-line settings error, before forking workers
    shared = bool(app.config["REDIS_URL"])
    workers = workers or (2 if shared else 1)
    if workers > 1 and not shared:
        # In-memory rate-limit counters live in each process: N workers would allow N times
        # the attempts (ASVS 2.2.1). Redis shares them.
        click.echo(f"portal: configuration error: --workers {workers} needs PORTAL_REDIS_URL "
                   "(rate limits are counted per process without it); set PORTAL_REDIS_URL "
                   "or run one worker", err=True)
        sys.exit(2)
    from portal.server import gunicorn_trusted, run_gunicorn

    run_gunicorn(host, port, workers,
                 forwarded_allow_ips=gunicorn_trusted(app.config["TRUSTED_PROXIES"]))


def _load_commands() -> None:
    # Command modules attach themselves to ``main`` on import.
    from portal.commands import (  # noqa: F401
        audit_export,
        backup,
        demo,
        keys,
        messages,
        retention,
        users,
    )


_load_commands()
