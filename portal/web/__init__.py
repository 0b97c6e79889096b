"""What every response shares: request ids, security headers, error pages, request logs, health."""

from __future__ import annotations

from flask import Flask

from portal.web import errors, health, proxies, security


def init_app(app: Flask) -> None:
    """Install request ids, headers, error pages, health endpoints and the proxy policy."""
    app.wsgi_app = proxies.wrap(app.wsgi_app, app.config["TRUSTED_PROXIES"])  # type: ignore[method-assign]
    security.init_app(app)
    errors.init_app(app)
    app.register_blueprint(health.bp)
