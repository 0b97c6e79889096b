"""The demo's seed: its care teams hold the demo staff (one team open to patients), and
seeding again changes nothing."""

from __future__ import annotations

from flask import Flask
from sqlalchemy import func, select

from portal.commands.demo import seed
from portal.extensions import db
from portal.models import AuditEvent, CareTeam
from portal.services import teams


def members(app: Flask) -> dict[tuple[str, bool], set[str]]:
    with app.app_context():
        found = db.session.scalars(select(CareTeam).where(CareTeam.name != "All staff"))
        return {
            (team.name, team.open_to_patients): {
                u.email for u in teams.members_of(db.session, team, active_only=False)
            }
            for team in found
        }


def test_demo_seeds_teams_with_the_demo_staff_once(app: Flask) -> None:
    with app.app_context():
        seed()
    first = members(app)
    assert first == {
        ("Cardiology clinic", True): {"staff@demo.example", "records@demo.example"},
        ("Records office", False): {"records@demo.example"},
    }
    with app.app_context():
        events = db.session.scalar(select(func.count()).select_from(AuditEvent))
        seed()
        assert db.session.scalar(select(func.count()).select_from(AuditEvent)) == events
    assert members(app) == first
