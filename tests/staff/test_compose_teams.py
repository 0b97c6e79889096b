"""Compose from a care team: the sender's only team, or the one they choose among theirs;
staff in no team cannot send and are told why. The message starts a conversation of that
team with the patient."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from sqlalchemy import select

from portal import cli
from portal.extensions import db
from portal.models import AuditEvent, CareTeam, Conversation, Message, User
from tests.browser_client import Browser, enrolled_user
from tests.factories import BODY, PATIENT_NAME, SUBJECT, make_patient
from tests.support.teams import TEST_TEAM, join

PASSWORD = "Correct horse battery staple 42"
SAM = "sam@example.org"
RECORDS = "Records office"
NO_TEAM = "ask an admin to add you to a care team"


@pytest.fixture
def patient_id(app: Flask) -> str:
    with app.app_context():
        patient = make_patient(db.session)
        db.session.commit()
        return patient.public_id


def signed_in(app: Flask, team: str | None) -> Browser:
    _, secret, _ = enrolled_user(app, email=SAM, team=team)
    browser = Browser(app)
    assert browser.sign_in(SAM, PASSWORD, secret).status_code == 302
    return browser


def compose(browser: Browser, patient_id: str, **fields: str) -> Any:
    url = f"/staff/messages/new?to={patient_id}"
    data = {"subject": SUBJECT, "body": BODY, "body_format": "text", "expires_days": "7", **fields}
    return browser.submit(url, {**data, "attachments": (io.BytesIO(b""), "")}, form_page=url)


def team_id(app: Flask, name: str) -> str:
    with app.app_context():
        return db.session.scalars(select(CareTeam.public_id).where(CareTeam.name == name)).one()


def stored(app: Flask) -> list[tuple[str, str, int, str]]:
    """Each message's team name, its conversation's team name, patient id and starter."""
    with app.app_context():
        rows = db.session.execute(
            select(CareTeam.name, Conversation.team_id, Conversation.patient_id, Message)
            .join(CareTeam, CareTeam.id == Message.team_id)
            .join(Conversation, Conversation.id == Message.conversation_id)
        ).all()
        out = []
        for name, conversation_team, patient, message in rows:
            assert message.recipient_id == patient
            conversation = db.session.get(Conversation, message.conversation_id)
            assert conversation is not None
            team = db.session.get(CareTeam, conversation_team)
            assert team is not None
            out.append((name, team.name, patient, conversation.started_by))
        return out


def test_staff_in_no_team_are_told_to_ask_an_admin(app: Flask, patient_id: str) -> None:
    browser = signed_in(app, None)
    page = browser.get(f"/staff/messages/new?to={patient_id}")
    assert page.status_code == 403
    html = page.get_data(as_text=True)
    assert NO_TEAM in html
    assert PATIENT_NAME not in html
    assert '<form method="post" enctype' not in html
    posted = browser.submit(
        f"/staff/messages/new?to={patient_id}",
        {"subject": SUBJECT, "body": BODY, "body_format": "text", "expires_days": "7"},
        form_page="/staff/patients",
    )
    assert posted.status_code == 403
    assert NO_TEAM in posted.get_data(as_text=True)
    with app.app_context():
        assert db.session.query(Message).count() == 0
        views = db.session.scalars(select(AuditEvent).where(AuditEvent.action == "patient.view"))
        assert list(views) == []


def test_one_team_needs_no_choice(app: Flask, patient_id: str) -> None:
    browser = signed_in(app, TEST_TEAM)
    html = browser.get(f"/staff/messages/new?to={patient_id}").get_data(as_text=True)
    assert f"From <strong>{TEST_TEAM}</strong>" in html
    assert 'name="team"' not in html
    assert compose(browser, patient_id).status_code == 302
    with app.app_context():
        patient = db.session.scalars(select(User.id).where(User.public_id == patient_id)).one()
    assert stored(app) == [(TEST_TEAM, TEST_TEAM, patient, "staff")]


def test_two_teams_need_a_choice(app: Flask, patient_id: str) -> None:
    browser = signed_in(app, TEST_TEAM)
    join(app, SAM, RECORDS)
    html = browser.get(f"/staff/messages/new?to={patient_id}").get_data(as_text=True)
    assert 'name="team"' in html
    assert TEST_TEAM in html
    assert RECORDS in html
    unchosen = compose(browser, patient_id)
    assert unchosen.status_code == 200
    assert "Choose the care team this message is from." in unchosen.get_data(as_text=True)
    assert stored(app) == []
    chosen = compose(browser, patient_id, team=team_id(app, RECORDS))
    assert chosen.status_code == 302
    assert [row[:2] for row in stored(app)] == [(RECORDS, RECORDS)]


def test_a_team_that_is_not_the_senders_is_refused(app: Flask, patient_id: str) -> None:
    browser = signed_in(app, TEST_TEAM)
    enrolled_user(app, email="ola@example.org", name="Ola Other", team=RECORDS)
    for team in (team_id(app, RECORDS), "0" * 32, "<script>", "x" * 5000):
        response = compose(browser, patient_id, team=team)
        assert response.status_code == 200
        html = response.get_data(as_text=True)
        assert "Not a valid choice" in html, team[:20]
        assert "Traceback" not in html
    assert stored(app) == []


def test_compose_needs_csrf(app: Flask, patient_id: str) -> None:
    browser = signed_in(app, TEST_TEAM)
    response = browser.client.post(
        f"/staff/messages/new?to={patient_id}",
        data={"subject": SUBJECT, "body": BODY, "body_format": "text", "expires_days": "7"},
    )
    assert response.status_code in (200, 400)
    assert stored(app) == []


def test_cli_send_names_the_team_when_the_sender_has_several(
    app: Flask, patient_id: str, tmp_path: Path
) -> None:
    enrolled_user(app, email=SAM)
    join(app, SAM, RECORDS)
    env = {"PORTAL_DATABASE_URL": app.config["DATABASE_URL"]}
    base = ["messages", "send", "--from", SAM, "--to", "zq@example.org", "--subject", SUBJECT]
    base += ["--body", BODY]
    runner = CliRunner()
    unchosen = runner.invoke(cli.main, base, env=env)
    assert unchosen.exit_code == 1
    assert "Choose the care team" in unchosen.output
    unknown = runner.invoke(cli.main, [*base, "--team", "Nowhere"], env=env)
    assert unknown.exit_code == 1
    assert "No care team has that --team name." in unknown.output
    done = runner.invoke(cli.main, [*base, "--team", "records  OFFICE"], env=env)
    assert done.exit_code == 0, done.output
    assert [row[:2] for row in stored(app)] == [(RECORDS, RECORDS)]


def test_cli_send_from_staff_in_no_team_is_refused(app: Flask, patient_id: str) -> None:
    enrolled_user(app, email=SAM, team=None)
    env = {"PORTAL_DATABASE_URL": app.config["DATABASE_URL"]}
    args = ["messages", "send", "--from", SAM, "--to", "zq@example.org", "--subject", SUBJECT]
    refused = CliRunner().invoke(cli.main, [*args, "--body", BODY], env=env)
    assert refused.exit_code == 1
    assert NO_TEAM in refused.output
    assert stored(app) == []
