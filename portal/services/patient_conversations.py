"""Conversations as a patient sees them: write first to a care team, read a thread, answer.

A signed-in patient may start a conversation with a team the organisation opened to
patients (an admin setting per team); its members get a PHI-free notice linking to the
conversation's staff page. The patient's list shows their conversations, a row each,
the messages grouped under it; a thread shows the team's messages (those still
available, each read audited as message.view, as on the message page) and the
patient's own. Services flush; the request's boundary commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session, selectinload

from portal import audit
from portal.audit import Action, Outcome, RequestMeta, actor_of
from portal.config import current_settings
from portal.crypto.errors import ContentDestroyed
from portal.database import utcnow
from portal.models import Attachment, CareTeam, Conversation, Message, Role, User
from portal.models.messages import MessageState
from portal.models.notifications import NoticeKind
from portal.models.teams import StartedBy
from portal.services import conversations, keys, messages, messaging, names, paging, teams
from portal.services.errors import NotFound, ServiceError
from portal.services.paging import Listing, Page, PageRequest
from portal.services.pickup import message_state
from portal.services.uploads import Staging

MAX_TEXT = 10_000  # a patient's message, as a reply (pickup.MAX_REPLY)
NOT_OPEN = "Choose one of the care teams listed."


class TeamNotOpen(ServiceError):
    """The team chosen does not take messages from patients (or does not exist). Nothing was
    stored; a real team's refusal was audited (access.denied) and must be committed."""

    def __init__(self) -> None:
        super().__init__(NOT_OPEN)


# --- Writing first ---------------------------------------------------------------------------


def writable_team(
    session: Session, patient: User, public_id: str | None, *, meta: RequestMeta
) -> CareTeam:
    """Return the team with this public id if ``patient`` may write to it (active, open to
    patients). Raises TeamNotOpen otherwise; for a real team that is closed or archived the
    attempt is audited first (access.denied, reason team_not_open)."""
    team = teams.find_team(session, public_id)
    if team is not None and team.open_to_patients and team.archived_at is None:
        return team
    if team is not None:
        audit.record(
            session,
            Action.ACCESS_DENIED,
            actor=actor_of(patient),
            meta=meta,
            outcome=Outcome.DENIED,
            target_type="team",
            target_id=team.public_id,
            patient_id=patient.id,
            details={"reason": "team_not_open"},
        )
    raise TeamNotOpen()


def start(
    session: Session,
    *,
    patient: User,
    team: CareTeam,
    subject: str,
    body: str,
    staged: Staging | None = None,
    meta: RequestMeta,
) -> Conversation:
    """Start a conversation of ``patient`` with ``team`` (from :func:`writable_team`): the
    first message sealed like any other, with the files of ``staged`` (uploaded under
    ``messaging.ATTACHMENTS``), audited (conversation.start), and a PHI-free notice to each
    active member. Returns the conversation (flushed).

    Raises ServiceError for an account that is not an active patient, an empty or oversize
    subject or body, a team with nobody in it, and the uploads' refusals (UploadTooLarge,
    UploadRefused); ValueError for files staged under another policy.
    """
    _check_writer(patient, staged)
    _check_length(body)
    addressee = conversations.patient_message_recipient(session, team)
    message = messages.create(
        session,
        sender=patient,
        recipient=addressee,
        subject=subject,
        body=body,
        expires_at=_lifetime(),
        staged=staged,
    )
    conversation = teams.start_conversation(session, team, patient, StartedBy.PATIENT)
    teams.file_message(session, message, conversation)
    audit.record(
        session,
        Action.CONVERSATION_START,
        actor=actor_of(patient),
        meta=meta,
        target_type="conversation",
        target_id=conversation.public_id,
        patient_id=patient.id,
        message_id=message.id,
        details={"attachments": len(message.attachments)},
    )
    conversations.notify_team(session, conversation, message, NoticeKind.TEAM_MESSAGE)
    return conversation


def write(
    session: Session,
    conversation: Conversation,
    *,
    patient: User,
    body: str,
    staged: Staging | None = None,
    meta: RequestMeta,
) -> Message:
    """Add the patient's message to their ``conversation`` (check :func:`find_for_patient`
    first): it answers the team's newest message (``in_reply_to``; none while the team has
    not written), is audited (message.reply) and tells the team (a PHI-free reply notice).
    Reopens a conversation marked done. Returns the message (flushed).

    Raises ServiceError as :func:`start` does, and for a team that was archived.
    """
    _check_writer(patient, staged)
    _check_length(body)
    team = session.get(CareTeam, conversation.team_id)
    assert team is not None  # a foreign key guarantees it
    answered = _newest_from_team(session, conversation)
    sender = pickup_sender(session, answered)
    addressee = (
        sender
        if sender is not None and teams.is_member(session, sender, team.id)
        else conversations.patient_message_recipient(session, team)
    )
    message = messages.create(
        session,
        sender=patient,
        recipient=addressee,
        subject=conversations.re_subject(conversations.thread_subject(session, conversation)),
        body=body,
        expires_at=_lifetime(),
        staged=staged,
        in_reply_to=answered,
    )
    teams.file_message(session, message, conversation)
    audit.record(
        session,
        Action.MESSAGE_REPLY,
        actor=actor_of(patient),
        meta=meta,
        target_type="message",
        target_id=message.public_id,
        patient_id=patient.id,
        message_id=answered.id if answered is not None else message.id,
    )
    conversations.notify_team(session, conversation, message, NoticeKind.REPLY, addressed_to=sender)
    return message


def pickup_sender(session: Session, message: Message | None) -> User | None:
    """Return the active member of staff who sent ``message``, or None."""
    if message is None:
        return None
    sender = session.get(User, message.sender_id)
    return sender if sender is not None and not sender.disabled else None


def _newest_from_team(session: Session, conversation: Conversation) -> Message | None:
    return session.scalar(
        select(Message)
        .where(
            Message.conversation_id == conversation.id,
            Message.sender_id != conversation.patient_id,
        )
        .order_by(Message.created_at.desc(), Message.id.desc())
        .limit(1)
    )


def _check_writer(patient: User, staged: Staging | None) -> None:
    if staged is not None and staged.policy is not messaging.ATTACHMENTS:
        raise ValueError("attachments must be staged under messaging.ATTACHMENTS")
    if patient.role != Role.PATIENT or patient.disabled:
        raise ServiceError("Only patients can write to a care team.")


def _check_length(body: str) -> None:
    if not body.strip() or len(body) > MAX_TEXT:
        raise ServiceError(f"Write a message of 1 to {MAX_TEXT:,} characters.")


def _lifetime() -> datetime:
    """A patient's message stays readable by the team as long as any message may."""
    return utcnow() + timedelta(seconds=current_settings().link_max_ttl)


# --- The patient's list ----------------------------------------------------------------------


@dataclass(frozen=True)
class ThreadRow:
    """One conversation in the patient's list: the team, its subject, what is new."""

    public_id: str
    team_name: str
    subject: str
    messages: int
    unread: int  # the team's messages the patient has not opened yet
    last_message_at: datetime


def _unopened(patient: User, now: datetime) -> ColumnElement[int]:
    """The number of a conversation's messages to ``patient`` still available and unopened."""
    return (
        select(func.count(Message.id))
        .where(
            Message.conversation_id == Conversation.id,
            Message.recipient_id == patient.id,
            Message.first_opened_at.is_(None),
            Message.revoked_at.is_(None),
            Message.destroyed_at.is_(None),
            Message.expires_at > now,
        )
        .correlate(Conversation)
        .scalar_subquery()
    )


def _count() -> ColumnElement[int]:
    return (
        select(func.count(Message.id))
        .where(Message.conversation_id == Conversation.id)
        .correlate(Conversation)
        .scalar_subquery()
    )


def threads(session: Session, patient: User, want: PageRequest | None = None) -> Page[ThreadRow]:
    """Return one page of ``patient``'s conversations, latest activity first.

    Four queries at most whatever the list's length: the cursor's row (when paging), the
    page with its counts, its teams, its first messages with their keys (only subjects
    are unsealed). Raises PageError for a cursor that is not one of this patient's.
    """
    listing = Listing(
        where=(Conversation.patient_id == patient.id,),
        order=(Conversation.last_message_at, Conversation.id),
        cursor=Conversation.public_id,
    )
    stmt = select(
        Conversation, _count().label("count"), _unopened(patient, utcnow()).label("unopened")
    )
    page = paging.fetch(session, listing, stmt, want or PageRequest(), lambda r: r[0].public_id)
    found = [row[0] for row in page.rows]
    team_names = _team_names(session, {c.team_id for c in found})
    subjects = conversations.subjects_of(session, [c.id for c in found])
    return page.map(lambda row: _thread_row(row, team_names, subjects))


def _thread_row(row: Any, team_names: dict[int, str], subjects: dict[int, str]) -> ThreadRow:
    conversation: Conversation = row[0]
    return ThreadRow(
        public_id=conversation.public_id,
        team_name=team_names.get(conversation.team_id, ""),
        subject=subjects.get(conversation.id, conversations.DELETED),
        messages=int(row[1]),
        unread=int(row[2]),
        last_message_at=conversation.last_message_at,
    )


def _team_names(session: Session, team_ids: set[int]) -> dict[int, str]:
    if not team_ids:
        return {}
    rows = session.execute(select(CareTeam.id, CareTeam.name).where(CareTeam.id.in_(team_ids)))
    return {row.id: row.name for row in rows}


def record_list_view(session: Session, patient: User, rows: int, meta: RequestMeta) -> None:
    """Audit that ``patient`` read their list of conversations (message.list: subjects)."""
    audit.record(
        session,
        Action.MESSAGE_LIST,
        actor=actor_of(patient),
        meta=meta,
        patient_id=patient.id,
        details={"page": "conversations", "count": rows},
    )


# --- One thread ------------------------------------------------------------------------------


def find_for_patient(
    session: Session, public_id: str, patient: User, *, meta: RequestMeta
) -> Conversation:
    """Return ``patient``'s conversation with this public id.

    Raises NotFound for an unknown id, and, audited (access.denied, reason not_patient),
    for anyone else's conversation.
    """
    conversation = conversations.find(session, public_id)
    if conversation is None:
        raise NotFound("There is nothing here.")
    if conversation.patient_id == patient.id and patient.role == Role.PATIENT:
        return conversation
    audit.record(
        session,
        Action.ACCESS_DENIED,
        actor=actor_of(patient),
        meta=meta,
        outcome=Outcome.DENIED,
        target_type="conversation",
        target_id=conversation.public_id,
        patient_id=conversation.patient_id,
        details={"reason": "not_patient"},
    )
    raise NotFound("There is nothing here.")


@dataclass(frozen=True)
class Said:
    """One message of the patient's thread; content only when ``state`` is AVAILABLE."""

    message: Message
    mine: bool
    author: str
    body: str | None
    body_format: str
    files: list[tuple[Attachment, str]]
    state: MessageState
    unread: bool


@dataclass(frozen=True)
class PatientThread:
    """A conversation as its patient sees it, oldest message first."""

    conversation: Conversation
    team_name: str
    subject: str
    entries: list[Said]
    can_write: bool  # the team still exists (not archived)

    @property
    def shown(self) -> list[Said]:
        """The team's messages whose content the page shows: each a message.view."""
        return [e for e in self.entries if not e.mine and e.body is not None]


def load_thread(session: Session, conversation: Conversation, patient: User) -> PatientThread:
    """Return the thread (``find_for_patient`` first); reads only, :func:`record_read` audits.

    The team's messages that were revoked, have expired or were deleted are listed without
    their content. A bounded number of queries whatever the thread's length.
    """
    thread = list(
        session.scalars(
            select(Message)
            .where(Message.conversation_id == conversation.id)
            .options(selectinload(Message.attachments))
            .order_by(Message.created_at, Message.id)
        )
    )
    keys.prefetch(session, {m.data_key_id for m in thread})
    people = names.display_names(session, {m.sender_id for m in thread})
    team = session.get(CareTeam, conversation.team_id)
    assert team is not None  # a foreign key guarantees it
    entries = [_said(session, m, patient, people, message_state(m)) for m in thread]
    first = next((e for e in entries if e.body is not None), None)
    subject = conversations.DELETED
    if first is not None:
        subject = messages.read(session, first.message).subject
    return PatientThread(conversation, team.name, subject, entries, team.archived_at is None)


def _said(
    session: Session, message: Message, patient: User, people: dict[int, str], state: MessageState
) -> Said:
    mine = message.sender_id == patient.id
    readable = None
    if (mine and message.destroyed_at is None) or state == MessageState.AVAILABLE:
        try:
            readable = messages.read(session, message)
        except ContentDestroyed:
            state = MessageState.DELETED
    files = [(a, readable.filenames[a.id]) for a in message.attachments] if readable else []
    return Said(
        message=message,
        mine=mine,
        author="You" if mine else people[message.sender_id],
        body=readable.body if readable else None,
        body_format=message.body_format,
        files=files,
        state=state,
        unread=not mine and message.first_opened_at is None,
    )


def record_read(session: Session, thread: PatientThread, patient: User, meta: RequestMeta) -> None:
    """Audit each of the team's messages the page showed (message.view, as the message page
    does) and mark the unopened ones opened. Flushed; returns None."""
    now = utcnow()
    for entry in thread.shown:
        message = entry.message
        if message.first_opened_at is None and message.recipient_id == patient.id:
            message.first_opened_at = now
        audit.record(
            session,
            Action.MESSAGE_VIEW,
            actor=actor_of(patient),
            meta=meta,
            target_type="message",
            target_id=message.public_id,
            patient_id=patient.id,
            message_id=message.id,
            details={"page": "conversation"},
        )
    session.flush()


def with_team(session: Session, patient: User) -> list[CareTeam]:
    """Return the teams ``patient`` may start a conversation with (open, active), by name."""
    return teams.open_teams(session) if patient.role == Role.PATIENT else []
