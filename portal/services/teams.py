"""Care teams: whose messages a member of staff may see, and the admin changes to teams.

Every message belongs to one team (``Message.team_id``) and one conversation. A member
of staff sees, answers, revokes and resends only the messages of the active teams they
belong to (ASVS V4.2.1): that is how a colleague covers for another. Membership is read
from the database on every check, so a removal takes effect on the member's next request,
in a session already open too. Every change to a team is audited; the details carry ids
and flags only (a team's name is typed by an admin: never copied into the trail).
"""

from __future__ import annotations

from sqlalchemy import Select, false, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from portal import audit
from portal.audit import Action, Actor, Outcome, RequestMeta
from portal.database import utcnow
from portal.models import CareTeam, CareTeamMember, Conversation, Message, Role, User
from portal.models.teams import MAX_TEAM_DESCRIPTION, MAX_TEAM_NAME, ConversationState, StartedBy
from portal.services.errors import NotFound, ServiceError

NAME_TAKEN = "Another team already has that name. Choose another."
ALREADY_MEMBER = "They are already a member of this team."


class NoTeam(ServiceError):
    """A member of staff in no active team: they cannot send until an admin adds them."""

    def __init__(self) -> None:
        super().__init__(
            "You are not in a care team, so you cannot send messages yet: "
            "ask an admin to add you to a care team."
        )


# --- Who may see what ----------------------------------------------------------------------


def team_ids_of(staff: User) -> Select[int]:
    """Return a SELECT of the ids of ``staff``'s active teams, for ``team_id.in_(...)``.

    It runs nothing itself, so a list query filters by team in its own statement. It
    selects nothing for anyone who is not active staff.
    """
    stmt = (
        select(CareTeamMember.team_id)
        .join(CareTeam, CareTeam.id == CareTeamMember.team_id)
        .where(CareTeamMember.user_id == staff.id, CareTeam.archived_at.is_(None))
    )
    return stmt if _active_staff(staff) else stmt.where(false())


def teams_of(session: Session, staff: User) -> list[CareTeam]:
    """Return the active teams ``staff`` belongs to, by name ([] for anyone not active staff)."""
    return list(
        session.scalars(
            select(CareTeam).where(CareTeam.id.in_(team_ids_of(staff))).order_by(CareTeam.name)
        )
    )


def is_member(session: Session, staff: User, team_id: int | None) -> bool:
    """Return True when ``staff`` is active staff in the active team ``team_id``."""
    if team_id is None or not _active_staff(staff):
        return False
    found = session.scalar(team_ids_of(staff).where(CareTeamMember.team_id == team_id).limit(1))
    return found is not None


def require_member(
    session: Session,
    staff: User,
    team_id: int | None,
    *,
    meta: RequestMeta,
    target_type: str,
    target_id: str,
    patient_id: int | None = None,
    message_id: int | None = None,
) -> None:
    """Return None when ``staff`` is a member of the active team ``team_id``.

    Anyone else is audited (access.denied, reason not_in_team) and gets NotFound, the
    same answer as for something that does not exist.
    """
    if is_member(session, staff, team_id):
        return
    audit.record(
        session,
        Action.ACCESS_DENIED,
        actor=audit.actor_of(staff),
        meta=meta,
        outcome=Outcome.DENIED,
        target_type=target_type,
        target_id=target_id,
        patient_id=patient_id,
        message_id=message_id,
        details={"reason": "not_in_team"},
    )
    raise NotFound("There is nothing here.")


def sending_team(session: Session, staff: User, team_public_id: str | None) -> CareTeam:
    """Return the team a message from ``staff`` belongs to: the one chosen, or their only one.

    Raises NoTeam for staff in no active team, ServiceError when they are in several and
    chose none, or chose a team that is not one of theirs.
    """
    mine = teams_of(session, staff)
    if not mine:
        raise NoTeam()
    if team_public_id:
        for team in mine:
            if team.public_id == team_public_id:
                return team
        raise ServiceError("Choose one of your care teams.")
    if len(mine) > 1:
        raise ServiceError("Choose the care team this message is from.")
    return mine[0]


def members_of(session: Session, team: CareTeam, *, active_only: bool = True) -> list[User]:
    """Return the staff in ``team``, longest-standing first (``active_only``: not disabled)."""
    stmt = (
        select(User)
        .join(CareTeamMember, CareTeamMember.user_id == User.id)
        .where(CareTeamMember.team_id == team.id, User.role == Role.STAFF)
        .order_by(CareTeamMember.added_at, CareTeamMember.id)
    )
    if active_only:
        stmt = stmt.where(User.disabled.is_(False))
    return list(session.scalars(stmt))


def find_team(session: Session, public_id: str | None) -> CareTeam | None:
    """Return the team (archived ones too) with this public id, or None."""
    if not public_id or len(public_id) != 32 or not public_id.isalnum():
        return None
    return session.scalar(select(CareTeam).where(CareTeam.public_id == public_id))


def find_by_name(session: Session, name: str) -> CareTeam | None:
    """Return the team (archived ones too) with this name, case and spacing aside, or None."""
    wanted = " ".join(name.split()).lower()
    return session.scalar(select(CareTeam).where(func.lower(CareTeam.name) == wanted))


def open_teams(session: Session) -> list[CareTeam]:
    """Return the active teams patients may start a conversation with, by name."""
    return list(
        session.scalars(
            select(CareTeam)
            .where(CareTeam.open_to_patients.is_(True), CareTeam.archived_at.is_(None))
            .order_by(CareTeam.name)
        )
    )


def all_teams(session: Session) -> list[tuple[CareTeam, int]]:
    """Return every team with its number of active members: active teams first, by name.

    One query; teams are organisational units (tens, not thousands), so one page.
    """
    members = (
        select(func.count(CareTeamMember.id))
        .join(User, User.id == CareTeamMember.user_id)
        .where(CareTeamMember.team_id == CareTeam.id, User.disabled.is_(False))
        .correlate(CareTeam)
        .scalar_subquery()
    )
    rows = session.execute(
        select(CareTeam, members).order_by(CareTeam.archived_at.is_not(None), CareTeam.name)
    )
    return [(row[0], row[1]) for row in rows]


def _active_staff(user: User) -> bool:
    return user.role == Role.STAFF and not user.disabled


# --- Conversations: every message joins one --------------------------------------------------


def start_conversation(
    session: Session, team: CareTeam, patient: User, started_by: StartedBy
) -> Conversation:
    """Return a new open conversation between ``team`` and ``patient`` (flushed)."""
    conversation = Conversation(
        team_id=team.id, patient_id=patient.id, started_by=started_by, last_message_at=utcnow()
    )
    session.add(conversation)
    session.flush()
    return conversation


def file_message(session: Session, message: Message, conversation: Conversation) -> None:
    """Put ``message`` in ``conversation`` and its team: the one place a message joins one.

    Moves the conversation's last activity on; a message from its patient also sets
    ``last_patient_message_at`` (unread for members who read before it) and reopens a
    conversation marked done. Flushed; returns None.
    """
    message.team_id = conversation.team_id
    message.conversation_id = conversation.id
    conversation.last_message_at = max(conversation.last_message_at, message.created_at)
    if message.sender_id == conversation.patient_id:
        conversation.last_patient_message_at = message.created_at
        conversation.state = ConversationState.OPEN
    session.flush()


# --- Admin changes (each audited) ------------------------------------------------------------


def create_team(
    session: Session,
    *,
    name: str,
    description: str = "",
    open_to_patients: bool = False,
    actor: Actor,
    meta: RequestMeta,
) -> CareTeam:
    """Create a team (flushed) and audit it (team.created); return it.

    Raises ServiceError for an empty, oversize or taken name, or an oversize description
    (also when another request took the name meanwhile: the caller rolls back).
    """
    team = CareTeam(
        name=_check_name(session, name),
        description=_check_description(description),
        open_to_patients=open_to_patients,
    )
    session.add(team)
    _flush_unique(session, NAME_TAKEN)
    _record(session, Action.TEAM_CREATED, team, actor, meta, open_to_patients=open_to_patients)
    return team


def update_team(
    session: Session,
    team: CareTeam,
    *,
    name: str,
    description: str,
    open_to_patients: bool,
    actor: Actor,
    meta: RequestMeta,
) -> bool:
    """Rename, describe, open to or close to patients an active team; audit what changed
    (team.updated: which fields, never their text). Returns False when nothing changed.

    Raises ServiceError for an archived team and for the input create_team refuses.
    """
    _check_active(team)
    new_name = _check_name(session, name, team)
    new_description = _check_description(description)
    changed = {
        "name": new_name != team.name,
        "description": new_description != team.description,
        "open_to_patients": open_to_patients != team.open_to_patients,
    }
    if not any(changed.values()):
        return False
    team.name, team.description, team.open_to_patients = new_name, new_description, open_to_patients
    _flush_unique(session, NAME_TAKEN)
    details: dict[str, object] = {k: v for k, v in changed.items() if v}
    if changed["open_to_patients"]:
        details["open_to_patients"] = open_to_patients
    _record(session, Action.TEAM_UPDATED, team, actor, meta, **details)
    return True


def archive_team(session: Session, team: CareTeam, *, actor: Actor, meta: RequestMeta) -> None:
    """Archive a team (team.archived): its members lose access to its messages at once, and
    patients can no longer write to it. Raises ServiceError when it is already archived."""
    _check_active(team)
    team.archived_at = utcnow()
    session.flush()
    _record(session, Action.TEAM_ARCHIVED, team, actor, meta)


def restore_team(session: Session, team: CareTeam, *, actor: Actor, meta: RequestMeta) -> None:
    """Make an archived team active again (team.updated, restored); its members regain
    access. Raises ServiceError when it is not archived."""
    if team.archived_at is None:
        raise ServiceError("This team is not archived.")
    team.archived_at = None
    session.flush()
    _record(session, Action.TEAM_UPDATED, team, actor, meta, restored=True)


def add_member(
    session: Session, team: CareTeam, email: str, *, actor: Actor, meta: RequestMeta
) -> User:
    """Add the member of staff with this address to ``team`` (team.member.added); return them.

    Raises ServiceError for an archived team, an address with no account, an account that
    is not active staff, and someone already in the team (also when another request added
    them meanwhile: the caller rolls back).
    """
    from portal.services.accounts import find_by_email

    _check_active(team)
    user = find_by_email(session, email.strip()) if email.strip() else None
    if user is None:
        raise ServiceError("No account has that email address. Invite them first.")
    if user.role != Role.STAFF:
        raise ServiceError("Only staff can be members of a care team.")
    if user.disabled:
        raise ServiceError("That account is disabled. Enable it first.")
    if _membership(session, team, user) is not None:
        raise ServiceError(ALREADY_MEMBER)
    session.add(CareTeamMember(team_id=team.id, user_id=user.id, added_by_id=actor.id))
    _flush_unique(session, ALREADY_MEMBER)
    _record(session, Action.TEAM_MEMBER_ADDED, team, actor, meta, member=user.public_id)
    return user


def remove_member(
    session: Session, team: CareTeam, user: User, *, actor: Actor, meta: RequestMeta
) -> None:
    """Take ``user`` out of ``team`` (team.member.removed): they lose access to its messages
    on their next request, and its conversations assigned to them are unassigned.

    Raises ServiceError for an archived team and for someone who is not a member.
    """
    _check_active(team)
    membership = _membership(session, team, user)
    if membership is None:
        raise ServiceError("They are not a member of this team.")
    session.delete(membership)
    session.execute(
        update(Conversation)
        .where(Conversation.team_id == team.id, Conversation.assigned_to_id == user.id)
        .values(assigned_to_id=None)
    )
    session.flush()
    _record(session, Action.TEAM_MEMBER_REMOVED, team, actor, meta, member=user.public_id)


def _membership(session: Session, team: CareTeam, user: User) -> CareTeamMember | None:
    return session.scalar(
        select(CareTeamMember).where(
            CareTeamMember.team_id == team.id, CareTeamMember.user_id == user.id
        )
    )


def _check_active(team: CareTeam) -> None:
    if team.archived_at is not None:
        raise ServiceError("This team is archived. Restore it before you change it.")


def _check_name(session: Session, name: str, team: CareTeam | None = None) -> str:
    name = " ".join(name.split())
    if not name or len(name) > MAX_TEAM_NAME or not name.isprintable():
        raise ServiceError(f"Enter a team name of 1 to {MAX_TEAM_NAME} characters.")
    taken = find_by_name(session, name)
    if taken is not None and taken is not team:
        raise ServiceError(NAME_TAKEN)
    return name


def _flush_unique(session: Session, refusal: str) -> None:
    """Flush; a unique constraint that a concurrent request won since our check (two admins
    at once) is the same refusal as the check's, not an error page."""
    try:
        session.flush()
    except IntegrityError:
        raise ServiceError(refusal) from None


def _check_description(description: str) -> str:
    description = description.strip().replace("\r\n", "\n")
    if len(description) > MAX_TEAM_DESCRIPTION or "\x00" in description:
        raise ServiceError(f"Keep the description under {MAX_TEAM_DESCRIPTION} characters.")
    return description


def _record(
    session: Session,
    action: Action,
    team: CareTeam,
    actor: Actor,
    meta: RequestMeta,
    **details: object,
) -> None:
    audit.record(
        session,
        action,
        actor=actor,
        meta=meta,
        target_type="team",
        target_id=team.public_id,
        details=details,
    )
