"""Staff's lists: the messages a member of staff sent, a keyset page at a time.

Read like the patient's inbox (services.patient_lists): a fixed number of queries
whatever the page's or the list's length, and only the subject and the patient's name
unsealed for each row.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from portal.crypto.errors import ContentDestroyed
from portal.models import Message, User
from portal.services import messages, names, paging, teams
from portal.services.paging import Listing, Page, PageRequest

DELETED_SUBJECT = "(deleted)"


class SentRow(NamedTuple):
    """One line of the sent list: the message's state columns, the patient, the subject."""

    message: Row[*tuple[Any, ...]]  # messages.LISTED: public_id, created_at, revoked_at...
    patient_name: str
    subject: str


def sent(session: Session, staff: User, want: PageRequest | None = None) -> Page[SentRow]:
    """Return one page of the messages ``staff`` sent for their care teams, newest first
    (those of a team they left, or that was archived, are theirs no longer).

    Four queries at most whatever the list's length: the cursor's row (when paging), the
    page with its data keys, its patients and their data keys. Raises PageError for a
    cursor that is not one of this member of staff's messages.
    """
    listing = Listing(
        where=(Message.sender_id == staff.id, Message.team_id.in_(teams.team_ids_of(staff))),
        order=(Message.created_at, Message.id),
        cursor=Message.public_id,
    )
    page = paging.fetch(
        session, listing, messages.listed(), want or PageRequest(), lambda r: r.public_id
    )
    patients = names.display_names(session, {row.recipient_id for row in page.rows})
    return page.map(lambda row: SentRow(row, patients[row.recipient_id], _subject(session, row)))


def _subject(session: Session, row: Row[*tuple[Any, ...]]) -> str:
    if row.destroyed_at is not None:
        return DELETED_SUBJECT
    try:
        return messages.listed_subject(session, row)
    except ContentDestroyed:
        return DELETED_SUBJECT
