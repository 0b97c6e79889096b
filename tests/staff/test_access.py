"""Object-level access for staff by care team: the members of a message's team act on it
(a colleague covers by membership); everyone else gets a 404 and an audited refusal, at
once when they leave the team, in a session already open too."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from flask import Flask
from sqlalchemy import select
from werkzeug.test import TestResponse

from portal.audit import NO_REQUEST, SYSTEM
from portal.database import travel
from portal.extensions import db
from portal.models import AuditEvent, CareTeam, Conversation, Message, PickupLink, User
from portal.services import accounts, messaging, teams
from portal.services.errors import ServiceError
from portal.services.messages import Upload
from tests.browser_client import Browser, enrolled_user
from tests.factories import FILENAME, MINIMAL_PDF, PATIENT_NAME, SUBJECT, make_patient
from tests.support.teams import TEST_TEAM, join, leave

PASSWORD = "Correct horse battery staple 42"
SAM, SID, OLA = "sam@example.org", "sid@example.org", "ola@example.org"
OTHER_TEAM = "Records office"
# Every per-message staff route. Conversation routes (/staff/conversations/...) have a
# denial test of their own, beside them.
MESSAGE_ROUTES = [
    ("GET", "/staff/messages/{id}"),
    ("POST", "/staff/messages/{id}/revoke"),
    ("POST", "/staff/messages/{id}/resend"),
]


@pytest.fixture(autouse=True)
def real_clock() -> object:
    yield
    travel(None)


@pytest.fixture
def sent(app: Flask) -> str:
    """A message from sam@example.org (team Clinic) to the recognisable-PHI patient."""
    enrolled_user(app, email=SAM)
    with app.app_context():
        make_patient(db.session)
        db.session.commit()
    return send_as(app, SAM)


def send_as(app: Flask, email: str, team: str | None = None) -> str:
    """Send the PHI message from ``email`` (from ``team``, when given); its public id."""
    with app.app_context():
        sender = accounts.find_by_email(db.session, email)
        patient = accounts.find_by_email(db.session, "zq@example.org")
        assert sender is not None
        assert patient is not None
        done = messaging.send(
            db.session,
            sender=sender,
            recipient=patient,
            subject=SUBJECT,
            body="Body",
            uploads=[Upload(FILENAME, io.BytesIO(MINIMAL_PDF))],
            team=teams.find_by_name(db.session, team) if team else None,
            meta=NO_REQUEST,
        )
        db.session.commit()
        return done.message.public_id


def staff_browser(app: Flask, email: str, team: str | None) -> tuple[Browser, int]:
    """Another member of staff, in ``team`` (None: in none), signed in: (browser, user id)."""
    user, secret, _ = enrolled_user(app, email=email, name=f"Staff {email[:3]}", team=team)
    browser = Browser(app)
    assert browser.sign_in(email, PASSWORD, secret).status_code == 302
    return browser, user.id


def hit(browser: Browser, method: str, url: str) -> TestResponse:
    if method == "GET":
        return browser.get(url)
    return browser.submit(url, form_page="/staff/patients")


def events(app: Flask, action: str) -> list[AuditEvent]:
    with app.app_context():
        return list(
            db.session.scalars(
                select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)
            )
        )


def test_every_per_message_route_is_in_the_denial_test(app: Flask) -> None:
    rules = {
        r.rule
        for r in app.url_map.iter_rules()
        if r.endpoint.startswith("staff.")
        and "<public_id>" in r.rule
        and not r.rule.startswith("/staff/conversations/")
    }
    assert rules == {u.replace("{id}", "<public_id>") for _, u in MESSAGE_ROUTES}


@pytest.mark.parametrize(("method", "route"), MESSAGE_ROUTES)
def test_staff_of_another_team_get_404_and_the_refusal_is_audited(
    app: Flask, sent: str, method: str, route: str
) -> None:
    browser, other_id = staff_browser(app, SID, OTHER_TEAM)
    response = hit(browser, method, route.format(id=sent))
    assert response.status_code == 404
    page = response.get_data(as_text=True)
    assert SUBJECT not in page
    assert PATIENT_NAME not in page
    assert "care team" in page  # how to get access: be added to the team
    denied = events(app, "access.denied")
    assert [(e.actor_id, e.outcome, e.target_id) for e in denied] == [(other_id, "denied", sent)]
    assert '"reason":"not_in_team"' in (denied[0].details or "")
    assert not events(app, "message.view")
    assert not events(app, "message.resend")
    with app.app_context():
        assert db.session.scalar(select(Message.revoked_at)) is None
        assert db.session.query(PickupLink).count() == 1


@pytest.mark.parametrize(("method", "route"), MESSAGE_ROUTES)
def test_staff_in_no_team_get_404_too(app: Flask, sent: str, method: str, route: str) -> None:
    browser, other_id = staff_browser(app, SID, None)
    assert hit(browser, method, route.format(id=sent)).status_code == 404
    assert [e.actor_id for e in events(app, "access.denied")] == [other_id]


@pytest.mark.parametrize(("method", "route"), MESSAGE_ROUTES)
def test_missing_message_looks_the_same_and_records_nothing(
    app: Flask, sent: str, method: str, route: str
) -> None:
    browser, _ = staff_browser(app, SID, OTHER_TEAM)
    for missing in ("0" * 32, "not-an-id", "x" * 33):
        response = hit(browser, method, route.format(id=missing))
        assert response.status_code == 404
        assert "care team" in response.get_data(as_text=True)
    assert not events(app, "access.denied")


def test_a_colleague_in_the_team_covers_without_asking(app: Flask, sent: str) -> None:
    browser, colleague = staff_browser(app, SID, TEST_TEAM)
    page = browser.get(f"/staff/messages/{sent}")
    assert page.status_code == 200
    assert SUBJECT in page.get_data(as_text=True)
    assert TEST_TEAM in page.get_data(as_text=True)  # the team it is from
    assert hit(browser, "POST", f"/staff/messages/{sent}/resend").status_code == 302
    assert hit(browser, "POST", f"/staff/messages/{sent}/revoke").status_code == 302
    for action in ("message.view", "message.resend", "message.revoke"):
        assert [e.actor_id for e in events(app, action)] == [colleague], action
    assert not events(app, "access.denied")


def test_the_cover_interstitial_is_gone(app: Flask, sent: str) -> None:
    browser, _ = staff_browser(app, SID, OTHER_TEAM)
    assert browser.get(f"/staff/messages/{sent}/cover").status_code == 404
    response = browser.submit(
        f"/staff/messages/{sent}/cover", {"reason": "on_call"}, form_page="/staff/patients"
    )
    assert response.status_code in (404, 405)
    assert not events(app, "message.cover")
    assert browser.get(f"/staff/messages/{sent}").status_code == 404


def test_a_colleague_still_reauthenticates_to_revoke(app: Flask, sent: str) -> None:
    browser, _ = staff_browser(app, SID, TEST_TEAM)
    travel(timedelta(minutes=6))
    stale = hit(browser, "POST", f"/staff/messages/{sent}/revoke")
    assert stale.status_code == 302
    assert stale.location.startswith("/reauth")
    assert not events(app, "message.revoke")


def test_a_member_of_two_teams_sees_the_messages_of_both(app: Flask, sent: str) -> None:
    enrolled_user(app, email=OLA, name="Ola Other", team=OTHER_TEAM)
    theirs = send_as(app, OLA)
    browser, _ = staff_browser(app, SID, TEST_TEAM)
    join(app, SID, OTHER_TEAM)
    assert browser.get(f"/staff/messages/{sent}").status_code == 200
    assert browser.get(f"/staff/messages/{theirs}").status_code == 200
    mine = {send_as(app, SID, TEST_TEAM), send_as(app, SID, OTHER_TEAM)}
    listed = browser.get("/staff/").get_data(as_text=True)
    assert all(f"/staff/messages/{m}" in listed for m in mine)
    assert f"/staff/messages/{sent}" not in listed  # the sent list is theirs only
    assert not events(app, "access.denied")


def test_a_removed_member_loses_access_at_once_in_an_open_session(app: Flask, sent: str) -> None:
    browser, colleague = staff_browser(app, SID, TEST_TEAM)
    own = send_as(app, SID)
    assert browser.get(f"/staff/messages/{sent}").status_code == 200
    assert f"/staff/messages/{own}" in browser.get("/staff/").get_data(as_text=True)
    leave(app, SID)
    assert browser.get(f"/staff/messages/{sent}").status_code == 404
    assert hit(browser, "POST", f"/staff/messages/{own}/resend").status_code == 404
    assert f"/staff/messages/{own}" not in browser.get("/staff/").get_data(as_text=True)
    assert [e.actor_id for e in events(app, "access.denied")] == [colleague, colleague]
    join(app, SID)  # added back: access again
    assert browser.get(f"/staff/messages/{sent}").status_code == 200


def test_an_archived_teams_messages_are_nobodys(app: Flask, sent: str) -> None:
    browser, _ = staff_browser(app, SID, TEST_TEAM)
    with app.app_context():
        team = teams.find_by_name(db.session, TEST_TEAM)
        assert team is not None
        teams.archive_team(db.session, team, actor=SYSTEM, meta=NO_REQUEST)
        db.session.commit()
    assert browser.get(f"/staff/messages/{sent}").status_code == 404
    with app.app_context():
        team = db.session.scalars(select(CareTeam).where(CareTeam.name == TEST_TEAM)).one()
        teams.restore_team(db.session, team, actor=SYSTEM, meta=NO_REQUEST)
        db.session.commit()
    assert browser.get(f"/staff/messages/{sent}").status_code == 200


def test_a_disabled_member_is_no_member(app: Flask, sent: str) -> None:
    with app.app_context():
        sam = accounts.find_by_email(db.session, SAM)
        clinic = teams.find_by_name(db.session, TEST_TEAM)
        assert sam is not None
        assert clinic is not None
        assert teams.is_member(db.session, sam, clinic.id)
        sam.disabled = True
        assert not teams.is_member(db.session, sam, clinic.id)
        assert teams.teams_of(db.session, sam) == []


def test_patients_cannot_reach_staff_message_pages(app: Flask, sent: str) -> None:
    _, secret, _ = enrolled_user(app, role="patient", email="p@example.org", name="Pat Ient")
    browser = Browser(app)
    browser.sign_in("p@example.org", PASSWORD, secret)
    assert browser.get(f"/staff/messages/{sent}").status_code == 403


def test_service_refuses_a_team_or_thread_that_is_not_the_senders(app: Flask, sent: str) -> None:
    enrolled_user(app, email=OLA, name="Ola Other", team=OTHER_TEAM)
    with app.app_context():
        ola = accounts.find_by_email(db.session, OLA)
        message = messaging.find_by_public_id(db.session, sent)
        assert ola is not None
        assert message is not None
        patient = db.session.get(User, message.recipient_id)
        assert patient is not None
        theirs: list[dict[str, object]] = [
            {"team": teams.find_by_name(db.session, TEST_TEAM)},
            {"conversation": db.session.get(Conversation, message.conversation_id)},
        ]
        for kwargs, error in zip(
            theirs, ["Choose one of your care teams", "Only members of its care team"], strict=True
        ):
            with pytest.raises(ServiceError, match=error):
                messaging.send(
                    db.session,
                    sender=ola,
                    recipient=patient,
                    subject=SUBJECT,
                    body="Body",
                    meta=NO_REQUEST,
                    **kwargs,  # type: ignore[arg-type]
                )
            db.session.rollback()
        assert db.session.query(Message).count() == 1
