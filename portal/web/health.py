"""Operations endpoints: /healthz (process up) and /readyz (database reachable, schema at head)."""

from __future__ import annotations

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import SQLAlchemyError

from portal.extensions import db, limiter
from portal.migrate import schema_state

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@limiter.exempt
def healthz() -> ResponseReturnValue:
    """Return 200 while the process serves requests."""
    return jsonify(status="ok")


@bp.get("/readyz")
@limiter.exempt
def readyz() -> ResponseReturnValue:
    """Return 200 when the database answers and its migrations are at head, else 503."""
    try:
        current, head = schema_state(db.engine)
    except SQLAlchemyError:
        return jsonify(status="unavailable", database="unreachable"), 503
    if current != head:
        return jsonify(status="unavailable", database="migrations pending"), 503
    return jsonify(status="ok", database="ok", schema=current)
