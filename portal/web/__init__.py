"""What every response shares: request ids, security headers, error pages, request logs, health."""

from __future__ import annotations

from flask import Flask

from portal.web import downloads, errors, health, proxies, security, transaction, uploads


def init_app(app: Flask) -> None:
    """Install request ids, headers, error pages, the commit boundary, health endpoints,
    download slots and the proxy policy."""
    # Flask's documented way to add WSGI middleware; the stub types wsgi_app as a method.
    # mypy: Flask's documented middleware hook is assigning app.wsgi_app; its declared type is a
    #   method.
    app.wsgi_app = proxies.wrap(  # type: ignore[method-assign, assignment]
        app.wsgi_app, app.config["TRUSTED_PROXIES"]
    )
    security.init_app(app)
    errors.init_app(app)
    transaction.init_app(app)
    downloads.init_app(app)
    uploads.init_app(app)  # file parts stream into the encrypted store, never a temp file
    app.register_blueprint(health.bp)
