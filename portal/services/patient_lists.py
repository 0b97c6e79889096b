"""The patient's own lists: the inbox and the access history (the facts auditors see)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from portal import audit
from portal.audit import Action, RequestMeta
from portal.config import current_settings
from portal.crypto.errors import ContentDestroyed
from portal.database import utcnow
from portal.models import AuditEvent, Message, Role, User
from portal.models.messages import MessageState
from portal.services import messages, pdf
from portal.services.pickup import Unavailable, display_name_of, message_state, read_or_unavailable


@dataclass(frozen=True)
class InboxRow:
    """One line of the inbox: no link unless ``state`` is AVAILABLE."""

    public_id: str
    sender_name: str
    sent_at: datetime
    subject: str
    attachments: int
    unread: bool
    state: MessageState


def inbox(session: Session, user: User, limit: int = 200) -> list[InboxRow]:
    """Return the patient's messages (not their replies), newest first."""
    rows, now = [], utcnow()
    for message in session.scalars(
        select(Message)
        .where(Message.recipient_id == user.id, Message.in_reply_to_id.is_(None))
        .order_by(Message.created_at.desc(), Message.id.desc())
        .limit(limit)
    ):
        state = message_state(message, now)
        try:
            subject = read_or_unavailable(session, message).subject
        except Unavailable:
            state, subject = MessageState.DELETED, "(deleted)"
        rows.append(
            InboxRow(
                message.public_id,
                display_name_of(session, message.sender_id),
                message.created_at,
                subject,
                len(message.attachments),
                message.first_opened_at is None,
                state,
            )
        )
    return rows


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
    Action.USER_CREATE: "Created your account",
    Action.PATIENT_HISTORY_VIEW: "Viewed this access history",
    Action.MESSAGE_LIST: "Viewed the list of messages",
    Action.PATIENT_LOOKUP: "Looked you up by email address",
    Action.PATIENT_VIEW: "Opened your record to write to you",
    Action.MESSAGE_COVER: "Acted on a message for a colleague who sent it",
}


ANONYMOUS = (Action.LINK_OPEN, Action.LINK_REISSUE)
OTHER_PATIENT = "Another patient"


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


def history(session: Session, user: User, limit: int = 500) -> list[HistoryRow]:
    """Return the newest audit events about ``user`` (patient_id), in words, newest first."""
    names: dict[int | None, str] = {user.id: "You", None: "System"}
    items: dict[int | None, str] = {None: ""}
    rows = []
    for event in session.scalars(
        select(AuditEvent)
        .where(AuditEvent.patient_id == user.id)
        .order_by(AuditEvent.seq.desc())
        .limit(limit)
    ):
        if event.message_id not in items:
            items[event.message_id] = _item(session, event.message_id)
        what = ACTION_TEXT.get(Action(event.action), event.action)
        if is_other_patient(user, event.actor_id, event.actor_role):
            rows.append(
                HistoryRow(
                    event.occurred_at,
                    OTHER_PATIENT,
                    "",
                    "",
                    what,
                    event.outcome,
                    items[event.message_id],
                    "",
                )
            )
            continue
        if event.actor_id is not None and event.actor_id not in names:  # None is "System"
            names[event.actor_id] = display_name_of(session, event.actor_id)
        rows.append(
            HistoryRow(
                event.occurred_at,
                _who(event, names),
                event.actor_role or "",
                _organisation(event, user),
                what,
                event.outcome,
                items[event.message_id],
                event.client_ip or "",
            )
        )
    return rows


def _who(event: AuditEvent, names: dict[int | None, str]) -> str:
    if event.actor_id is None and event.action in ANONYMOUS:
        return "Someone with the link (not signed in)"
    return names[event.actor_id]


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
    """Audit that ``user`` read their inbox (message.list: the subjects shown are PHI)."""
    audit.record(
        session,
        Action.MESSAGE_LIST,
        actor=audit.actor_of(user),
        meta=meta,
        patient_id=user.id,
        details={"count": rows},
    )


def _item(session: Session, message_id: int | None) -> str:
    message = session.get(Message, message_id) if message_id is not None else None
    if message is None:
        return ""
    sent = pdf.format_when(message.created_at)
    try:
        return f"{messages.read(session, message).subject} ({sent})"
    except ContentDestroyed:
        return f"Deleted message ({sent})"
