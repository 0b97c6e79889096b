"""Object-level access for staff to one message: the members of its care team.

A member of staff may open, revoke or resend a message only when they belong to the
active team it belongs to (ASVS V4.2.1); a colleague covers for another by being in
the same team, so there is no per-message "cover" any more. Membership is read on
every request, so someone removed from a team loses access at once, in a session
already open too. Everyone else gets the same 404 as for a message that does not
exist, and an access.denied event.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flask import render_template
from flask.typing import ResponseReturnValue
from flask_login import current_user

from portal.extensions import db
from portal.models import Message, Role, User
from portal.services import messaging
from portal.services.errors import NotFound
from portal.web.security import request_meta


def well_formed(public_id: str) -> bool:
    """Return True when ``public_id`` has the shape of one (32 letters and digits)."""
    return len(public_id) == 32 and public_id.isascii() and public_id.isalnum()


def find_message(public_id: str) -> Message | None:
    """Return the sent message (not a patient's reply, nor the first message of a
    conversation a patient started: those are read in the conversation) with this public
    id, or None."""
    if not well_formed(public_id):
        return None
    message = messaging.find_by_public_id(db.session, public_id)
    if message is None or message.in_reply_to_id is not None:
        return None
    recipient = db.session.get(User, message.recipient_id)
    return message if recipient is not None and recipient.role == Role.PATIENT else None


def nothing_here() -> ResponseReturnValue:
    """The 404 page for a message that is missing or not this staff member's team's."""
    return render_template("staff/not_found.html"), 404


def staff_message(
    view: Callable[[Message], ResponseReturnValue],
) -> Callable[[str], ResponseReturnValue]:
    """Hand the view the message at ``public_id`` if this staff member's team holds it.

    Otherwise the refusal is audited (committed with the page) and the answer is a 404.
    """

    @functools.wraps(view)
    def wrapper(public_id: str, **kwargs: Any) -> ResponseReturnValue:
        message = find_message(public_id)
        if message is None:
            return nothing_here()
        try:
            messaging.check_staff_access(db.session, message, current_user, meta=request_meta())
        except NotFound:  # returned, not raised: the boundary commits the access.denied event
            return nothing_here()
        return view(message, **kwargs)

    return wrapper
