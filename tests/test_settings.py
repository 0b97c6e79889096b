"""The typed settings object and the typed session services receive (issue 11, item 4)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask
from sqlalchemy import text, update

from portal.config import Settings, current_settings, settings_of
from portal.database import rowcount
from portal.extensions import db
from portal.models import User


def test_settings_are_typed_and_built_once_per_app(make_app: Callable[..., Flask]) -> None:
    app = make_app(SMTP_PORT="2525", LINK_TTL=7200, ORG_NAME="Example Clinic")
    settings = settings_of(app)
    assert isinstance(settings, Settings)
    assert settings.smtp_port == 2525  # an override given as text is coerced, not kept as "2525"
    assert (settings.link_ttl, settings.org_name) == (7200, "Example Clinic")
    assert settings_of(app) is settings
    with app.app_context():
        assert current_settings() is settings


def test_two_apps_keep_their_own_settings(make_app: Callable[..., Flask]) -> None:
    first, second = make_app(ORG_NAME="First"), make_app(ORG_NAME="Second")
    assert settings_of(first).org_name == "First"
    assert settings_of(second).org_name == "Second"


def test_settings_repr_hides_the_smtp_password(make_app: Callable[..., Flask]) -> None:
    app = make_app(SMTP_PASSWORD="hunter2-smtp-secret")
    assert settings_of(app).smtp_password == "hunter2-smtp-secret"
    assert "hunter2-smtp-secret" not in repr(settings_of(app))


def test_current_settings_needs_an_app_context() -> None:
    with pytest.raises(RuntimeError):
        current_settings()


def test_db_session_is_one_session_per_app_context(app: Flask) -> None:
    with app.app_context():
        assert not db.has_session()  # asking does not start one
        db.session.execute(text("SELECT 1"))
        assert db.has_session()
    with app.app_context():
        assert not db.has_session()


def test_a_stream_outliving_its_request_leaves_no_transaction_open(app: Flask) -> None:
    """A generator captures ``db.session`` and runs after the request's context is gone."""
    with app.test_request_context():
        rows = db.session  # what a view hands to a streamed export
    with app.app_context():  # stream_with_context pushes a fresh context like this one
        assert rows.execute(text("SELECT 1")).scalar() == 1
    with app.app_context():
        assert not db.has_session()
        assert db.session.get_bind().pool.checkedout() == 0  # teardown closed it


def test_rowcount_counts_matched_rows_and_refuses_a_select(app: Flask) -> None:
    with app.app_context():
        none_matched = db.session.execute(
            update(User)
            .where(User.id == -1)
            .values(totp_last_step=1)
            .execution_options(synchronize_session=False)
        )
        assert rowcount(none_matched) == 0
        with pytest.raises(TypeError):
            rowcount(db.session.execute(text("SELECT 1")).mappings())  # not a CursorResult
