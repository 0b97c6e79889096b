"""Care-team helpers: teams and memberships made through the real teams service.

Staff that the factories make (tests/factories.make_user, tests/browser_client.enrolled_user)
join TEST_TEAM unless told otherwise, so that they can send, as staff in a hospital can
once an admin has put them in a team.
"""

from __future__ import annotations

from flask import Flask
from sqlalchemy.orm import Session

from portal.audit import NO_REQUEST, SYSTEM
from portal.extensions import db
from portal.models import CareTeam, Message, User
from portal.models.teams import StartedBy
from portal.services import accounts, teams

TEST_TEAM = "Clinic"


def ensure_team(
    session: Session, name: str = TEST_TEAM, *, open_to_patients: bool = False
) -> CareTeam:
    """The team called ``name``, created (by the system, audited) when there is none."""
    found = teams.find_by_name(session, name)
    if found is not None:
        return found
    return teams.create_team(
        session, name=name, open_to_patients=open_to_patients, actor=SYSTEM, meta=NO_REQUEST
    )


def put_in_team(session: Session, user: User, name: str = TEST_TEAM) -> CareTeam:
    """Add ``user`` (staff) to the team called ``name``, made if need be (flushed)."""
    team = ensure_team(session, name)
    teams.add_member(session, team, user.email, actor=SYSTEM, meta=NO_REQUEST)
    return team


def join(app: Flask, email: str, name: str = TEST_TEAM) -> None:
    """Add the member of staff with this address to the team called ``name`` (committed)."""
    with app.app_context():
        user = accounts.find_by_email(db.session, email)
        assert user is not None, "no such account"
        put_in_team(db.session, user, name)
        db.session.commit()


def leave(app: Flask, email: str, name: str = TEST_TEAM) -> None:
    """Take the member of staff with this address out of the team called ``name`` (committed)."""
    with app.app_context():
        user = accounts.find_by_email(db.session, email)
        team = teams.find_by_name(db.session, name)
        assert user is not None
        assert team is not None
        teams.remove_member(db.session, team, user, actor=SYSTEM, meta=NO_REQUEST)
        db.session.commit()


def file_in_team(session: Session, message: Message, sender: User) -> None:
    """Put a message made by the messages service alone (as list tests make many) in a new
    conversation of its sender's only team, as messaging.send would; nothing when the
    sender is in no team."""
    mine = teams.teams_of(session, sender)
    if len(mine) == 1:
        patient = session.get(User, message.recipient_id)
        assert patient is not None
        conversation = teams.start_conversation(session, mine[0], patient, StartedBy.STAFF)
        teams.file_message(session, message, conversation)
