"""The pickup blueprint with all its routes (``portal.create_app`` registers ``views.bp``)."""

from __future__ import annotations

from portal.pickup import (  # noqa: F401 - importing them adds their routes
    bp,
    conversations,
    landing,
    reading,
)

__all__ = ["bp"]
