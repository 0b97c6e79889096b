"""What every response shares: request ids, security headers, error pages, request logs, health."""

from __future__ import annotations

from flask import Flask

from portal.web import errors, health, security


def init_app(app: Flask) -> None:
    """Install request ids, headers, error pages and the health endpoints on ``app``."""
    security.init_app(app)
    errors.init_app(app)
    app.register_blueprint(health.bp)
