"""The ``portal`` command, on Flask's click integration. Its commands, options, messages
and exit codes are a contract scripts rely on (tests/commands/test_commands.py).

``main`` is a FlaskGroup whose factory hook is :func:`load_app`; the app factory
registers every command (portal.commands.init_app, flaskr's pattern), and each
runs in that app's context. Imports go one way: portal.cli -> portal (the
factory) -> portal.commands; no command module imports this one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import click
from flask import Flask
from flask.cli import FlaskGroup

from portal import create_app, create_worker_app
from portal.config import ConfigError

# FlaskGroup's development options, left out of the contract: --app and --env-file would
# load another app or settings file, and --debug exports FLASK_DEBUG=1, which Flask reads
# into every app (gunicorn's workers included).
_FLASK_OPTIONS = frozenset({"app", "env_file", "debug"})


def load_app() -> Flask:
    """Return the portal app, or exit 2 with one line naming the malformed setting.

    The hook runs before any command (FlaskGroup loads the app to find the command),
    so no command starts on bad settings.
    """
    return _loaded(create_app)


def load_worker_app() -> Flask:
    """Return the notifier's app (portal.create_worker_app: the same settings and database,
    no web), or exit 2 with the same one line as :func:`load_app` for a malformed setting."""
    return _loaded(create_worker_app)


def _loaded(factory: Callable[[Mapping[str, Any] | None], Flask]) -> Flask:
    try:
        return factory(None)
    except ConfigError as error:
        click.echo(f"portal: configuration error: {error}", err=True)
        sys.exit(2)


class PortalGroup(FlaskGroup):
    """FlaskGroup with the contract's commands and options only: no ``run``/``shell``/
    ``routes``, no ``flask.commands`` plugins (Flask-Limiter's would add ``portal limiter``),
    no options filled from ``FLASK_*`` environment variables."""

    def __init__(self, **extra: Any) -> None:
        super().__init__(
            create_app=load_app,
            add_default_commands=False,
            add_version_option=False,
            load_dotenv=False,
            set_debug_flag=False,
            context_settings={"auto_envvar_prefix": None},
            **extra,
        )
        self.params = [param for param in self.params if param.name not in _FLASK_OPTIONS]

    def _load_plugin_commands(self) -> None:
        """Load no third-party commands: each would be a contract nobody reviewed."""


main = PortalGroup(help="Pickup Portal: secure patient messages.")
