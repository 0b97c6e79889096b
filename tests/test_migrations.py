"""Migrations: apply on both databases, agree with the models, one head."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from flask import Flask
from sqlalchemy import inspect

from portal.database import Base
from portal.extensions import db
from portal.migrate import alembic_config, schema_state


def test_migrations_reach_head(app: Flask) -> None:
    with app.app_context():
        current, head = schema_state(db.engine)
        assert current == head is not None
        tables = set(inspect(db.engine).get_table_names())
        assert set(Base.metadata.tables) <= tables


def test_models_and_migrations_agree(app: Flask) -> None:
    with app.app_context(), db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
        assert diff == []


def test_single_head(app: Flask) -> None:
    with app.app_context():
        script = ScriptDirectory.from_config(alembic_config(db.engine))
        assert len(script.get_heads()) == 1


def test_cli_upgrade_on_empty_database(tmp_path: object, instance: object) -> None:
    from click.testing import CliRunner

    from portal import cli

    url = f"sqlite:///{tmp_path}/fresh.db"
    result = CliRunner().invoke(cli.main, ["db", "upgrade"], env={"PORTAL_DATABASE_URL": url})
    assert result.exit_code == 0, result.output
    assert "database at revision" in result.output
    again = CliRunner().invoke(cli.main, ["db", "upgrade"], env={"PORTAL_DATABASE_URL": url})
    assert again.exit_code == 0
