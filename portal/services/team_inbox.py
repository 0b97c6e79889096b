"""The team inbox and one thread, as a member of staff reads them.

The inbox lists the conversations of the reader's teams, those with a patient message
unread *for them* first (each member's read state is their own: ``conversation_reads``,
unread while a patient message is newer than what they last saw), then by last
activity. A list unseals only what it shows: the first message's subject and the
people's names. A thread shows every message of the conversation; its view renders it,
then :func:`record_read` audits the page (conversation.read) and each patient message
shown (reply.read: a read of PHI each) and moves the reader's read state. Membership is
checked first (portal.services.conversations.check_member). Services flush; the
request's boundary commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import ColumnElement, and_, case, or_, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, selectinload

from portal import audit
from portal.audit import Action, RequestMeta
from portal.crypto.errors import ContentDestroyed
from portal.models import Attachment, CareTeam, Conversation, ConversationRead, Message, User
from portal.models.messages import MessageState
from portal.models.teams import ConversationState, StartedBy
from portal.services import keys, messages, names, paging, teams
from portal.services.conversations import DELETED, subjects_of
from portal.services.errors import NotFound
from portal.services.paging import Listing, Page, PageRequest
from portal.services.pickup import message_state


class Show(StrEnum):
    """Which conversations the team inbox lists."""

    OPEN = "open"
    DONE = "done"
    ALL = "all"


# --- The team inbox --------------------------------------------------------------------------


@dataclass(frozen=True)
class InboxRow:
    """One line of the team inbox: who, what (the first message's subject), how it stands."""

    public_id: str
    team_name: str
    patient_name: str
    subject: str
    unread: bool
    done: bool
    assignee_name: str | None
    mine: bool  # assigned to the reader
    started_by_patient: bool
    last_message_at: datetime


def unread_flag(staff_id: int) -> ColumnElement[int]:
    """Return 1 for a conversation with a patient message newer than ``staff_id`` last read
    (or never read), else 0: a correlated expression, so a list sorts by it in one query."""
    read_at = (
        select(ConversationRead.read_at)
        .where(
            ConversationRead.conversation_id == Conversation.id,
            ConversationRead.user_id == staff_id,
        )
        .correlate(Conversation)
        .scalar_subquery()
    )
    newer = or_(read_at.is_(None), Conversation.last_patient_message_at > read_at)
    return case((and_(Conversation.last_patient_message_at.is_not(None), newer), 1), else_=0)


def team_inbox(
    session: Session,
    staff: User,
    want: PageRequest | None = None,
    *,
    team: CareTeam | None = None,
    show: Show = Show.OPEN,
    reader_teams: list[CareTeam] | None = None,
) -> Page[InboxRow]:
    """Return one page of the conversations of ``staff``'s teams (or of ``team``, one of
    them): unread for them first, then by last activity, newest first.

    Five queries at most whatever the inbox's length: the reader's teams (none when the
    caller hands them in as ``reader_teams``, from ``teams.teams_of``), the cursor's row
    (when paging), the page, its first messages with their keys (only those subjects are
    unsealed), its people with their keys. Raises PageError for a cursor that is not a
    conversation of this listing, ValueError for a ``team`` the reader is not in (the view
    resolves it with :func:`inbox_team` first).
    """
    found_teams = teams.teams_of(session, staff) if reader_teams is None else reader_teams
    mine = {t.id: t for t in found_teams}
    if team is not None and team.id not in mine:
        raise ValueError("team_inbox: not one of the reader's teams")
    unread = unread_flag(staff.id)
    listing = Listing(
        where=_inbox_filters(staff, team, show),
        order=(unread, Conversation.last_message_at, Conversation.id),
        cursor=Conversation.public_id,
    )
    stmt = select(Conversation, unread.label("unread"))
    page = paging.fetch(session, listing, stmt, want or PageRequest(), lambda r: r[0].public_id)
    found = [(row[0], bool(row[1])) for row in page.rows]
    subjects = subjects_of(session, [c.id for c, _ in found])
    people = names.display_names(
        session,
        {c.patient_id for c, _ in found} | {c.assigned_to_id for c, _ in found if c.assigned_to_id},
    )
    rows = {c.public_id: _inbox_row(c, flag, mine, subjects, people, staff) for c, flag in found}
    return page.map(lambda row: rows[row[0].public_id])


def _inbox_filters(
    staff: User, team: CareTeam | None, show: Show
) -> tuple[ColumnElement[bool], ...]:
    where: list[ColumnElement[bool]] = [Conversation.team_id.in_(teams.team_ids_of(staff))]
    if team is not None:
        where.append(Conversation.team_id == team.id)
    if show is Show.OPEN:
        where.append(Conversation.state == ConversationState.OPEN)
    elif show is Show.DONE:
        where.append(Conversation.state == ConversationState.DONE)
    return tuple(where)


def _inbox_row(
    conversation: Conversation,
    unread: bool,
    mine: dict[int, CareTeam],
    subjects: dict[int, str],
    people: dict[int, str],
    staff: User,
) -> InboxRow:
    assignee = conversation.assigned_to_id
    return InboxRow(
        public_id=conversation.public_id,
        team_name=mine[conversation.team_id].name,
        patient_name=people[conversation.patient_id],
        subject=subjects.get(conversation.id, DELETED),
        unread=unread,
        done=conversation.state == ConversationState.DONE,
        assignee_name=people[assignee] if assignee is not None else None,
        mine=assignee == staff.id,
        started_by_patient=conversation.started_by == StartedBy.PATIENT,
        last_message_at=conversation.last_message_at,
    )


def inbox_team(
    session: Session, staff: User, public_id: str | None, *, meta: RequestMeta
) -> CareTeam | None:
    """Return the team the inbox is narrowed to (None: all of the reader's teams).

    Raises NotFound for an unknown team, and, audited (access.denied), for a team the
    reader is not in.
    """
    if not public_id:
        return None
    team = teams.find_team(session, public_id)
    if team is None:
        raise NotFound("There is nothing here.")
    teams.require_member(
        session, staff, team.id, meta=meta, target_type="team", target_id=team.public_id
    )
    return team


def record_inbox_view(session: Session, staff: User, rows: int, meta: RequestMeta) -> None:
    """Audit that ``staff`` read a page of the team inbox (message.list: names and subjects)."""
    audit.record(
        session,
        Action.MESSAGE_LIST,
        actor=audit.actor_of(staff),
        meta=meta,
        details={"page": "team_inbox", "count": rows},
    )


# --- One thread ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One message of a thread as staff see it; ``body`` None when it was deleted."""

    message: Message
    from_patient: bool
    author: str
    subject: str | None
    body: str | None
    body_format: str
    files: list[tuple[Attachment, str]]
    state: MessageState
    new: bool  # a patient message newer than the reader last saw


@dataclass(frozen=True)
class Thread:
    """A conversation's page: the thread, oldest first, and what the forms offer."""

    conversation: Conversation
    team: CareTeam
    patient: User
    patient_name: str
    subject: str
    entries: list[Entry]
    members: list[tuple[User, str]]  # the team's active staff, for assignment
    assignee_name: str | None

    @property
    def done(self) -> bool:
        """Whether a member marked it done (a new patient message reopens it)."""
        return self.conversation.state == ConversationState.DONE

    @property
    def patient_messages(self) -> list[Entry]:
        """The patient's messages shown (not deleted): each is a ``reply.read``."""
        return [e for e in self.entries if e.from_patient and e.body is not None]


def load_thread(session: Session, conversation: Conversation, staff: User) -> Thread:
    """Return the conversation's thread for ``staff`` (a member: :func:`check_member` first).

    Reads only: the view renders it, then :func:`record_read` audits the reads and moves
    the reader's read state. A bounded number of queries whatever the thread's length (the
    messages, their attachments, their keys, the people). Raises ContentTampered for a
    sealed value that was altered.
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
    team = session.get(CareTeam, conversation.team_id)
    patient = session.get(User, conversation.patient_id)
    assert team is not None  # a foreign key guarantees it
    assert patient is not None  # a foreign key guarantees it
    members = teams.members_of(session, team)
    people = names.display_names(
        session,
        {m.sender_id for m in thread}
        | {u.id for u in members}
        | {conversation.patient_id}
        | ({conversation.assigned_to_id} if conversation.assigned_to_id else set()),
    )
    seen = _read_at(session, conversation, staff)
    entries = [_entry(session, m, conversation, people, seen) for m in thread]
    return Thread(
        conversation=conversation,
        team=team,
        patient=patient,
        patient_name=people[conversation.patient_id],
        subject=next((e.subject for e in entries if e.subject is not None), DELETED),
        entries=entries,
        members=[(u, people[u.id]) for u in members],
        assignee_name=people.get(conversation.assigned_to_id or -1),
    )


def _read_at(session: Session, conversation: Conversation, staff: User) -> datetime | None:
    return session.scalar(
        select(ConversationRead.read_at).where(
            ConversationRead.conversation_id == conversation.id,
            ConversationRead.user_id == staff.id,
        )
    )


def _entry(
    session: Session,
    message: Message,
    conversation: Conversation,
    people: dict[int, str],
    seen: datetime | None,
) -> Entry:
    from_patient = message.sender_id == conversation.patient_id
    state = message_state(message)
    readable: messages.Readable | None = None
    if message.destroyed_at is None:
        try:
            readable = messages.read(session, message)
        except ContentDestroyed:
            state = MessageState.DELETED
    files = [(a, readable.filenames[a.id]) for a in message.attachments] if readable else []
    return Entry(
        message=message,
        from_patient=from_patient,
        author=people[message.sender_id],
        subject=readable.subject if readable else None,
        body=readable.body if readable else None,
        body_format=message.body_format,
        files=files,
        state=state,
        new=from_patient and (seen is None or message.created_at > seen),
    )


def record_read(session: Session, thread: Thread, staff: User, meta: RequestMeta) -> None:
    """Audit that ``staff`` read the thread (conversation.read, and reply.read for each
    patient message shown: a read of PHI each) and mark it read for them up to the newest
    patient message shown (a later one stays unread). Flushed; returns None."""
    conversation, actor = thread.conversation, audit.actor_of(staff)
    shown = thread.patient_messages
    audit.record(
        session,
        Action.CONVERSATION_READ,
        actor=actor,
        meta=meta,
        target_type="conversation",
        target_id=conversation.public_id,
        patient_id=conversation.patient_id,
        details={"messages": len(thread.entries), "new": sum(e.new for e in shown)},
    )
    for entry in shown:
        audit.record(
            session,
            Action.REPLY_READ,
            actor=actor,
            meta=meta,
            target_type="message",
            target_id=entry.message.public_id,
            patient_id=conversation.patient_id,
            message_id=entry.message.id,
            details={"conversation": conversation.public_id},
        )
    if shown:
        mark_read(session, conversation, staff, max(e.message.created_at for e in shown))


def mark_read(session: Session, conversation: Conversation, staff: User, up_to: datetime) -> None:
    """Record that ``staff`` has read ``conversation`` up to ``up_to`` (never backwards).

    One statement (an upsert on the (conversation, member) pair), so two tabs or two
    requests at once cannot trip the unique constraint. Flushed; returns None.
    """
    dialect = session.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    stmt = insert(ConversationRead).values(
        conversation_id=conversation.id, user_id=staff.id, read_at=up_to
    )
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=[ConversationRead.conversation_id, ConversationRead.user_id],
            set_={"read_at": stmt.excluded.read_at},
            where=ConversationRead.read_at < stmt.excluded.read_at,
        )
    )
    session.flush()
