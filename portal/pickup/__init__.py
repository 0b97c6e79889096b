"""Patients pick up messages: scanner-safe link landing, identity checks, inbox, reading.

``landing`` holds the link, identity and password steps; ``reading`` the
signed-in pages (inbox, message, downloads, reply, access history). Both add
routes to :data:`bp`; ``views`` imports them so registering ``views.bp`` gets all.
"""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("pickup", __name__)
