"""Operations endpoints: /healthz (process up) and /readyz (database and blob store usable)."""

from __future__ import annotations

import os

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from portal.extensions import db, limiter
from portal.migrate import schema_state
from portal.services.content import blob_store

bp = Blueprint("health", __name__)
MIN_FREE_BYTES = 8 * 1024 * 1024  # SQLite: below this the next pages' writes may fail


@bp.get("/healthz")
@limiter.exempt
def healthz() -> ResponseReturnValue:
    """Return 200 while the process serves requests."""
    return jsonify(status="ok")


@bp.get("/readyz")
@limiter.exempt
def readyz() -> ResponseReturnValue:
    """Return 200 when the database answers, is writable and at head, and the blob store
    takes a write; else 503. Each part is reported: database ok | down | migrations pending
    | not writable; blob_store writable | not writable."""
    database, schema = _database_state(db.engine)
    store = "writable" if _blob_store_writable() else "not writable"
    ready = database == "ok" and store == "writable"
    body = {
        "status": "ok" if ready else "unavailable",
        "database": database,
        "blob_store": store,
        **({"schema": schema} if schema else {}),
    }
    return jsonify(body), 200 if ready else 503


def _database_state(engine: Engine) -> tuple[str, str | None]:
    try:
        current, head = schema_state(engine)
        writable = _database_writable(engine)
    except SQLAlchemyError:
        return "down", None
    if current != head:
        return "migrations pending", current
    return ("ok" if writable else "not writable"), current


def _database_writable(engine: Engine) -> bool:
    if engine.dialect.name == "sqlite":
        # A full disk lets SQLite read and fails every write (sessions, audit events).
        folder = os.path.dirname(os.path.abspath(engine.url.database or "")) or "."
        stats = os.statvfs(folder)
        return stats.f_bavail * stats.f_frsize >= MIN_FREE_BYTES
    with engine.connect() as connection:  # a standby (read-only replica) takes no writes
        return connection.scalar(text("SHOW transaction_read_only")) == "off"


def _blob_store_writable() -> bool:
    try:
        return blob_store().writable()
    except OSError:  # the folder itself is missing or unreadable
        return False
