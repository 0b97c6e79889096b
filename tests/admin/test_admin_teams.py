"""Admins manage care teams over HTTP: create, rename, open to patients, add and remove
members, archive and restore; each change audited with PHI-free details, every bad input
refused with a clear message and nothing changed, CSRF and fresh authentication enforced."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select
from werkzeug.test import TestResponse

from portal.database import travel
from portal.extensions import db
from portal.models import AuditEvent, CareTeam, CareTeamMember, Conversation, User
from portal.models.teams import MAX_TEAM_NAME
from tests.browser_client import Browser, enrolled_user
from tests.factories import make_patient

PASSWORD = "Correct horse battery staple 42"
ADMIN = "al@example.org"
STAFF = "sid@example.org"
TEAM_ACTIONS = ("team.created", "team.updated", "team.archived")
MEMBER_ACTIONS = ("team.member.added", "team.member.removed")


@pytest.fixture(autouse=True)
def real_time() -> Any:
    yield
    travel(None)


@pytest.fixture
def admin(app: Flask) -> Browser:
    """An admin, signed in just now; Sid, a member of staff in no team; a patient."""
    _, secret, _ = enrolled_user(app, role="admin", email=ADMIN, name="Al Admin")
    enrolled_user(app, email=STAFF, name="Sid Staffer", team=None)
    with app.app_context():
        make_patient(db.session)
        db.session.commit()
    browser = Browser(app)
    assert browser.sign_in(ADMIN, PASSWORD, secret).status_code == 302
    return browser


def create(admin: Browser, name: str, **fields: str) -> TestResponse:
    return admin.submit("/admin/teams", {"name": name, **fields})


def team_url(app: Flask, name: str) -> str:
    with app.app_context():
        public_id = db.session.scalar(select(CareTeam.public_id).where(CareTeam.name == name))
        assert public_id, f"no team {name!r}"
        return f"/admin/teams/{public_id}"


def add(admin: Browser, url: str, email: str) -> TestResponse:
    return admin.submit(f"{url}/members", {"email": email, "back": url}, form_page=url)


def state(app: Flask) -> dict[str, Any]:
    """Teams (name, open, archived) and memberships (team name, email): all that can change."""
    with app.app_context():
        teams = db.session.execute(
            select(CareTeam.name, CareTeam.open_to_patients, CareTeam.archived_at.is_not(None))
        ).all()
        members = db.session.execute(
            select(CareTeam.name, User.email)
            .join(CareTeamMember, CareTeamMember.team_id == CareTeam.id)
            .join(User, User.id == CareTeamMember.user_id)
        ).all()
        return {"teams": sorted(map(tuple, teams)), "members": sorted(map(tuple, members))}


def audited(app: Flask, *actions: str) -> list[tuple[str, str | None, dict[str, Any]]]:
    with app.app_context():
        rows = db.session.scalars(
            select(AuditEvent).where(AuditEvent.action.in_(actions)).order_by(AuditEvent.seq)
        )
        return [(e.action, e.actor_role, json.loads(e.details or "{}")) for e in rows]


def test_create_add_remove_archive_restore_each_audited(app: Flask, admin: Browser) -> None:
    done = create(admin, "  Cardiology   clinic ", description="Heart care", open_to_patients="y")
    assert done.status_code == 302
    url = team_url(app, "Cardiology clinic")
    assert done.location == url
    assert add(admin, url, STAFF).status_code == 302
    page = admin.get(url).get_data(as_text=True)
    assert "Sid Staffer" in page
    assert STAFF in page
    with app.app_context():
        sid = db.session.scalars(select(User).where(User.email == STAFF)).one()
        sid_id = sid.public_id
    removed = admin.submit(f"{url}/members/{sid_id}/remove", {"back": url}, form_page=url)
    assert removed.status_code == 302
    assert admin.submit(f"{url}/archive", {"back": url}, form_page=url).status_code == 302
    assert "Archived" in admin.get("/admin/teams").get_data(as_text=True)
    assert admin.submit(f"{url}/restore", {"back": url}, form_page=url).status_code == 302
    events = audited(app, *TEAM_ACTIONS, *MEMBER_ACTIONS)
    assert events == [
        ("team.created", "admin", {"open_to_patients": True}),
        ("team.member.added", "admin", {"member": sid_id}),
        ("team.member.removed", "admin", {"member": sid_id}),
        ("team.archived", "admin", {}),
        ("team.updated", "admin", {"restored": True}),
    ]
    with app.app_context():
        trail = db.session.scalars(select(AuditEvent).where(AuditEvent.target_type == "team"))
        assert {e.target_id for e in trail} == {url.rsplit("/", 1)[1]}
        assert all("Cardiology" not in (e.details or "") for e in trail)  # no typed text


def test_rename_and_open_to_patients_audit_what_changed_not_the_text(
    app: Flask, admin: Browser
) -> None:
    create(admin, "Records")
    url = team_url(app, "Records")
    renamed = admin.submit(
        url,
        {"name": "Records office", "description": "Copies", "open_to_patients": "y", "back": url},
        form_page=url,
    )
    assert renamed.status_code == 302
    same = admin.submit(
        url,
        {"name": "Records office", "description": "Copies", "open_to_patients": "y", "back": url},
        form_page=url,
    )
    assert same.status_code == 302
    closed = admin.submit(
        url, {"name": "Records office", "description": "Copies", "back": url}, form_page=url
    )
    assert closed.status_code == 302
    assert audited(app, "team.updated") == [
        ("team.updated", "admin", {"name": True, "description": True, "open_to_patients": True}),
        ("team.updated", "admin", {"open_to_patients": False}),
    ]
    assert ("Records office", False, False) in state(app)["teams"]


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("", "Enter the team&#39;s name."),
        ("   ", "Enter the team"),
        ("x" * (MAX_TEAM_NAME + 1), "Keep the name under"),
        ("Tab\tand\x07bell", "Enter a team name of 1 to"),
        ("cardiology CLINIC", "Another team already has that name."),
        ("  Cardiology \n clinic ", "Another team already has that name."),
    ],
)
def test_bad_team_names_are_refused_and_nothing_changes(
    app: Flask, admin: Browser, name: str, error: str
) -> None:
    create(admin, "Cardiology clinic")
    before = state(app)
    response = create(admin, name)
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    assert error in html
    assert "Traceback" not in html
    assert state(app) == before


def test_a_rename_to_a_taken_name_or_oversize_description_is_refused(
    app: Flask, admin: Browser
) -> None:
    create(admin, "Cardiology clinic")
    create(admin, "Records office")
    url = team_url(app, "Records office")
    before = state(app)
    for fields, error in (
        ({"name": "Cardiology Clinic"}, "Another team already has that name."),
        ({"name": "Records office", "description": "d" * 501}, "Keep the description under"),
    ):
        response = admin.submit(url, {**fields, "back": url}, form_page=url)
        assert response.status_code == 400
        assert error in response.get_data(as_text=True)
    assert state(app) == before
    assert audited(app, "team.updated") == []


def test_bad_members_are_refused_and_nothing_changes(app: Flask, admin: Browser) -> None:
    create(admin, "Cardiology clinic")
    url = team_url(app, "Cardiology clinic")
    assert add(admin, url, STAFF).status_code == 302
    enrolled_user(app, role="auditor", email="aud@example.org", name="Aud Itor")
    with app.app_context():
        db.session.scalars(select(User).where(User.email == "aud@example.org")).one()
    before = state(app)
    for email, error in (
        ("nobody@example.org", "No account has that email address."),
        ("zq@example.org", "Only staff can be members of a care team."),
        ("aud@example.org", "Only staff can be members of a care team."),
        (ADMIN, "Only staff can be members of a care team."),
        (STAFF, "They are already a member of this team."),
        ("", "Enter the staff member"),
    ):
        response = add(admin, url, email)
        assert response.status_code == 400, email
        html = response.get_data(as_text=True)
        assert error.replace("'", "&#39;") in html, email
        assert "Zebulon" not in html
    assert state(app) == before
    assert [a for a, _, _ in audited(app, *MEMBER_ACTIONS)] == ["team.member.added"]


def test_a_disabled_account_cannot_join(app: Flask, admin: Browser) -> None:
    create(admin, "Cardiology clinic")
    url = team_url(app, "Cardiology clinic")
    with app.app_context():
        db.session.scalars(select(User).where(User.email == STAFF)).one().disabled = True
        db.session.commit()
    response = add(admin, url, STAFF)
    assert response.status_code == 400
    assert "That account is disabled." in response.get_data(as_text=True)


def test_an_archived_team_cannot_change_until_restored(app: Flask, admin: Browser) -> None:
    create(admin, "Cardiology clinic")
    url = team_url(app, "Cardiology clinic")
    add(admin, url, STAFF)
    admin.submit(f"{url}/archive", {"back": url}, form_page=url)
    page = admin.get(url).get_data(as_text=True)
    assert "Restore team" in page
    assert 'name="email"' not in page  # no add form for an archived team
    before = state(app)
    token_page = "/admin/teams"
    refused = admin.submit(f"{url}/members", {"email": STAFF, "back": url}, form_page=token_page)
    assert refused.status_code == 400
    assert "This team is archived." in refused.get_data(as_text=True)
    renamed = admin.submit(url, {"name": "Heart", "back": url}, form_page=token_page)
    assert renamed.status_code == 400
    twice = admin.submit(f"{url}/archive", {"back": url}, form_page=token_page)
    assert twice.status_code == 302
    assert "This team is archived." in admin.get(url).get_data(as_text=True)
    with app.app_context():
        sid = db.session.scalars(select(User.public_id).where(User.email == STAFF)).one()
    removal = admin.submit(f"{url}/members/{sid}/remove", {"back": url}, form_page=token_page)
    assert removal.status_code == 302
    assert state(app) == before
    assert [a for a, _, _ in audited(app, *TEAM_ACTIONS, *MEMBER_ACTIONS)] == [
        "team.created",
        "team.member.added",
        "team.archived",
    ]


def test_removing_a_member_unassigns_their_conversations(app: Flask, admin: Browser) -> None:
    create(admin, "Cardiology clinic")
    url = team_url(app, "Cardiology clinic")
    add(admin, url, STAFF)
    with app.app_context():
        team = db.session.scalars(
            select(CareTeam).where(CareTeam.name == "Cardiology clinic")
        ).one()
        sid = db.session.scalars(select(User).where(User.email == STAFF)).one()
        patient = db.session.scalars(select(User).where(User.email == "zq@example.org")).one()
        db.session.add(Conversation(team_id=team.id, patient_id=patient.id, assigned_to_id=sid.id))
        db.session.commit()
        sid_id = sid.public_id
    admin.submit(f"{url}/members/{sid_id}/remove", {"back": url}, form_page=url)
    with app.app_context():
        assert db.session.scalar(select(Conversation.assigned_to_id)) is None


def test_unknown_team_or_member_is_404(app: Flask, admin: Browser) -> None:
    create(admin, "Cardiology clinic")
    url = team_url(app, "Cardiology clinic")
    assert admin.get("/admin/teams/" + "0" * 32).status_code == 404
    assert admin.get("/admin/teams/not-an-id").status_code == 404
    missing = admin.submit(f"{url}/members/{'0' * 32}/remove", {"back": url}, form_page=url)
    assert missing.status_code == 404
    with app.app_context():
        sid = db.session.scalars(select(User.public_id).where(User.email == STAFF)).one()
    not_member = admin.submit(f"{url}/members/{sid}/remove", {"back": url}, form_page=url)
    assert not_member.status_code == 302
    assert "They are not a member of this team." in admin.get(url).get_data(as_text=True)


def test_changes_need_csrf(app: Flask, admin: Browser) -> None:
    create(admin, "Cardiology clinic")
    url = team_url(app, "Cardiology clinic")
    before = state(app)
    for path, data in (
        ("/admin/teams", {"name": "Other"}),
        (url, {"name": "Renamed"}),
        (f"{url}/members", {"email": STAFF}),
        (f"{url}/archive", {}),
    ):
        assert admin.client.post(path, data=data).status_code == 400, path
    assert state(app) == before


def test_changes_to_a_team_need_fresh_authentication(app: Flask, admin: Browser) -> None:
    create(admin, "Cardiology clinic")
    url = team_url(app, "Cardiology clinic")
    travel(timedelta(minutes=6))
    before = state(app)
    for path, data in (
        (url, {"name": "Renamed"}),
        (f"{url}/members", {"email": STAFF}),
        (f"{url}/archive", {}),
    ):
        stale = admin.submit(path, {**data, "back": url}, form_page=url)
        assert stale.status_code == 302
        assert stale.location.startswith("/reauth"), path
    assert state(app) == before


def test_only_admins_reach_the_team_pages(app: Flask, admin: Browser) -> None:
    create(admin, "Cardiology clinic")
    url = team_url(app, "Cardiology clinic")
    _, secret, _ = enrolled_user(app, email="sam@example.org")
    staff = Browser(app)
    assert staff.sign_in("sam@example.org", PASSWORD, secret).status_code == 302
    assert staff.get("/admin/teams").status_code == 403
    assert staff.get(url).status_code == 403
    assert Browser(app).get("/admin/teams").status_code == 302  # to sign in


def test_the_list_counts_active_members(app: Flask, admin: Browser) -> None:
    create(admin, "Cardiology clinic")
    url = team_url(app, "Cardiology clinic")
    add(admin, url, STAFF)
    with app.app_context():
        count = db.session.scalar(select(func.count()).select_from(CareTeamMember))
    assert count == 1
    page = admin.get("/admin/teams").get_data(as_text=True)
    assert "Cardiology clinic" in page
    assert "Care teams" in admin.get("/admin/users").get_data(as_text=True)  # in the nav
