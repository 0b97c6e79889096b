"""Logging as JSON lines, each with the request id when there is one.

Never log query strings, bodies, form fields or the matched URL (a pickup
token lives in it): requests are logged by their route *rule* only.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import TextIO

from flask import g, has_request_context

RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: time, level, logger, message, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if has_request_context() and "request_id" in g:
            entry["request_id"] = g.request_id
        entry.update({k: v for k, v in vars(record).items() if k not in RESERVED})
        if record.exc_info:
            # The exception type only: messages and tracebacks can hold data.
            entry["exception"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            entry["stack"] = [
                f"{f.filename}:{f.lineno} in {f.name}"
                for f in traceback.extract_tb(record.exc_info[2])
            ]
        return json.dumps(entry, default=str)


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at the time (servers and test runners swap it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


LIMITER_LOGGER = "flask-limiter"


def hide_limiter_keys(record: logging.LogRecord) -> bool:
    """Rewrite Flask-Limiter's breach record without its key (an address or an account's
    hash): keys name people, logs only name routes. Keeps every record; returns True."""
    if isinstance(record.msg, str) and "exceeded" in record.msg:
        args = record.args if isinstance(record.args, tuple) else ()
        # Flask-Limiter 4: ("ratelimit %s (%s) exceeded at endpoint: %s", limit, key, scope)
        limit, scope = (args[0], args[2]) if len(args) == 3 else ("?", "?")
        record.msg, record.args = "rate limit %s exceeded at endpoint %s", (limit, scope)
    return True


def configure(level: str = "INFO") -> None:
    """Send every log record to stderr as JSON lines (idempotent)."""
    logging.getLogger(LIMITER_LOGGER).addFilter(hide_limiter_keys)  # added once
    root = logging.getLogger()
    for handler in root.handlers:
        if getattr(handler, "_portal_json", False):
            root.setLevel(level)
            return
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter())
    # mypy: a marker attribute on our own handler, so configure() stays idempotent.
    handler._portal_json = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # Werkzeug's access log prints the raw path and query string (a token can be in it).
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    for noisy in ("weasyprint", "fontTools", "mail.log"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
