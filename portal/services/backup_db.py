"""Database snapshots for ``portal backup`` and ``portal restore``.

SQLite: the online backup API (``sqlite3.Connection.backup``) copies a
consistent image while the portal keeps running. PostgreSQL: ``pg_dump
--format=custom`` of the portal's schema inside a REPEATABLE READ, READ ONLY
transaction whose snapshot is exported (``pg_export_snapshot``), so the list of
referenced blobs read here and the dump see exactly the same data.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, create_engine, select, text
from sqlalchemy.engine import make_url

from portal.models import Attachment, DataKey, Message
from portal.services.errors import ServiceError

SQLITE_FILE = "database.sqlite3"
PG_FILE = "database.pgdump"
FILE_MODE = 0o600
_SCHEMA_ENTRY = re.compile(r"^\d+; \d+ \d+ (?:SCHEMA - |COMMENT - SCHEMA )(\S+) ")


@dataclass(frozen=True)
class Snapshot:
    """What a database snapshot holds: its file, schema revision, live blobs and KEK versions."""

    file: str
    revision: str | None
    blob_ids: list[str]
    kek_versions: list[int]
    pg_schema: str | None = None


def create_private(path: Path) -> int:
    """Return a write descriptor of the new file ``path`` (mode 0600, O_EXCL, no symlink).

    Raises FileExistsError when ``path`` exists: a path we did not create is never touched.
    """
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)


def contents(connection: Connection) -> tuple[str | None, list[str], list[int]]:
    """Return (schema revision, blob ids of live attachments, KEK versions of live data keys).

    Attachments of shredded messages are left out: their blobs are deleted once
    the shredding commits, and without the data key they are unreadable anyway.
    """
    revision = MigrationContext.configure(connection).get_current_revision()
    blob_ids = connection.scalars(
        select(Attachment.blob_id)
        .join(Message, Message.id == Attachment.message_id)
        .where(Message.destroyed_at.is_(None))
        .order_by(Attachment.blob_id)
    )
    versions = connection.scalars(
        select(DataKey.kek_version).where(DataKey.wrapped.is_not(None)).distinct()
    )
    return revision, list(blob_ids), sorted(int(v) for v in versions)


# SQLite ----------------------------------------------------------------------------------


def sqlite_path(url: str) -> Path:
    """Return the database file of a SQLite ``url``; ServiceError for an in-memory database."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        raise ServiceError("backup and restore need a SQLite database file")
    return Path(database)


def snapshot_sqlite(url: str, folder: Path) -> Snapshot:
    """Copy the live SQLite database into ``folder`` (online backup API); return its Snapshot."""
    target = folder / SQLITE_FILE
    os.close(create_private(target))
    source = sqlite3.connect(sqlite_path(url), timeout=30)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
        copy.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, no -wal beside it
    finally:
        copy.close()
        source.close()
    engine = create_engine(f"sqlite:///file:{target}?mode=ro&uri=true")
    try:
        with engine.connect() as connection:
            revision, blob_ids, versions = contents(connection)
    finally:
        engine.dispose()
    return Snapshot(SQLITE_FILE, revision, blob_ids, versions)


def sqlite_is_empty(url: str) -> bool:
    """Return whether the SQLite database of ``url`` is absent or has no tables."""
    path = sqlite_path(url)
    if not path.exists():
        return True
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]) == 0
    finally:
        connection.close()


def restore_sqlite(url: str, snapshot: Path) -> None:
    """Copy ``snapshot`` into the (empty) SQLite database of ``url``, created 0600 if absent."""
    path = sqlite_path(url)
    if not path.exists():
        os.close(create_private(path))
    source = sqlite3.connect(f"file:{snapshot}?mode=ro", uri=True)
    target = sqlite3.connect(path, timeout=30)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()


# PostgreSQL ------------------------------------------------------------------------------


def _libpq(url: str) -> tuple[str, dict[str, str]]:
    """Return a libpq URI without the password, and an environment carrying it (not argv)."""
    parsed = make_url(url)
    env = dict(os.environ)
    if parsed.password:
        env["PGPASSWORD"] = str(parsed.password)
    bare = parsed.set(drivername="postgresql", password=None)
    return bare.render_as_string(hide_password=False), env


def _run(args: list[str], env: dict[str, str], stdout: int) -> str:
    """Run a PostgreSQL client tool; return its stdout text; ServiceError with its last error."""
    try:
        # A fixed program and our own arguments, never a shell.
        done = subprocess.run(args, env=env, stdout=stdout, stderr=subprocess.PIPE, check=False)
    except FileNotFoundError:
        raise ServiceError(f"{args[0]} not found: install the PostgreSQL client tools") from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines() or ["no output"]
        raise ServiceError(f"{args[0]} failed: {lines[-1]}")
    return done.stdout.decode() if isinstance(done.stdout, bytes) else ""


@contextmanager
def _exported_snapshot(engine: Engine) -> Iterator[tuple[Connection, str]]:
    """Yield a REPEATABLE READ, READ ONLY connection and the id of its exported snapshot."""
    with engine.connect().execution_options(
        isolation_level="REPEATABLE READ", postgresql_readonly=True
    ) as connection:
        snapshot_id = connection.execute(text("SELECT pg_export_snapshot()")).scalar_one()
        yield connection, str(snapshot_id)
        connection.rollback()


def _quoted(schema: str) -> str:
    return '"' + schema.replace('"', '""') + '"'


def snapshot_postgresql(engine: Engine, url: str, folder: Path) -> Snapshot:
    """Dump the portal's schema (``pg_dump --format=custom``) into ``folder``; return its Snapshot.

    Raises ServiceError when pg_dump is missing or fails.
    """
    uri, env = _libpq(url)
    target = folder / PG_FILE
    with _exported_snapshot(engine) as (connection, snapshot_id):
        schema = str(connection.execute(text("SELECT current_schema()")).scalar_one())
        revision, blob_ids, versions = contents(connection)
        fd = create_private(target)
        try:
            _run(
                [
                    "pg_dump",
                    "--format=custom",
                    f"--schema={_quoted(schema)}",
                    f"--snapshot={snapshot_id}",
                    "--no-password",
                    f"--dbname={uri}",
                ],
                env,
                fd,
            )
        finally:
            os.close(fd)
    return Snapshot(PG_FILE, revision, blob_ids, versions, pg_schema=schema)


def pg_target_schema(engine: Engine) -> tuple[str | None, int]:
    """Return the target's current schema (None if its search_path names none) and its relations."""
    with engine.connect() as connection:
        schema = connection.execute(text("SELECT current_schema()")).scalar()
        count = connection.execute(
            text(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = current_schema()"
            )
        ).scalar_one()
    return schema, int(count)


def restore_postgresql(url: str, dump: Path, schema: str) -> None:
    """Load ``dump`` into the existing, empty ``schema`` of ``url`` in one transaction.

    Owners and grants are not restored (re-apply the README's role grants).
    Raises ServiceError when pg_restore fails; nothing is then written.
    """
    uri, env = _libpq(url)
    listing = _run(["pg_restore", "--list", str(dump)], env, subprocess.PIPE)
    # The schema exists already (the target's, possibly owned by someone else): skip its
    # CREATE SCHEMA and COMMENT ON SCHEMA entries.
    kept = [
        line
        for line in listing.splitlines()
        if (m := _SCHEMA_ENTRY.match(line)) is None or m.group(1) != schema
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".list", encoding="utf-8") as toc:
        toc.write("\n".join(kept) + "\n")
        toc.flush()
        _run(
            [
                "pg_restore",
                "--no-owner",
                "--no-privileges",
                "--exit-on-error",
                "--single-transaction",
                "--no-password",
                f"--use-list={toc.name}",
                f"--dbname={uri}",
                str(dump),
            ],
            env,
            subprocess.DEVNULL,
        )
