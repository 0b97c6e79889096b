"""The ``notifier`` command: ``notifier run [--once]``, ``notifier status``, ``notifier bounces``
and ``notifier sink``.

Each command imports what it needs when it runs: ``notifier run`` never loads the mail
sink (aiosmtpd, certificate generation) nor the web app, and ``notifier sink`` never
loads the worker or the database (README "Notifier throughput": start-up).
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from flask import Flask

    from notifier.health_server import HealthServer


class LazyGroup(click.Group):
    """A click group whose commands named in ``lazy`` (name -> "module:attribute") are
    imported only when that command is run or listed (click's documented pattern)."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        """All command names, the lazy ones included, sorted."""
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command ``cmd_name``, importing its module first if it is a lazy one."""
        if cmd_name not in self._lazy:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = self._lazy[cmd_name].partition(":")
        command = getattr(importlib.import_module(module), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{self._lazy[cmd_name]} is not a click command")
        return command


def default_worker_id() -> str:
    """Return ``host:pid``, which names this worker in ``claimed_by`` (64 characters at most)."""
    return f"{socket.gethostname()}:{os.getpid()}"[-64:]


@click.group(cls=LazyGroup, lazy={"sink": "notifier.sink:sink_command"})
def main() -> None:
    """Pickup Portal notifier: sends PHI-free notices from the outbox."""


def _worker_id(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Check --worker-id as PORTAL_NOTIFIER_WORKER_ID is checked."""
    from portal.config import ConfigError, parse_worker_id

    if value is None:
        return None
    try:
        return parse_worker_id("--worker-id", value)
    except ConfigError as error:
        raise click.BadParameter(str(error).removeprefix("--worker-id: ")) from None


@main.command("run")
@click.option("--once", is_flag=True, help="Send until no notice is due, then exit.")
@click.option(
    "--worker-id",
    default=None,
    callback=_worker_id,
    help="Name in claimed_by, for one running worker at a time; a stable one (a restarted "
    "worker takes its own notices back at once) [default: PORTAL_NOTIFIER_WORKER_ID, "
    "else host:pid].",
)
@click.option(
    "--health-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve GET /health (JSON; 503 when unhealthy) on this port (0: any free one).",
)
@click.option(
    "--health-host", default="127.0.0.1", show_default=True, help="Address of --health-port."
)
def run(once: bool, worker_id: str | None, health_port: int | None, health_host: str) -> None:
    """Send due notices: forever (until SIGTERM), or with --once until none is due.

    --once exits 1 when the mail relay could not be used (the notices stay queued).
    """
    if once and health_port is not None:
        raise click.UsageError("--health-port is for a running worker, not --once")
    # Deferred on purpose: `notifier sink` (the demo's and the tests' mail server) needs
    # neither the worker nor the portal app, so only `notifier run` imports them.
    from notifier import worker
    from portal.cli import load_worker_app
    from portal.config import settings_of

    app = load_worker_app()
    name = worker_id or settings_of(app).notifier_worker_id or default_worker_id()
    if once:
        stats = worker.drain(app, name)
        worker.TransportAlarm().update(stats.transport_error, stats.delayed)  # one log line
        click.echo(f"sent {stats.sent}, failed {stats.failed}, retrying {stats.retrying}")
        if stats.transport_error is not None:
            sys.exit(1)
        return
    server = _serve_health(app, name, health_host, health_port)
    try:
        worker.run_forever(app, name)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()


def _serve_health(app: Flask, name: str, host: str, port: int | None) -> HealthServer | None:
    """Start the health endpoint when a port is given; exit 1 with one line if it cannot."""
    if port is None:
        return None
    from notifier import health_server

    try:
        server = health_server.start(app, name, host, port)
    except OSError as error:
        raise click.ClickException(
            f"--health-port: cannot listen on {host}:{port}: {error.strerror or error}"
        ) from None
    click.echo(f"health endpoint on http://{host}:{server.server_address[1]}/health")
    return server


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the health endpoint's JSON.")
def status(as_json: bool) -> None:
    """Show each worker's last pass and heartbeat, the queue depth, the oldest due notice
    and the last transport error; exit 1 when unhealthy (no live worker, a current
    transport error, the database unreachable)."""
    from notifier import health
    from portal.cli import load_worker_app
    from portal.database import utcnow

    found = health.read(load_worker_app(), utcnow())
    if as_json:
        click.echo(json.dumps(found.as_dict(), indent=2, sort_keys=True))
    else:
        click.echo(health.render_text(found))
    sys.exit(1 if found.problems() else 0)


@main.command("bounces")
def bounces_command() -> None:
    """Read the bounce Maildir (PORTAL_BOUNCE_MAILDIR) once: record each delivery status
    notification on its notice, then flag it handled or kept aside."""
    # Deferred, as `run` is: only this command needs the database here.
    from notifier import bounces
    from portal.cli import load_worker_app
    from portal.config import settings_of
    from portal.database import utcnow
    from portal.extensions import db

    app = load_worker_app()
    with app.app_context():
        try:
            stats = bounces.process(db.session, settings_of(app), utcnow())
        except bounces.BounceMaildirError as err:
            raise click.ClickException(str(err)) from None
    click.echo(stats.summary())
