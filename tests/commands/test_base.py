"""The CLI's commit boundary (portal.commands.base): one commit per command, by mechanism.

Issue 11 item 3: commands are registered on ``app.cli`` by the factory, so they run
under ``app.test_cli_runner()`` on the test's own database (flaskr's pattern).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import click
import pytest
from flask import Flask
from sqlalchemy import func, select

from portal import audit
from portal.audit import NO_REQUEST, SYSTEM, Action
from portal.commands.base import CommandGroup, command
from portal.extensions import db
from portal.models import User
from portal.models.audit import AuditEvent


def _record() -> None:
    audit.record(
        db.session,
        Action.RETENTION_RUN,
        actor=SYSTEM,
        meta=NO_REQUEST,
        details={"orphan_blobs_removed": 0},
    )


def _events(app: Flask) -> int:
    with app.app_context():
        return (
            db.session.scalar(
                select(func.count())
                .select_from(AuditEvent)
                .where(AuditEvent.action == Action.RETENTION_RUN)
            )
            or 0
        )


@pytest.fixture
def probe(app: Flask) -> Flask:
    """The app with a test-only ``probe`` group and ``probe-top`` command that write an
    audit event, then end as told: return, sys.exit(N), a UsageError or a bug."""
    group = CommandGroup("probe")
    group.command("write")(_probe())
    app.cli.add_command(group)
    app.cli.add_command(command("probe-top")(_probe()))
    return app


def _probe() -> Callable[..., None]:
    @click.option("--how", default="return")
    def finish(how: str) -> None:
        _record()
        if how == "exit":
            sys.exit(1)
        if how == "usage":
            raise click.UsageError("refused")
        if how == "bug":
            raise RuntimeError("bug")

    return finish


@pytest.mark.parametrize("args", [["probe", "write"], ["probe-top"]])
def test_a_command_that_returns_commits_its_work(probe: Flask, args: list[str]) -> None:
    result = probe.test_cli_runner().invoke(args=args)
    assert result.exit_code == 0, result.output
    assert _events(probe) == 1


@pytest.mark.parametrize("args", [["probe", "write"], ["probe-top"]])
@pytest.mark.parametrize(("how", "code"), [("exit", 1), ("usage", 2), ("bug", 1)])
def test_a_command_that_fails_commits_nothing(
    probe: Flask, args: list[str], how: str, code: int
) -> None:
    result = probe.test_cli_runner().invoke(args=[*args, "--how", how])
    assert result.exit_code == code
    assert _events(probe) == 0


def test_contract_command_runs_on_the_apps_own_database(app: Flask) -> None:
    runner = app.test_cli_runner()
    made = runner.invoke(
        args=[
            "users",
            "create",
            "--role",
            "staff",
            "--email",
            "cli-base@example.org",
            "--name",
            "Cli Base",
        ]
    )
    assert made.exit_code == 0, made.output
    again = runner.invoke(
        args=[
            "users",
            "create",
            "--role",
            "staff",
            "--email",
            "cli-base@example.org",
            "--name",
            "Cli Base",
        ]
    )
    assert again.exit_code == 1  # refused; the refusal rolled back, the first commit stands
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(User)) == 1
