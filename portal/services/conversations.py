"""Conversations as staff work them: finding one, assignment, done, answers, team notices.

A conversation is one patient's thread with one care team (portal.models.teams). Its
members see it in their team inbox, unread patient messages first: unread *for them*,
since each member's read state is their own (``conversation_reads``: unread while a
patient message is newer than what they last saw). Everything here checks membership
first (portal.services.teams.require_member: others get NotFound and ``access.denied``),
audits every read of PHI (the list, the thread, each patient message shown) and every
change, and flushes; the request's boundary commits.

An answer is a message like any other (``messaging.send`` in the conversation): the
patient gets the PHI-free pickup notice with its own link. A patient's message tells
the team with a PHI-free notice whose link is the conversation's page (no PHI in it:
the conversation's public id only), which asks for sign-in first and comes back to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from portal import audit
from portal.audit import Action, Actor, RequestMeta
from portal.config import current_settings
from portal.crypto.errors import ContentDestroyed
from portal.database import rowcount
from portal.models import Attachment, CareTeam, Conversation, Message, Role, User
from portal.models.notifications import NoticeKind
from portal.models.teams import ConversationState
from portal.services import content, keys, messages, messaging, notices, teams
from portal.services.errors import ServiceError
from portal.services.uploads import Staging

DELETED = "(deleted)"
# The conversation page's path, as the notices to staff carry it (portal.staff.conversations
# serves it; a test keeps the two in step).
CONVERSATION_PATH = "/staff/conversations/{public_id}"


# --- Finding and access ----------------------------------------------------------------------


def well_formed(public_id: str | None) -> bool:
    """Return True when ``public_id`` has the shape of a public id (32 letters and digits)."""
    return (
        public_id is not None
        and len(public_id) == 32
        and public_id.isascii()
        and public_id.isalnum()
    )


def find(session: Session, public_id: str | None) -> Conversation | None:
    """Return the conversation with this public id, or None (also for malformed ids)."""
    if not well_formed(public_id):
        return None
    return session.scalar(select(Conversation).where(Conversation.public_id == public_id))


def of_message(session: Session, message: Message) -> Conversation | None:
    """Return the conversation ``message`` belongs to (None only for a row older than 0005)."""
    if message.conversation_id is None:
        return None
    return session.get(Conversation, message.conversation_id)


def check_member(
    session: Session, conversation: Conversation, staff: User, *, meta: RequestMeta
) -> None:
    """Return None when ``staff`` is in the conversation's team.

    Anyone else is audited (access.denied, reason not_in_team) and gets NotFound, the
    answer for a conversation that does not exist.
    """
    teams.require_member(
        session,
        staff,
        conversation.team_id,
        meta=meta,
        target_type="conversation",
        target_id=conversation.public_id,
        patient_id=conversation.patient_id,
    )


def conversation_url(conversation: Conversation) -> str:
    """Return the absolute URL of the conversation's staff page (public id only: no PHI)."""
    path = CONVERSATION_PATH.format(public_id=conversation.public_id)
    return f"{current_settings().base_url}{path}"


def subjects_of(session: Session, conversation_ids: list[int]) -> dict[int, str]:
    """Each conversation's subject (its first message's), one query for the page: the
    first messages joined to their data keys; nothing else of them is unsealed."""
    if not conversation_ids:
        return {}
    first = (
        select(func.min(Message.id))
        .where(Message.conversation_id.in_(conversation_ids))
        .group_by(Message.conversation_id)
    )
    stmt = messages.listed(Message.conversation_id).where(Message.id.in_(first))
    return {row.conversation_id: _subject(session, row) for row in session.execute(stmt)}


def _subject(session: Session, row: Row[Any]) -> str:
    if row.destroyed_at is not None:
        return DELETED
    try:
        return messages.listed_subject(session, row)
    except ContentDestroyed:
        return DELETED


# --- Changes ---------------------------------------------------------------------------------


def assign(
    session: Session,
    conversation: Conversation,
    assignee_public_id: str | None,
    *,
    actor: User,
    meta: RequestMeta,
) -> User | None:
    """Assign the conversation to a member of its team (empty: unassign); return them.

    Audited (conversation.assign, with the assignee's user id). Raises ServiceError for
    anyone who is not active staff in the conversation's team: an unknown id, a patient,
    a member of another team, a disabled account.
    """
    assignee = None
    if assignee_public_id:
        from portal.services.accounts import find_by_public_id

        assignee = find_by_public_id(session, assignee_public_id.strip(), role=Role.STAFF)
        if assignee is None or not teams.is_member(session, assignee, conversation.team_id):
            raise ServiceError("Choose a member of this care team.")
    conversation.assigned_to_id = assignee.id if assignee is not None else None
    session.flush()
    _record_change(
        session,
        Action.CONVERSATION_ASSIGN,
        conversation,
        audit.actor_of(actor),
        meta,
        assigned_to=assignee.id if assignee is not None else None,
    )
    return assignee


def mark_done(
    session: Session, conversation: Conversation, *, actor: User, meta: RequestMeta
) -> None:
    """Mark an open conversation done (conversation.done); a new patient message reopens it.

    One conditional UPDATE, so of two members pressing "Done" at once one succeeds and the
    other is told it is done already (ServiceError), and nothing is audited twice.
    """
    _move(session, conversation, ConversationState.OPEN, ConversationState.DONE)
    _record_change(session, Action.CONVERSATION_DONE, conversation, audit.actor_of(actor), meta)


def reopen(session: Session, conversation: Conversation, *, actor: User, meta: RequestMeta) -> None:
    """Reopen a conversation marked done (conversation.reopen); ServiceError when it is open."""
    _move(session, conversation, ConversationState.DONE, ConversationState.OPEN)
    _record_change(session, Action.CONVERSATION_REOPEN, conversation, audit.actor_of(actor), meta)


def _move(
    session: Session,
    conversation: Conversation,
    was: ConversationState,
    becomes: ConversationState,
) -> None:
    result = session.execute(
        update(Conversation)
        .where(Conversation.id == conversation.id, Conversation.state == was)
        .values(state=becomes)
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) == 0:
        session.refresh(conversation, ["state"])
        if becomes == ConversationState.DONE:
            raise ServiceError("This conversation is already marked done.")
        raise ServiceError("This conversation is already open.")
    session.refresh(conversation, ["state"])


def _record_change(
    session: Session,
    action: Action,
    conversation: Conversation,
    actor: Actor,
    meta: RequestMeta,
    **details: object,
) -> None:
    audit.record(
        session,
        action,
        actor=actor,
        meta=meta,
        target_type="conversation",
        target_id=conversation.public_id,
        patient_id=conversation.patient_id,
        details=details,
    )


def answer(
    session: Session,
    conversation: Conversation,
    *,
    sender: User,
    body: str,
    staged: Staging | None = None,
    expires_in: timedelta | None = None,
    meta: RequestMeta,
) -> messaging.Sent:
    """Answer the patient in the thread: a message in ``conversation`` from ``sender``,
    sealed and sent like any other (``messaging.send``: a pickup link and the PHI-free
    notice to the patient, message.send audited). Its subject is "Re: " and the thread's.

    Raises ServiceError for a patient who can no longer receive messages, an empty or
    oversize body, and the refusals of ``messaging.send`` (uploads included).
    """
    patient = session.get(User, conversation.patient_id)
    if patient is None or patient.disabled:
        raise ServiceError("This patient's account is closed: they cannot get messages.")
    return messaging.send(
        session,
        sender=sender,
        recipient=patient,
        subject=re_subject(thread_subject(session, conversation)),
        body=body,
        staged=staged,
        expires_in=expires_in,
        conversation=conversation,
        meta=meta,
    )


def thread_subject(session: Session, conversation: Conversation) -> str:
    """Return the conversation's subject (its first message's), unsealed; DELETED when gone."""
    return subjects_of(session, [conversation.id]).get(conversation.id, DELETED)


def re_subject(subject: str) -> str:
    text = subject if subject.lower().startswith("re:") else f"Re: {subject}"
    return text[: messages.MAX_SUBJECT]


# --- Telling the team ------------------------------------------------------------------------


def notice_recipients(
    session: Session, conversation: Conversation, *, addressed_to: User | None = None
) -> list[User]:
    """Return who on the team hears of a new patient message: its assignee, else the member
    the patient wrote to (the sender of the message answered), else every active member.

    Only active members of the conversation's team: someone who left it hears nothing.
    """
    team = session.get(CareTeam, conversation.team_id)
    if team is None or team.archived_at is not None:
        return []
    members = {u.id: u for u in teams.members_of(session, team)}
    for preferred in (conversation.assigned_to_id, addressed_to.id if addressed_to else None):
        if preferred is not None and preferred in members:
            return [members[preferred]]
    return list(members.values())


def notify_team(
    session: Session,
    conversation: Conversation,
    message: Message,
    kind: NoticeKind,
    *,
    addressed_to: User | None = None,
) -> int:
    """Queue a PHI-free notice of ``kind`` (REPLY or TEAM_MESSAGE) about the patient's
    ``message`` to :func:`notice_recipients`, linking to the conversation's page; return how
    many were queued (flushed). Raises ContentDestroyed for a recipient whose key was shredded.
    """
    url = conversation_url(conversation)
    recipients = notice_recipients(session, conversation, addressed_to=addressed_to)
    for member in recipients:
        notices.enqueue(session, kind=kind, recipient=member, url=url, message=message)
    return len(recipients)


def patient_message_recipient(session: Session, team: CareTeam) -> User:
    """Return the member a patient-started message is addressed to (``recipient_id``): the
    one longest in the team. The team reads it, whoever that is; ServiceError when the team
    has no active member to take it."""
    members = teams.members_of(session, team) if team.archived_at is None else []
    if not members:
        raise ServiceError("This team cannot take messages at the moment. Contact the practice.")
    return members[0]


# --- Files -----------------------------------------------------------------------------------


def find_attachment(
    session: Session, conversation: Conversation, message_id: str, attachment_id: str
) -> Attachment | None:
    """Return the attachment ``attachment_id`` of message ``message_id`` when that message
    is in ``conversation``, else None (ids from a URL: anything at all)."""
    if not (well_formed(message_id) and well_formed(attachment_id)):
        return None
    return session.scalar(
        select(Attachment)
        .join(Message, Message.id == Attachment.message_id)
        .where(
            Message.public_id == message_id,
            Message.conversation_id == conversation.id,
            Attachment.public_id == attachment_id,
        )
    )


def open_attachment(
    session: Session,
    attachment: Attachment,
    conversation: Conversation,
    staff: User,
    meta: RequestMeta,
    *,
    inline: bool = False,
) -> tuple[str, Iterator[bytes]]:
    """Open a thread's attachment for a member of its team (:func:`check_member` first),
    then audit the download (attachment.download, the conversation's patient named), or,
    ``inline``, the view of a photo on the conversation page (attachment.view, as a
    patient's, with ``inline`` in its details).

    Returns its file name and segment iterator (whose ``close`` closes the blob); if the
    event cannot be written the blob is closed and the error propagates, so nothing is
    served unaudited. Raises ContentDestroyed when the message was shredded,
    ContentTampered for a damaged blob.
    """
    key = keys.unwrap(session, attachment.message.data_key_id)
    name = keys.open_text(
        key, "attachments", "filename", attachment.public_id, attachment.filename_sealed
    )
    chunks = content.open_attachment(session, attachment)
    details: dict[str, object] = {"size": attachment.size}
    if inline:
        details["inline"] = True
    try:
        audit.record(
            session,
            Action.ATTACHMENT_VIEW if inline else Action.ATTACHMENT_DOWNLOAD,
            actor=audit.actor_of(staff),
            meta=meta,
            target_type="attachment",
            target_id=attachment.public_id,
            patient_id=conversation.patient_id,
            message_id=attachment.message_id,
            details=details,
        )
    except BaseException:
        # mypy: chunks is typed Iterator; the generator behind it has close(), which releases the
        #   blob file.
        chunks.close()  # type: ignore[attr-defined]
        raise
    return name, chunks
