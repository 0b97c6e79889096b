"""How often a member of staff may send: keyed on the signed-in account, never the address.

Staff of one practice share its address, so the limit counts per account (its public id:
opaque, no PHI), as the patients' limits do (``portal.pickup.limits``). The routes that
take files, composing a message and answering in a conversation, are the same act (a
member of the team writing to a patient) and share one allowance (``STAFF_SENDS``): every
POST counts, with files or without, as every patient write does.
"""

from __future__ import annotations

from flask_limiter.util import get_remote_address
from flask_login import current_user

from portal.web.limits import SharedLimit

# A clinician working down the team's inbox answers one message every minute or two, and a
# batch of results goes out a few dozen at a time: 120 an hour (one every 30 seconds for a
# whole hour) and 1,000 a day are far past that, and well short of a script or a stolen
# session uploading file after file, each one encrypted, scanned and stored.
SEND_LIMIT = "120/hour;1000/day"


def staff_key() -> str:
    """The rate-limit key of the signed-in user: their public id (opaque, no PHI)."""
    if current_user.is_authenticated:
        return "staff:" + str(current_user.public_id)
    return get_remote_address()  # signed out: the role check sends them to sign in anyway


STAFF_SENDS = SharedLimit(SEND_LIMIT, scope="staff:send", key=staff_key)
