"""The CLI's commit boundary: every ``portal`` command that touches the database runs as
one transaction, committed in one place.

The web's counterpart is portal.web.transaction; the rule is the same (one commit per
request, command or job, at its boundary; services flush, never commit): a command that
returns commits; one that raises or exits (``sys.exit(1)`` after a refusal, a
UsageError, Ctrl-C, a bug) rolls back everything it did, audit event included.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click
from flask.cli import AppGroup, with_appcontext

from portal.extensions import db

F = TypeVar("F", bound=Callable[..., Any])


def one_transaction(func: F) -> F:
    """Return ``func`` wrapped so its work commits once when it returns, and rolls back when
    it raises anything, SystemExit included. Needs an app context (the session's scope)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = func(*args, **kwargs)
        except BaseException:
            db.session.rollback()
            raise
        db.session.commit()  # the one commit of a command that returned normally
        return result

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps func's signature


class CommandGroup(AppGroup):
    """A command group (``portal keys``, ``portal users``...) whose every command runs in the
    app context of the ``portal`` app and as :func:`one_transaction`, by mechanism: a command
    cannot forget to commit, nor commit half its work."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], click.Command]:  # type: ignore[override]  # AppGroup's signature, narrowed to decorator use
        """Return a decorator that makes a transactional subcommand (click's arguments)."""
        parent = super().command(*args, **kwargs)
        return lambda func: parent(one_transaction(func))


def command(name: str, **attrs: Any) -> Callable[[Callable[..., Any]], click.Command]:
    """Return a decorator that makes a top-level transactional command (``portal backup``)."""
    return lambda func: click.command(name, **attrs)(with_appcontext(one_transaction(func)))
