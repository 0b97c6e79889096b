"""Fixtures: an app on each database (SQLite always, PostgreSQL when configured), clients.

Every test gets a clean database: SQLite copies a migrated template file;
PostgreSQL runs in a schema of its own for this test process (dropped at the
end) and is emptied between tests. Two runs, or two xdist workers, never collide.
Helpers that tests import live in tests/support/, not here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from portal import create_app
from portal.security import passwords
from tests.support.clamd import Clamd
from tests.support.databases import BACKENDS, Template

# Every test fails if anything it logged carries PHI, an email address or a token.
pytest_plugins = ["tests.log_guard"]

# The developer's own PORTAL_* settings must not leak into tests. PORTAL_TEST_* name the
# test services, not settings, and must reach the xdist workers this process starts.
for _name in [
    n for n in os.environ if n.startswith("PORTAL_") and not n.startswith("PORTAL_TEST_")
]:
    del os.environ[_name]


def _redis_of_this_worker(url: str, worker: str) -> str:
    """Give each xdist worker a Redis database of its own (gw0 -> 1, gw1 -> 2, ...): the
    limiter's reset() clears every counter of its database, which would race another
    worker's rate-limit test."""
    base, _, _db = url.rpartition("/")
    return f"{base}/{1 + int(worker.removeprefix('gw'))}" if base.startswith("redis") else url


if os.environ.get("PORTAL_TEST_REDIS_URL") and os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["PORTAL_TEST_REDIS_URL"] = _redis_of_this_worker(
        os.environ["PORTAL_TEST_REDIS_URL"], os.environ["PYTEST_XDIST_WORKER"]
    )

# Test-only argon2id parameters for every app the fixtures build, unless the test is
# marked real_argon2 (the tests about the parameters and rehashing).
FAST_HASH = dict(passwords.INSECURE_TEST_PARAMETERS)


@pytest.fixture(scope="session", params=BACKENDS)
def template(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Template]:
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
def make_app(
    template: Template, tmp_path: Path, instance: Path, request: pytest.FixtureRequest
) -> Iterator[Any]:
    """Return a factory of apps on this test's clean database; engines disposed afterwards.

    Passwords hash with FAST_HASH unless the test is marked real_argon2.
    """
    url = template.fresh(tmp_path)
    made: list[Flask] = []
    real = request.node.get_closest_marker("real_argon2") is not None
    hashing = {} if real else {"PASSWORD_HASH_PARAMS": FAST_HASH}

    def factory(**overrides: Any) -> Flask:
        app = create_app({"DATABASE_URL": url, "TESTING": True, **hashing, **overrides})
        made.append(app)
        return app

    # Flask-Limiter keeps the first key prefix any app gave it (init_app): put back the
    # process's, so a test's RATELIMIT_KEY_PREFIX does not outlive the test.
    from portal.extensions import limiter

    prefix = limiter._key_prefix
    yield factory
    limiter._key_prefix = prefix
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


@pytest.fixture
def world(app: Flask) -> Any:
    """Care teams Clinic (sam, ada) and Records (olive), two patients, and a message from sam
    to the recognisable-PHI patient; browsers sign in when first used, with empty rate-limit
    counters (tests/support/conversations.py)."""
    from portal.extensions import limiter
    from tests.support.conversations import build_world

    with app.app_context():
        limiter.reset()
    return build_world(app)


@pytest.fixture(scope="session")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    """A private clamd with the EICAR signature (tests/support/clamd.py), started the first
    time a test of this process asks for it and stopped when the session ends."""
    server = Clamd(tmp_path_factory.mktemp("clamd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked postgres_only run on PostgreSQL only, and sqlite_only on SQLite only
    (deselected on the other database, not skipped)."""
    other = {"postgres_only": "sqlite", "sqlite_only": "postgresql"}
    dropped = [
        item
        for item in items
        if getattr(item, "callspec", None) is not None
        and any(
            item.get_closest_marker(marker) and item.callspec.params.get("template") == backend
            for marker, backend in other.items()
        )
    ]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]
