"""``portal serve [--host H] [--port P] [--workers N] [--threads N] [--download-slots N]``:
the portal under gunicorn, sized by flags or by PORTAL_WEB_WORKERS, PORTAL_WEB_THREADS and
PORTAL_DOWNLOAD_SLOTS (README "Serving: workers, threads and download slots")."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import click
from flask import current_app
from flask.cli import with_appcontext

from portal.config import SETTINGS, ConfigError, download_slots

_SETTING = {setting.env: setting for setting in SETTINGS}


@dataclass(frozen=True)
class Sizing:
    """How many processes and threads serve, and how many threads per worker may stream."""

    workers: int
    threads: int
    download_slots: int


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
@click.option(
    "--workers",
    metavar="N",
    help="Worker processes [default: PORTAL_WEB_WORKERS, else 2 with PORTAL_REDIS_URL, else 1].",
)
@click.option(
    "--threads", metavar="N", help="Threads per worker [default: PORTAL_WEB_THREADS, else 16]."
)
@click.option(
    "--download-slots",
    metavar="N",
    help="Threads per worker that may stream downloads at once; the rest serve pages and "
    "health checks [default: PORTAL_DOWNLOAD_SLOTS, else threads minus 4].",
)
@with_appcontext  # the app is built (settings checked, one-line error) before workers fork
def serve(
    host: str,
    port: int,
    workers: str | None,
    threads: str | None,
    download_slots: str | None,
) -> None:
    """Run the portal under gunicorn (production WSGI server)."""
    try:
        sizing = _sizing(workers, threads, download_slots)
    except ConfigError as error:
        click.echo(f"portal: configuration error: {error}", err=True)
        sys.exit(2)
    # The workers build their own app from the environment after the fork: hand them the
    # sizing this command settled on (their pools and download slots follow it).
    os.environ["PORTAL_WEB_THREADS"] = str(sizing.threads)
    os.environ["PORTAL_DOWNLOAD_SLOTS"] = str(sizing.download_slots)
    # Deferred on purpose: gunicorn is imported by the one command that runs it, not by
    # every app (create_app registers this command) nor every other command.
    from portal.server import gunicorn_trusted, run_gunicorn

    run_gunicorn(
        host,
        port,
        workers=sizing.workers,
        threads=sizing.threads,
        forwarded_allow_ips=gunicorn_trusted(current_app.config["TRUSTED_PROXIES"]),
    )


def _sizing(workers: str | None, threads: str | None, slots: str | None) -> Sizing:
    """Return the sizing: each flag, else its setting, else the default. Raises ConfigError
    naming the flag or setting at fault."""
    config = current_app.config
    chosen_workers = _flag("--workers", workers, "PORTAL_WEB_WORKERS") or config["WEB_WORKERS"]
    chosen_threads = _flag("--threads", threads, "PORTAL_WEB_THREADS") or config["WEB_THREADS"]
    threads_name = "--threads" if threads is not None else "PORTAL_WEB_THREADS"
    slots_name = "--download-slots" if slots is not None else "PORTAL_DOWNLOAD_SLOTS"
    if slots is None and threads is None:
        chosen_slots = config["DOWNLOAD_SLOTS"]  # settled (and checked) with the settings
    else:  # --threads alone: an explicit PORTAL_DOWNLOAD_SLOTS, else the default for it
        raw = slots if slots is not None else os.environ.get("PORTAL_DOWNLOAD_SLOTS") or None
        chosen_slots = _flag(slots_name, raw, "PORTAL_DOWNLOAD_SLOTS")
    resolved_slots = download_slots(
        chosen_threads, chosen_slots, threads_name=threads_name, slots_name=slots_name
    )
    return Sizing(_workers(chosen_workers, workers), chosen_threads, resolved_slots)


def _flag(name: str, raw: str | None, setting: str) -> int | None:
    """Return ``raw`` parsed as ``setting`` is (same range), errors naming ``name``."""
    if raw is None:
        return None
    value: int = _SETTING[setting].parse(name, raw)
    return value


def _workers(chosen: int | None, flag: str | None) -> int:
    shared = bool(current_app.config["REDIS_URL"])
    workers = chosen or (2 if shared else 1)
    if workers > 1 and not shared:
        # In-memory rate-limit counters live in each process: N workers would allow N times
        # the attempts (ASVS 2.2.1). Redis shares them.
        source = f"--workers {workers}" if flag is not None else f"PORTAL_WEB_WORKERS={workers}"
        raise ConfigError(
            f"{source} needs PORTAL_REDIS_URL (rate limits are counted per process without "
            "it); set PORTAL_REDIS_URL or run one worker"
        )
    return workers
