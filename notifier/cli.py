"""The ``notifier`` command: ``notifier run [--once]`` and ``notifier sink``."""

from __future__ import annotations

import os
import socket

import click

from notifier.sink import sink_command


def default_worker_id() -> str:
    """Return ``host:pid``, which names this worker in ``claimed_by`` (64 characters at most)."""
    return f"{socket.gethostname()}:{os.getpid()}"[-64:]


@click.group()
def main() -> None:
    """Pickup Portal notifier: sends PHI-free notices from the outbox."""


@main.command("run")
@click.option("--once", is_flag=True, help="Send until no notice is due, then exit.")
@click.option("--worker-id", default=None, help="Name in claimed_by [default: host:pid].")
def run(once: bool, worker_id: str | None) -> None:
    """Send due notices: forever (until SIGTERM), or with --once until none is due."""
    # Deferred on purpose: `notifier sink` (the demo's and the tests' mail server) needs
    # neither the worker nor the portal app, so only `notifier run` imports them.
    from notifier import worker
    from portal.cli import load_app

    app = load_app()
    name = worker_id or default_worker_id()
    if once:
        stats = worker.drain(app, name)
        click.echo(f"sent {stats.sent}, failed {stats.failed}, retrying {stats.retrying}")
        return
    worker.run_forever(app, name)


main.add_command(sink_command, "sink")
