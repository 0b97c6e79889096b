"""Rate limits that several views count together, and a look at one that counts nothing.

A :class:`SharedLimit` is Flask-Limiter's ``shared_limit`` with its value, scope and key
kept as data, so that code outside the view can ask whether the next request would pass
(``spent``): the upload gate (``portal.web.uploads``) asks before a file is read, so a
caller past the limit never makes the portal stream, scan and encrypt a large body.
The decorated view stays the one place that counts and refuses (429).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from flask import request
from limits import parse_many

from portal.extensions import limiter

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class SharedLimit:
    """``value`` (``"30/hour"``, ``"5/hour;20/day"``) per ``key()`` across every view it
    decorates, counted under ``scope``, for requests of ``methods`` only."""

    value: str
    scope: str
    key: Callable[[], str]
    methods: tuple[str, ...] = ("POST",)

    def __call__(self, view: F) -> F:
        """Decorate ``view`` with the limit (Flask-Limiter counts and raises RateLimitExceeded)."""
        decorate = limiter.shared_limit(
            self.value, scope=self.scope, key_func=self.key, methods=list(self.methods)
        )
        return cast(F, decorate(view))  # the view, wrapped: RouteLimit types it loosely

    def spent(self) -> bool:
        """Return True when this request would be refused by the limit; counts nothing.

        False when rate limiting is off or the request's method is not limited. Raises
        what the limiter's storage raises when it cannot be reached.
        """
        if not limiter.enabled or request.method not in self.methods:
            return False
        names = self.names(self.key())
        return any(not limiter.limiter.test(item, *names) for item in parse_many(self.value))

    def names(self, key: str) -> list[str]:
        """The names Flask-Limiter counts this limit under for ``key``: its key prefix, if
        any, then ``key`` and the scope.

        The prefix is the limiter's own, not this app's RATELIMIT_KEY_PREFIX: Flask-Limiter
        (4.1, ``init_app``) keeps the first non-empty prefix any app of the process gave it,
        and counts under that one.
        """
        prefix = getattr(limiter, "_key_prefix", "") or ""
        return [prefix, key, self.scope] if prefix else [key, self.scope]
