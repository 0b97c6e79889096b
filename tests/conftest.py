"""Fixtures: an app on each database (SQLite always, PostgreSQL when configured), clients, CSRF.

Every test gets a clean database: SQLite copies a migrated template file;
PostgreSQL runs in a schema of its own for this test session (dropped at the
end) and is emptied between tests. Two runs never collide.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from portal import create_app
from portal.database import Base, make_engine
from portal.migrate import upgrade

# Every test fails if anything it logged carries PHI, an email address or a token.
pytest_plugins = ["tests.log_guard"]

PG_URL = os.environ.get("PORTAL_TEST_DATABASE_URL")
REDIS_URL = os.environ.get("PORTAL_TEST_REDIS_URL")
BACKENDS = ["sqlite", *(["postgresql"] if PG_URL else [])]

# The developer's own PORTAL_* settings must not leak into tests.
for _name in [n for n in os.environ if n.startswith("PORTAL_")]:
    del os.environ[_name]


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
            connection.execute(text("INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, :h)"),
                               {"h": "0" * 64})
        engine.dispose()

    def drop(self) -> None:
        """Remove what the template created."""
        if self.backend == "postgresql":
            admin = create_engine(pg_url(), isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.execute(text(f'DROP SCHEMA "{self.schema}" CASCADE'))
            admin.dispose()


@pytest.fixture(scope="session", params=BACKENDS)
def template(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Template]:
    """A migrated database per backend for the whole test session."""
    made = Template(request.param, tmp_path_factory.mktemp(request.param))
    yield made
    made.drop()


@pytest.fixture
def backend(template: Template) -> str:
    """Name of the database the current test runs on."""
    return template.backend


@pytest.fixture
def instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private instance folder, set as PORTAL_INSTANCE_DIR."""
    folder = tmp_path / "instance"
    monkeypatch.setenv("PORTAL_INSTANCE_DIR", str(folder))
    return folder


@pytest.fixture
def make_app(template: Template, tmp_path: Path, instance: Path) -> Iterator[Any]:
    """Return a factory of apps on this test's clean database; engines disposed afterwards."""
    url = template.fresh(tmp_path)
    made: list[Flask] = []

    def factory(**overrides: Any) -> Flask:
        app = create_app({"DATABASE_URL": url, "TESTING": True, **overrides})
        made.append(app)
        return app

    yield factory
    for app in made:
        app.extensions["engine"].dispose()


@pytest.fixture
def app(make_app: Any) -> Flask:
    """The portal on a clean database."""
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client for :func:`app`."""
    return app.test_client()


@pytest.fixture
def db_session(app: Flask) -> Iterator[Any]:
    """The app's session inside an app context."""
    from portal.extensions import db

    with app.app_context():
        yield db.session


_CSRF = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')


def csrf_token(client: FlaskClient, url: str) -> str:
    """GET ``url`` and return the CSRF token of its form."""
    response = client.get(url)
    match = _CSRF.search(response.get_data(as_text=True))
    assert match, f"no CSRF token on {url} (status {response.status_code})"
    return match.group(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked postgres_only run on PostgreSQL only (deselected on SQLite, not skipped)."""
    dropped = [item for item in items if item.get_closest_marker("postgres_only")
               and getattr(item, "callspec", None) is not None
               and item.callspec.params.get("template") == "sqlite"]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]
