"""``portal users ...``."""

from __future__ import annotations

import sys
from datetime import date

import click

from portal.audit import NO_REQUEST, SYSTEM
from portal.commands.base import CommandGroup
from portal.extensions import db
from portal.services import accounts
from portal.services.errors import ServiceError

users = CommandGroup("users", help="Accounts.")


@users.command("create")
@click.option("--role", required=True, type=click.Choice(["patient", "staff", "auditor", "admin"]))
@click.option("--email", required=True)
@click.option("--name", required=True)
@click.option(
    "--dob",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    help="Date of birth (patients), YYYY-MM-DD.",
)
@click.option(
    "--access-code",
    is_flag=True,
    help="Generate an access code, printed once, to hand over out of band.",
)
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def users_create(
    role: str, email: str, name: str, dob: object, access_code: bool, password_stdin: bool
) -> None:
    """Create an account. Without --password-stdin the person sets one by invite or pickup."""
    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else None
    # mypy: click.DateTime gives a datetime; the parameter is declared object by click's
    #   decorator.
    birth: date | None = dob.date() if dob is not None else None  # type: ignore[attr-defined]
    try:
        created = accounts.create_user(
            db.session,
            role=role,
            email=email,
            name=name,
            dob=birth,
            issue_access_code=access_code,
            password=password,
            actor=SYSTEM,
            meta=NO_REQUEST,
        )
    except ServiceError as error:
        click.echo(f"portal: {error}", err=True)
        sys.exit(1)
    click.echo(f"created {role} {created.user.public_id}")
    if created.access_code:
        click.echo(f"access code (shown once): {created.access_code}")
