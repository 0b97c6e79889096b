"""Errors services raise for people: the message is safe to show (no PHI, no internals)."""

from __future__ import annotations


class ServiceError(ValueError):
    """A request the service refused; ``messages`` say why, each fit to show the user."""

    def __init__(self, *messages: str) -> None:
        super().__init__(" ".join(messages))
        self.messages = list(messages)


class NotFound(ServiceError):
    """The thing does not exist, or the actor may not know it exists."""
