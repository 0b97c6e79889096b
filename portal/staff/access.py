"""Object-level access for staff to one message: its sender, or a colleague covering for them.

Until care teams exist, only the member of staff who sent a message may open,
revoke or resend it (ASVS V4.2.1). A colleague may act on it after choosing
"covering for a colleague" with a reason from a fixed list on an interstitial
form; that cover is audited (message.cover) and lasts for the rest of the
signed-in session: the server-side session keeps the public ids of the messages
covered (ids only, never PHI), and sign-in starts a fresh session, so every new
session needs a new, newly audited cover. Everyone else gets the same 404 as
for a message that does not exist, and an access.denied event.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flask import render_template, session
from flask.typing import ResponseReturnValue
from flask_login import current_user

from portal.extensions import db
from portal.models import Message
from portal.services import messaging
from portal.services.errors import NotFound
from portal.web.security import request_meta

COVER_KEY = "covering"
MAX_COVERS = 100  # keeps the session row small; the oldest cover is forgotten first


def well_formed(public_id: str) -> bool:
    """Return True when ``public_id`` has the shape of one (32 letters and digits)."""
    return len(public_id) == 32 and public_id.isascii() and public_id.isalnum()


def find_message(public_id: str) -> Message | None:
    """Return the sent message (not a patient's reply) with this public id, or None."""
    if not well_formed(public_id):
        return None
    message = messaging.find_by_public_id(db.session, public_id)
    return message if message is not None and message.in_reply_to_id is None else None


def is_covering(public_id: str) -> bool:
    """Return True when this session chose to cover for the sender of ``public_id``."""
    return public_id in session.get(COVER_KEY, [])


def remember_cover(public_id: str) -> None:
    """Let this session act on ``public_id`` until it ends (the caller audits the cover)."""
    covered = [c for c in session.get(COVER_KEY, []) if c != public_id]
    session[COVER_KEY] = [*covered, public_id][-MAX_COVERS:]


def nothing_here(public_id: str) -> ResponseReturnValue:
    """The 404 page for a message that is missing or not this staff member's to act on."""
    return render_template(
        "staff/not_found.html", public_id=public_id if well_formed(public_id) else None
    ), 404


def staff_message(
    view: Callable[[Message], ResponseReturnValue],
) -> Callable[[str], ResponseReturnValue]:
    """Hand the view the message at ``public_id`` if this staff member may act on it.

    Otherwise the refusal is audited (committed with the page) and the answer is a 404.
    """

    @functools.wraps(view)
    def wrapper(public_id: str, **kwargs: Any) -> ResponseReturnValue:
        message = find_message(public_id)
        if message is None:
            return nothing_here(public_id)
        try:
            messaging.check_staff_access(
                db.session,
                message,
                current_user,
                covering=is_covering(public_id),
                meta=request_meta(),
            )
        except NotFound:  # returned, not raised: the boundary commits the access.denied event
            return nothing_here(public_id)
        return view(message, **kwargs)

    return wrapper
