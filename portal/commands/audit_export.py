"""``portal audit export --format csv|json|fhir [--since] [--until] [--patient] [-o FILE]``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import IO, Any

import click
from sqlalchemy.orm import Session

from portal.audit import NO_REQUEST, SYSTEM
from portal.commands.base import command
from portal.extensions import db
from portal.files import OutputError, OutputExists, open_output
from portal.models import Role
from portal.services import accounts, audit_query
from portal.services import audit_export as exporter
from portal.services.errors import ServiceError

FILE_MODE = 0o600  # an export names patients: readable by its owner only


@command("export")
@click.option(
    "--format",
    "fmt",
    required=True,
    type=click.Choice(["csv", "json", "fhir"]),
    help="csv, json (JSON Lines, one event a line) or fhir (R4 Bundle of AuditEvents).",
)
@click.option("--since", default=None, metavar="YYYY-MM-DD", help="From this day (UTC).")
@click.option(
    "--until", default=None, metavar="YYYY-MM-DD", help="Before this day (UTC, exclusive)."
)
@click.option(
    "--patient",
    "patient_email",
    default=None,
    metavar="EMAIL",
    help="Only events about this patient.",
)
@click.option(
    "-o",
    "--output",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write to FILE (created mode 0600) instead of standard output; "
    "a FIFO or device is written as it is.",
)
@click.option("--force", is_flag=True, help="Replace FILE if it already exists.")
def audit_export(
    fmt: str,
    since: str | None,
    until: str | None,
    patient_email: str | None,
    output: str | None,
    force: bool,
) -> None:
    """Export audit events, oldest first, streaming (memory stays flat)."""
    try:
        patient_id = _patient_id(db.session, patient_email)
        flt = audit_query.from_args(patient_id=patient_id, since=since, until=until)
    except ServiceError as error:
        click.echo(f"portal: {error}", err=True)
        sys.exit(1)

    def record() -> None:
        # Recorded and committed once the output is open and before the first row leaves, as
        # a web export does: a failure mid-stream (a full disk, EPIPE from `| head`, Ctrl-C)
        # never rolls back the record of a disclosure that may have happened, and a refused
        # output records none. The early commit also frees the chain's head row, which an
        # open audit write would hold locked for the whole export.
        exporter.record_export(db.session, flt, fmt, SYSTEM, NO_REQUEST)
        db.session.commit()

    if output is None:
        record()
        _write(exporter.export(db.session, flt, fmt), sys.stdout)
    else:
        _write_file(lambda: exporter.export(db.session, flt, fmt), output, force, record)


def _patient_id(session: Session, email: str | None) -> int | None:
    """Return the id of the patient with ``email``; ServiceError (not echoing it) when none."""
    if email is None:
        return None
    user = accounts.find_by_email(session, email)
    if user is None or user.role != Role.PATIENT:
        raise ServiceError("no patient with that email")
    return user.id


def _write_file(
    chunks: Callable[[], Iterable[str]], path: str, force: bool, opened: Callable[[], None]
) -> None:
    """Write to a new 0600 file (or a FIFO/device as it is), calling ``opened`` once it is
    open; exit 1 when ``path`` is refused."""
    try:
        with open_output(path, replace=force, mode=FILE_MODE, encoding="utf-8") as sink:
            opened()
            _write(chunks(), sink)
    except OutputExists as error:
        click.echo(f"portal: {error}; use --force to replace it", err=True)
        sys.exit(1)
    except OutputError as error:
        click.echo(f"portal: {error}", err=True)
        sys.exit(1)
    except OSError as error:
        click.echo(f"portal: cannot write {path}: {error.strerror}", err=True)
        sys.exit(1)


def _write(chunks: Iterable[str], sink: IO[Any]) -> None:
    for chunk in chunks:
        sink.write(chunk)
    sink.flush()
