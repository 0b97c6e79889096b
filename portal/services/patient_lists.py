"""The patient's own lists: the inbox and the access history (the facts auditors see).

Both are keyset pages (services.paging) read with a fixed number of queries whatever their
length: the inbox in one (its senders and every data key joined to the page), the history
with its people's names and its messages' data keys in batches. A list unseals only what
it shows: subjects and names, never a body or a file name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import and_, bindparam, select
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session, aliased

from portal import audit
from portal.audit import Action, RequestMeta
from portal.config import current_settings
from portal.crypto.errors import ContentDestroyed
from portal.database import utcnow
from portal.models import AuditEvent, CareTeam, Conversation, DataKey, Message, Role, User
from portal.models.messages import MessageState
from portal.services import keys, messages, names, paging, pdf
from portal.services.paging import Listing, Page, PageRequest
from portal.services.pickup import state_at

DELETED_SUBJECT = "(deleted)"


class InboxRow(NamedTuple):
    """One line of the inbox: no link unless ``state`` is AVAILABLE (a tuple: a page makes
    fifty, and the template reads seven fields of each)."""

    public_id: str
    sender_name: str
    sent_at: datetime
    subject: str
    attachments: int
    unread: bool
    state: MessageState


def inbox(session: Session, user: User, want: PageRequest | None = None) -> Page[InboxRow]:
    """Return one page of the patient's messages (not their replies), newest first.

    Two queries at most whatever the page's or the inbox's length: the cursor's row (when
    paging), then the page with its data keys, attachment counts, senders and their data
    keys, both built once (:data:`_INBOX`). Each key is unwrapped and each subject and
    sender's name unsealed once; bodies and file names are never read. Raises PageError for
    a cursor that is not one of this patient's messages.
    """
    page = paging.fetch_prepared(
        session, _INBOX, want or PageRequest(), _public_id, {"reader": user.id}
    )
    senders: dict[int, str] = {}
    now = utcnow()
    return page.map(lambda row: _inbox_row(session, row, senders, now))


_SENDER_KEY = aliased(DataKey)
# Built once (every inbox page runs it): the patient's messages, not their replies, each
# with its data key, its attachment count and its sender's name with the sender's key, in
# the order _inbox_row unpacks them.
_INBOX = paging.Prepared(
    Listing(
        where=(Message.recipient_id == bindparam("reader"), Message.in_reply_to_id.is_(None)),
        order=(Message.created_at, Message.id),
        cursor=Message.public_id,
    ),
    select(
        Message.public_id,
        Message.subject_sealed,
        Message.created_at,
        Message.expires_at,
        Message.revoked_at,
        Message.destroyed_at,
        Message.first_opened_at,
        DataKey.id,
        DataKey.kek_version,
        DataKey.wrapped,
        messages.attachment_count(),
        Message.sender_id,
        User.public_id,
        User.name_sealed,
        _SENDER_KEY.id,
        _SENDER_KEY.kek_version,
        _SENDER_KEY.wrapped,
    )
    .join(DataKey, DataKey.id == Message.data_key_id)
    .outerjoin(User, User.id == Message.sender_id)
    .outerjoin(_SENDER_KEY, _SENDER_KEY.id == User.data_key_id),
    narrow=True,  # a long inbox sorts its dates and ids alone (README "Inbox")
    columns=True,  # plain rows: read first in its transaction, nothing to flush
)


def _public_id(row: Row[*tuple[Any, ...]]) -> str:
    return str(row[0])


def _inbox_row(
    session: Session, row: Row[*tuple[Any, ...]], senders: dict[int, str], now: datetime
) -> InboxRow:
    (
        public_id,
        subject_sealed,
        sent_at,
        expires_at,
        revoked_at,
        destroyed_at,
        first_opened_at,
        key_id,
        kek_version,
        wrapped,
        files,
        sender_id,
        *sender_columns,
    ) = row
    state = state_at(destroyed_at, revoked_at, expires_at, now)
    subject = DELETED_SUBJECT
    if state != MessageState.DELETED:
        try:
            key = keys.unwrap_loaded(session, key_id, kek_version, wrapped)
            subject = keys.open_text(key, "messages", "subject", public_id, subject_sealed)
        except ContentDestroyed:
            state = MessageState.DELETED
    sender = senders.get(sender_id)
    if sender is None:
        sender = senders[sender_id] = _sender_name(session, *sender_columns)
    return InboxRow(public_id, sender, sent_at, subject, files, first_opened_at is None, state)


def _sender_name(
    session: Session,
    public_id: str | None,
    name_sealed: bytes | None,
    key_id: int | None,
    kek_version: int | None,
    wrapped: bytes | None,
) -> str:
    """The sender's name from an :data:`_INBOX` row (as ``names.display_names`` words it)."""
    if public_id is None or name_sealed is None or key_id is None or kek_version is None:
        return names.UNKNOWN
    return names.unsealed_name(session, public_id, name_sealed, key_id, kek_version, wrapped)


ACTION_TEXT = {
    Action.MESSAGE_SEND: "Sent you a message",
    Action.LINK_OPEN: "Opened the link in the email",
    Action.LINK_REISSUE: "Asked for a new link",
    Action.MESSAGE_RESEND: "Sent a new link",
    Action.AUTH_IDENTITY_VERIFY: "Checked identity",
    Action.ACCESS_DENIED: "Was refused access",
    Action.MESSAGE_VIEW: "Read the message",
    Action.MESSAGE_PDF: "Saved the message as PDF",
    Action.ATTACHMENT_DOWNLOAD: "Downloaded an attachment",
    Action.ATTACHMENT_VIEW: "Viewed an attachment",
    Action.MESSAGE_REPLY: "Replied",
    Action.MESSAGE_REVOKE: "Withdrew the message",
    Action.MESSAGE_SHRED: "Deleted the message",
    Action.NOTICE_SENT: "Email notice sent",
    Action.NOTICE_FAILED: "Email notice failed",
    Action.NOTICE_BOUNCED: "Email notice returned by your mail server",
    Action.USER_CREATE: "Created your account",
    Action.PATIENT_HISTORY_VIEW: "Viewed this access history",
    Action.MESSAGE_LIST: "Viewed the list of messages",
    Action.PATIENT_LOOKUP: "Looked you up by email address",
    Action.PATIENT_VIEW: "Opened your record to write to you",
    Action.MESSAGE_COVER: "Acted on a message for a colleague who sent it",
    Action.CONVERSATION_START: "Wrote to a care team",
    Action.CONVERSATION_READ: "Opened your conversation",
    Action.REPLY_READ: "Read your message",
    Action.CONVERSATION_ASSIGN: "Assigned your conversation to a team member",
    Action.CONVERSATION_DONE: "Marked your conversation done",
    Action.CONVERSATION_REOPEN: "Reopened your conversation",
    Action.UPLOAD_SCANNED: "Checked an upload for malware",
    Action.CONTENT_TAMPERED: "Found a message that failed its integrity check",
}
# The same events once their care team is known (the message's, else the conversation's):
# staff-side changes to a conversation are shown, like a look-up, but name no patient data.
TEAM_TEXT = {
    Action.CONVERSATION_START: "Wrote to the {team}",
    Action.CONVERSATION_READ: "Opened your conversation with the {team}",
    Action.CONVERSATION_DONE: "Marked your conversation with the {team} done",
    Action.CONVERSATION_REOPEN: "Reopened your conversation with the {team}",
}


ANONYMOUS = (Action.LINK_OPEN, Action.LINK_REISSUE)
OTHER_PATIENT = "Another patient"
# A member of staff reading the patient's message or reply: the history says which care
# team read it, "Read by the Cardiology clinic (Dr Ada Lovelace)". In a conversation that is
# reply.read, one per patient message shown (conversation.read is the thread's opening).
STAFF_READS = frozenset({Action.MESSAGE_VIEW, Action.REPLY_READ})


def staff_read_text(team: str, name: str) -> str:
    """Return how the history and the disclosure record word a read by staff of ``team``."""
    return f"Read by the {team} ({name})"


def assignment_text(team: str | None, assignee: str | None) -> str:
    """Return how the history words conversation.assign: to whom (a member of staff, by
    name), or that nobody has it now."""
    conversation = f"your conversation with the {team}" if team else "your conversation"
    if assignee is None:
        return f"Unassigned {conversation}"
    return f"Assigned {conversation} to {assignee}"


def assignee_of(event: AuditEvent) -> int | None:
    """The user id a conversation.assign event gave the conversation to (None: unassigned)."""
    if event.action != Action.CONVERSATION_ASSIGN:
        return None
    value = audit_details(event).get("assigned_to")
    return value if isinstance(value, int) else None


def audit_details(event: AuditEvent) -> dict[str, Any]:
    """The event's details, parsed (a stored event is canonical JSON; {} if it is not)."""
    try:
        parsed = json.loads(event.details or "{}")
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def is_other_patient(patient: User, actor_id: int | None, actor_role: str | None) -> bool:
    """Return True when the actor is a patient other than ``patient``.

    A patient's history and disclosure record name the organisation's people
    and roles, never another patient: no name, email or address (HIPAA
    minimum necessary).
    """
    return actor_id is not None and actor_id != patient.id and actor_role == Role.PATIENT


@dataclass(frozen=True)
class HistoryRow:
    """One access to the patient's data: staff by name, role and organisation; other
    patients only as :data:`OTHER_PATIENT`, without an address."""

    when: datetime
    who: str
    role: str
    organisation: str
    what: str
    outcome: str
    item: str
    from_address: str


def history(session: Session, user: User, want: PageRequest | None = None) -> Page[HistoryRow]:
    """Return one page of the audit events about ``user`` (patient_id), in words, newest first.

    Six queries at most whatever the page's length: the cursor's event (when paging),
    the page (with the care team of each conversation an event names), its messages and
    their data keys, its people and their data keys. Raises PageError for a cursor that is
    not one of this patient's events.
    """
    listing = Listing(
        where=(AuditEvent.patient_id == user.id,),
        order=(AuditEvent.seq,),
        cursor=AuditEvent.seq,
        numeric=True,
    )
    stmt = (
        select(AuditEvent, CareTeam.name.label("conversation_team"))
        .outerjoin(
            Conversation,
            and_(
                AuditEvent.target_type == "conversation",
                Conversation.public_id == AuditEvent.target_id,
            ),
        )
        .outerjoin(CareTeam, CareTeam.id == Conversation.team_id)
    )
    page = paging.fetch(session, listing, stmt, want or PageRequest(), _seq)
    events: list[AuditEvent] = [row[0] for row in page.rows]
    items, team_of = _items(session, {e.message_id for e in events if e.message_id is not None})
    named = {
        e.actor_id
        for e in events
        if e.actor_id is not None and not is_other_patient(user, e.actor_id, e.actor_role)
    }
    named |= {a for a in map(assignee_of, events) if a is not None}
    people: dict[int | None, str] = {user.id: "You", None: "System"}
    people.update(names.display_names(session, named - {user.id}).items())
    return page.map(
        lambda row: _history_row(row[0], user, people, items, team_of, row.conversation_team)
    )


def _seq(row: Row[AuditEvent, str | None]) -> int:
    return row[0].seq


def _history_row(
    event: AuditEvent,
    user: User,
    people: dict[int | None, str],
    items: dict[int, str],
    team_of: dict[int, str],
    conversation_team: str | None,
) -> HistoryRow:
    item = items.get(event.message_id, "") if event.message_id is not None else ""
    team = team_of.get(event.message_id or 0) or conversation_team
    what = history_text(event.action, event.actor_role, team, people.get(event.actor_id, ""))
    if event.action == Action.CONVERSATION_ASSIGN:
        assignee = assignee_of(event)
        what = assignment_text(team, None if assignee is None else people.get(assignee, "Staff"))
    if is_other_patient(user, event.actor_id, event.actor_role):
        return HistoryRow(event.occurred_at, OTHER_PATIENT, "", "", what, event.outcome, item, "")
    return HistoryRow(
        event.occurred_at,
        _who(event, people),
        event.actor_role or "",
        _organisation(event, user),
        what,
        event.outcome,
        item,
        event.client_ip or "",
    )


def history_text(action: str, actor_role: str | None, team: str | None, actor_name: str) -> str:
    """Return an event's wording in the patient's history: a read by staff names the care
    team and the reader; other conversation events name the team when it is known; an
    action without wording keeps its name (never PHI: it is one of audit.Action's)."""
    try:
        known = Action(action)
    except ValueError:
        return action
    if team and actor_role == Role.STAFF and known in STAFF_READS:
        return staff_read_text(team, actor_name)
    if team and known in TEAM_TEXT:
        return TEAM_TEXT[known].format(team=team)
    return ACTION_TEXT.get(known, action)


def _who(event: AuditEvent, people: dict[int | None, str]) -> str:
    if event.actor_id is None and event.action in ANONYMOUS:
        return "Someone with the link (not signed in)"
    return people[event.actor_id]


def _organisation(event: AuditEvent, user: User) -> str:
    """The organisation whose person acted (our staff, auditors, admins, the system)."""
    if event.actor_id == user.id or (event.action in ANONYMOUS and event.actor_id is None):
        return ""
    return current_settings().org_name


def record_history_view(session: Session, user: User, rows: int, meta: RequestMeta) -> None:
    """Audit that ``user`` read their own access history (it shows subjects and names: PHI)."""
    audit.record(
        session,
        Action.PATIENT_HISTORY_VIEW,
        actor=audit.actor_of(user),
        meta=meta,
        target_type="user",
        target_id=user.public_id,
        patient_id=user.id,
        details={"count": rows},
    )


def record_inbox_view(session: Session, user: User, rows: int, meta: RequestMeta) -> None:
    """Audit that ``user`` read their inbox (message.list: the subjects shown are PHI),
    committed with other requests' reads when the app has a group appender (the inbox
    changes nothing else: ``audit.record_read``)."""
    audit.record_read(
        session,
        Action.MESSAGE_LIST,
        actor=audit.actor_of(user),
        meta=meta,
        patient_id=user.id,
        details={"count": rows},
    )


def _items(session: Session, message_ids: Iterable[int]) -> tuple[dict[int, str], dict[int, str]]:
    """Each message's subject and date for the history, and its care team's name, in one
    query (messages, their keys and teams)."""
    wanted = set(message_ids)
    if not wanted:
        return {}, {}
    found = session.execute(
        messages.listed(CareTeam.name.label("team_name"))
        .outerjoin(CareTeam, CareTeam.id == Message.team_id)
        .where(Message.id.in_(wanted))
    ).all()
    teams = {row.id: row.team_name for row in found if row.team_name}
    return {row.id: _item(session, row) for row in found}, teams


def conversation_team_names(session: Session, public_ids: Iterable[str]) -> dict[str, str]:
    """Return the name of each conversation's care team, by conversation public id (one
    query; the disclosure record's, whose events name conversations by public id)."""
    wanted = set(public_ids)
    if not wanted:
        return {}
    found = session.execute(
        select(Conversation.public_id, CareTeam.name)
        .join(CareTeam, CareTeam.id == Conversation.team_id)
        .where(Conversation.public_id.in_(wanted))
    )
    return {row[0]: row[1] for row in found}


def team_names(session: Session, message_ids: Iterable[int]) -> dict[int, str]:
    """Return the name of each message's care team, by message id (one query)."""
    wanted = set(message_ids)
    if not wanted:
        return {}
    found = session.execute(
        select(Message.id, CareTeam.name)
        .join(CareTeam, CareTeam.id == Message.team_id)
        .where(Message.id.in_(wanted))
    )
    return {row[0]: row[1] for row in found}


def _item(session: Session, row: Row[*tuple[Any, ...]]) -> str:
    sent = pdf.format_when(row.created_at)
    if row.destroyed_at is not None:
        return f"Deleted message ({sent})"
    try:
        return f"{messages.listed_subject(session, row)} ({sent})"
    except ContentDestroyed:
        return f"Deleted message ({sent})"
