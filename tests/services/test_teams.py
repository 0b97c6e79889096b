"""The teams service with two actors at once: two admins adding the same member, or making
teams of one name, get one change and one clear refusal (not an error page); a member
removed while their request runs is refused on their next one."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from portal.audit import NO_REQUEST, SYSTEM, Actor
from portal.extensions import db
from portal.models import AuditEvent, CareTeam, CareTeamMember, User
from portal.services import teams
from portal.services.errors import ServiceError
from tests.factories import make_user

ADMIN = Actor(None, "admin")


@pytest.fixture
def clinic(app: Flask) -> str:
    """A team and a member of staff in no team; the team's public id."""
    with app.app_context():
        make_user(db.session, "staff", "sid@example.org", "Sid Staffer", team=None)
        team = teams.create_team(db.session, name="Clinic", actor=SYSTEM, meta=NO_REQUEST)
        db.session.commit()
        return team.public_id


def race(
    app: Flask, monkeypatch: pytest.MonkeyPatch, check: str, first: Callable[[], Any]
) -> ServiceError | None:
    """Run ``first`` in this thread up to its flush; run it again in another thread until
    its check (``teams.<check>``) has looked (and found nothing); commit the first; let the
    second go on. Returns what the second raised."""
    real = getattr(teams, check)
    looked, go = threading.Event(), threading.Event()
    outcome: list[ServiceError | None] = [None]

    def second() -> None:
        with app.app_context():
            try:
                first()
            except ServiceError as refused:
                outcome[0] = refused
                db.session.rollback()
            else:
                db.session.commit()

    def check_then_wait(*args: Any, **kwargs: Any) -> Any:
        found = real(*args, **kwargs)
        if threading.current_thread() is not threading.main_thread():
            looked.set()
            assert go.wait(30)
        return found

    with app.app_context():
        first()  # flushed: its row waits for this commit
        monkeypatch.setattr(teams, check, check_then_wait)
        other = threading.Thread(target=second)
        other.start()
        assert looked.wait(30)
        db.session.commit()
        go.set()
        other.join(60)
    assert not other.is_alive()
    return outcome[0]


def test_two_admins_adding_the_same_member_at_once(
    app: Flask, clinic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def add() -> None:
        team = teams.find_team(db.session, clinic)
        assert team is not None
        teams.add_member(db.session, team, "sid@example.org", actor=ADMIN, meta=NO_REQUEST)

    refused = race(app, monkeypatch, "_membership", add)
    assert refused is not None
    assert str(refused) == "They are already a member of this team."
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(CareTeamMember)) == 1
        added = select(func.count()).where(AuditEvent.action == "team.member.added")
        assert db.session.scalar(added) == 1


def test_two_admins_creating_teams_of_one_name_at_once(
    app: Flask, clinic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def create() -> None:
        teams.create_team(db.session, name="Records office", actor=ADMIN, meta=NO_REQUEST)

    refused = race(app, monkeypatch, "find_by_name", create)
    assert refused is not None
    assert "Another team already has that name." in str(refused)
    with app.app_context():
        names = db.session.scalars(select(CareTeam.name).where(CareTeam.name != "All staff"))
        assert sorted(names) == ["Clinic", "Records office"]


def test_membership_is_read_afresh_not_remembered(app: Flask, clinic: str) -> None:
    """is_member reads the database each time: a removal committed by another session is
    seen by a session that checked before."""
    with app.app_context():
        team = teams.find_team(db.session, clinic)
        assert team is not None
        teams.add_member(db.session, team, "sid@example.org", actor=ADMIN, meta=NO_REQUEST)
        db.session.commit()
        sid = db.session.scalars(select(User).where(User.email == "sid@example.org")).one()
        assert teams.is_member(db.session, sid, team.id)
        with app.app_context():  # the admin's request, in a session of its own
            other = teams.find_team(db.session, clinic)
            leaving = db.session.get(User, sid.id)
            assert other is not None
            assert leaving is not None
            teams.remove_member(db.session, other, leaving, actor=ADMIN, meta=NO_REQUEST)
            db.session.commit()
        db.session.commit()  # the member's next request starts a new transaction
        assert not teams.is_member(db.session, sid, team.id)
