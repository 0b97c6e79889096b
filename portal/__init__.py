"""Pickup Portal: the Flask application factories.

Importing any ``portal`` module runs this file, and the notifier imports portal's
config, models and services: so nothing of the web app (blueprints, PDF rendering,
migrations, the web extensions) is imported here at module level, only inside
:func:`create_app`. ``notifier run`` starts on :func:`create_worker_app` and never
loads them (README "Notifier throughput": start-up).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask

from portal import config as settings
from portal import logs
from portal.paths import asset_dir


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Return the portal app: defaults, then ``PORTAL_*`` environment, then ``config``.

    Raises portal.config.ConfigError naming the first malformed setting.
    """
    from portal.extensions import csrf, limiter, login_manager
    from portal.web.transaction import TransactionalFlask

    app = _base_app(TransactionalFlask, config)
    app.extensions["password_hasher"] = settings.password_hasher(app.config)
    _harden(app)
    csrf.init_app(app)
    login_manager.init_app(app)
    app.config.setdefault("RATELIMIT_STORAGE_URI", app.config["REDIS_URL"] or "memory://")
    limiter.init_app(app)
    _register(app)
    return app


def create_worker_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Return the app ``notifier run`` works in: the portal's settings, logging and database,
    loaded exactly as :func:`create_app` loads them, without the web (no blueprints, sessions,
    CSRF, rate limits, commands, nor the password hasher: the notifier hashes no password).

    Raises portal.config.ConfigError naming the first malformed setting, as create_app does.
    """
    return _base_app(Flask, config)


def _base_app(factory: type[Flask], config: Mapping[str, Any] | None) -> Flask:
    """Both apps' common part: settings (defaults, environment, ``config``), logging and the
    database. One function, so the two cannot drift apart."""
    from portal.extensions import db

    app = factory(
        "portal",
        template_folder=str(asset_dir("templates")),
        static_folder=str(asset_dir("static")),
    )
    app.config.update(settings.load(overrides=config))
    logs.configure(app.config["LOG_LEVEL"])
    db.init_app(app)
    return app


def _harden(app: Flask) -> None:
    https = app.config["BASE_URL"].startswith("https://")
    app.config.update(
        SESSION_COOKIE_SECURE=https,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_NAME="__Host-session" if https else "session",
        PREFERRED_URL_SCHEME="https" if https else "http",
        MAX_CONTENT_LENGTH=app.config["MAX_UPLOAD"] + 1024 * 1024,
        WTF_CSRF_TIME_LIMIT=None,
        # Flask-WTF's HTTPS Referer check cannot work here: Referrer-Policy is no-referrer
        # (tokens in URLs), so browsers send no Referer and Origin: null, and every form
        # behind TLS would fail. The session-bound token, SameSite=Lax and the __Host-
        # cookie prefix (no subdomain can plant the cookie) carry CSRF defence (ASVS 4.2.2).
        WTF_CSRF_SSL_STRICT=False,
    )


def _register(app: Flask) -> None:
    from portal import commands, web
    from portal.auth import onboarding, views  # noqa: F401 - onboarding adds routes to auth
    from portal.auth.sessions import DatabaseSessionInterface
    from portal.extensions import login_manager

    app.session_interface = DatabaseSessionInterface()
    login_manager.session_protection = None  # sessions are server-side, renewed at sign-in
    login_manager.login_view = "auth.signin"
    from portal.admin import teams as admin_teams  # noqa: F401 - adds the team pages to admin
    from portal.admin import views as admin_views
    from portal.auditor import views as auditor_views
    from portal.auth.policy import nav_links
    from portal.pickup import views as pickup_views
    from portal.staff import conversations  # noqa: F401 - adds the team inbox to staff
    from portal.staff import views as staff_views

    web.init_app(app)
    commands.init_app(app)  # the `portal` command's groups, on app.cli
    app.register_blueprint(views.bp)
    app.register_blueprint(admin_views.bp)
    app.register_blueprint(staff_views.bp)
    app.register_blueprint(auditor_views.bp)
    app.register_blueprint(pickup_views.bp)
    app.jinja_env.globals["nav_links"] = nav_links
    if app.config["DEMO"]:
        from portal.web import demo

        app.register_blueprint(demo.bp)
