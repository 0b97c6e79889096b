"""Alembic, driven from code: ``portal db upgrade`` and the readiness check use this."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from portal.paths import asset_dir


def alembic_config(engine: Engine) -> Config:
    """Return an Alembic config that runs on ``engine`` (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(asset_dir("migrations")))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` on ``engine``."""
    command.upgrade(alembic_config(engine), revision)


def schema_state(engine: Engine) -> tuple[str | None, str | None]:
    """Return (revision the database is at, head revision of the code)."""
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    return current, head
