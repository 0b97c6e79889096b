"""Test databases: the PostgreSQL URL from the environment and a migrated template per backend.

SQLite: each test copies a migrated template file. PostgreSQL: a schema of its own per
test process (so per xdist worker), emptied between tests and dropped at the end.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from portal.database import Base, make_engine
from portal.migrate import upgrade

# Read at import, before tests/conftest.py removes the developer's PORTAL_* settings.
PG_URL = os.environ.get("PORTAL_TEST_DATABASE_URL")
REDIS_URL = os.environ.get("PORTAL_TEST_REDIS_URL")
BACKENDS = ["sqlite", *(["postgresql"] if PG_URL else [])]


def pg_url(schema: str | None = None) -> str:
    """Return the PostgreSQL test URL with the psycopg driver, optionally pinned to ``schema``."""
    assert PG_URL, "PORTAL_TEST_DATABASE_URL is not set"
    url = make_url(PG_URL).set(drivername="postgresql+psycopg")
    if schema:
        url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


class Template:
    """A migrated database that each test starts from."""

    def __init__(self, backend: str, root: Path) -> None:
        self.backend = backend
        self.root = root
        self.schema = f"pp_test_{secrets.token_hex(6)}"
        if backend == "sqlite":
            self.path = root / "template.db"
            self._migrate(f"sqlite:///{self.path}")
        else:
            admin = create_engine(pg_url(), isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.execute(text(f'CREATE SCHEMA "{self.schema}"'))
            admin.dispose()
            self._migrate(pg_url(self.schema))

    @staticmethod
    def _migrate(url: str) -> None:
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()

    def fresh(self, tmp_path: Path) -> str:
        """Return the URL of a clean, migrated database for one test."""
        if self.backend == "sqlite":
            target = tmp_path / "portal.database"
            shutil.copy(self.path, target)
            return f"sqlite:///{target}"
        url = pg_url(self.schema)
        self._empty(url)
        return url

    @staticmethod
    def _empty(url: str) -> None:
        engine = create_engine(url)
        tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
        with engine.begin() as connection:
            # replica role: the append-only trigger does not fire for this cleanup.
            connection.execute(text("SET LOCAL session_replication_role = replica"))
            connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
            connection.execute(
                text("INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, :h)"), {"h": "0" * 64}
            )
        engine.dispose()

    def drop(self) -> None:
        """Remove what the template created."""
        if self.backend == "postgresql":
            admin = create_engine(pg_url(), isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.execute(text(f'DROP SCHEMA "{self.schema}" CASCADE'))
            admin.dispose()


@contextlib.contextmanager
def own_schema(prefix: str) -> Iterator[str]:
    """Yield the URL of a new, empty PostgreSQL schema (``prefix`` + random), dropped after:
    for a server process that migrates it itself and must not share the tests' schema."""
    schema = f"{prefix}_{secrets.token_hex(6)}"
    admin = create_engine(pg_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield pg_url(schema)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
