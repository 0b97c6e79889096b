"""``portal serve [--host H] [--port P] [--workers N]``: the portal under gunicorn."""

from __future__ import annotations

import sys

import click
from flask import current_app
from flask.cli import with_appcontext


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(1, 64),
    help="Worker processes [default: 2 with PORTAL_REDIS_URL, else 1].",
)
@with_appcontext  # the app is built (settings checked, one-line error) before workers fork
def serve(host: str, port: int, workers: int | None) -> None:
    """Run the portal under gunicorn (production WSGI server)."""
    shared = bool(current_app.config["REDIS_URL"])
    workers = workers or (2 if shared else 1)
    if workers > 1 and not shared:
        # In-memory rate-limit counters live in each process: N workers would allow N times
        # the attempts (ASVS 2.2.1). Redis shares them.
        click.echo(
            f"portal: configuration error: --workers {workers} needs PORTAL_REDIS_URL "
            "(rate limits are counted per process without it); set PORTAL_REDIS_URL "
            "or run one worker",
            err=True,
        )
        sys.exit(2)
    # Deferred on purpose: gunicorn is imported by the one command that runs it, not by
    # every app (create_app registers this command) nor every other command.
    from portal.server import gunicorn_trusted, run_gunicorn

    run_gunicorn(
        host,
        port,
        workers,
        forwarded_allow_ips=gunicorn_trusted(current_app.config["TRUSTED_PROXIES"]),
    )
