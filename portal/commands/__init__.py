"""The ``portal`` commands: one group (or command) per module, registered by the app factory.

Each module defines its click group (``keys = CommandGroup("keys")``) and imports nothing
of portal.cli; :func:`init_app` adds them all to ``app.cli`` (flaskr's ``init_app``).
"""

from __future__ import annotations

from flask import Flask

from portal.commands.audit import audit
from portal.commands.backup import backup, restore
from portal.commands.db import db_group
from portal.commands.demo import demo
from portal.commands.keys import keys
from portal.commands.messages import messages
from portal.commands.retention import retention
from portal.commands.serve import serve
from portal.commands.users import users

COMMANDS = (db_group, users, messages, keys, audit, retention, serve, demo, backup, restore)


def init_app(app: Flask) -> None:
    """Register every ``portal`` command on ``app.cli``."""
    for command in COMMANDS:
        app.cli.add_command(command)
