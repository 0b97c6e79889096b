"""How often a patient may write: keyed on the signed-in account, never the address.

Patients behind one hospital or household router share an address, and one patient can
change theirs at will: a limit per address would hold back the many and let the one
through. So every writing route counts per account (its public id: opaque, no PHI).
Replies to a message and follow-ups in a conversation are the same act, a patient
writing to the team, and share one allowance (``PATIENT_WRITES``).
"""

from __future__ import annotations

from flask_limiter.util import get_remote_address
from flask_login import current_user

from portal.web.limits import SharedLimit

# A patient writes first a few times a day at most; past that it is a script or a flood
# that would bury the team's inbox.
START_LIMIT = "5/hour;20/day"
# Replies and follow-ups together: a conversation, not a chat; 30 an hour is far past a
# patient describing a worry, and well short of a script filling the team's inbox.
WRITE_LIMIT = "30/hour"


def patient_key() -> str:
    """The rate-limit key of the signed-in user: their public id (opaque, no PHI)."""
    if current_user.is_authenticated:
        return "patient:" + str(current_user.public_id)
    return get_remote_address()  # signed out: the role check sends them to sign in anyway


PATIENT_STARTS = SharedLimit(START_LIMIT, scope="pickup:conversation-start", key=patient_key)
PATIENT_WRITES = SharedLimit(WRITE_LIMIT, scope="pickup:patient-write", key=patient_key)
