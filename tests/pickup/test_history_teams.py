"""The patient's access history and accounting of disclosures say which care team read
their message: "Read by the Cardiology clinic (Sam Staffer)"."""

from __future__ import annotations

import io
import re

from flask import Flask
from pypdf import PdfReader
from sqlalchemy import select, update

from portal.audit import NO_REQUEST, SYSTEM, Action
from portal.extensions import db
from portal.models import Message, Role, User
from portal.services import accounts, content, messaging, teams
from portal.services.patient_lists import ACTION_TEXT, history_text
from tests.browser_client import Browser
from tests.factories import BODY, SUBJECT
from tests.support.conversations import (
    OPEN_TEAM,
    PATIENT,
    REPLY_TEXT,
    SAM,
    World,
    act,
    messages_in,
    public_id_of,
    reply,
    team_public_id,
    thread_url,
    user_id,
)
from tests.support.pickup import (
    PASSWORD,
    PATIENT_EMAIL,
    STAFF_EMAIL,
    enrolled_patient,
    send,
    signed_in,
)
from tests.support.teams import TEST_TEAM, join

TEAM = "Cardiology clinic"
READ = f"Read by the {TEAM} (Sam Staffer)"


def staff_reads_status(app: Flask, staff: tuple[User, str, list[str]], public_id: str) -> None:
    browser = Browser(app)
    assert browser.sign_in(STAFF_EMAIL, PASSWORD, staff[1]).status_code == 302
    assert browser.get(f"/staff/messages/{public_id}").status_code == 200


def send_from(app: Flask, team: str) -> str:
    """Send the PHI message from Sam, from ``team``; its public id."""
    with app.app_context():
        sender = accounts.find_by_email(db.session, STAFF_EMAIL)
        patient = accounts.find_by_email(db.session, PATIENT_EMAIL)
        assert sender is not None
        assert patient is not None
        sent = messaging.send(
            db.session,
            sender=sender,
            recipient=patient,
            subject=SUBJECT,
            body=BODY,
            team=teams.find_by_name(db.session, team),
            meta=NO_REQUEST,
        )
        db.session.commit()
        return sent.message.public_id


def test_history_and_disclosures_word_a_staff_read_by_team(
    app: Flask, staff: tuple[User, str, list[str]]
) -> None:
    """Sam is in the Clinic team (the fixture) and in the Cardiology clinic; the message is
    the Cardiology clinic's, so its read names that team, not the other."""
    join(app, STAFF_EMAIL, TEAM)
    _, secret = enrolled_patient(app)
    staff_reads_status(app, staff, send_from(app, TEAM))
    patient = signed_in(app, PATIENT_EMAIL, secret)
    history = patient.get("/history").get_data(as_text=True)
    assert history.count(READ) == 1
    assert "Read by the Clinic" not in history
    report = patient.submit(
        "/history/disclosures.pdf",
        {"since": "2000-01-01", "until": "2100-12-31"},
        form_page="/history",
    )
    assert report.mimetype == "application/pdf"
    text = " ".join(p.extract_text() for p in PdfReader(io.BytesIO(report.data)).pages)
    assert READ in " ".join(text.split())


def test_the_patients_own_read_keeps_its_wording(
    app: Flask, staff: tuple[User, str, list[str]]
) -> None:
    _, secret = enrolled_patient(app)
    sent = send(app)
    patient = signed_in(app, PATIENT_EMAIL, secret)
    assert patient.get(f"/messages/{sent.public_id}").status_code == 200
    history = patient.get("/history").get_data(as_text=True)
    assert "Read the message" in history
    assert "Read by the" not in history


# --- Conversations (issue 14 item 6): a staff read of the patient's reply names the team ---

CLINIC_READ = f"Read by the {TEST_TEAM} (Ada Second)"


def disclosures_text(browser: Browser) -> str:
    """The text of the patient's accounting of disclosures, whitespace collapsed."""
    report = browser.submit(
        "/history/disclosures.pdf",
        {"since": "2000-01-01", "until": "2100-12-31"},
        form_page="/history",
    )
    assert report.mimetype == "application/pdf"
    text = " ".join(p.extract_text() for p in PdfReader(io.BytesIO(report.data)).pages)
    return " ".join(text.split())


def test_a_staff_read_of_a_reply_in_the_team_inbox_names_team_and_reader(world: World) -> None:
    """Ada (Clinic) opens the thread with the patient's reply, assigns it to Sam and marks it
    done: the history words each event, names no PHI beyond what it showed before, and shows
    no action's raw name; the disclosure record lists the reads and not the changes."""
    assert reply(world).status_code == 302
    assert world.ada.get(thread_url(world.conversation)).status_code == 200
    history = world.patient.get("/history").get_data(as_text=True)
    assert history.count(CLINIC_READ) == 1  # one reply.read: the one patient message shown
    assign = {"assignee": public_id_of(world.app, SAM)}
    assert act(world.ada, world.conversation, "assign", assign).status_code == 302
    assert act(world.ada, world.conversation, "done").status_code == 302
    history = world.patient.get("/history").get_data(as_text=True)
    assert history.count(CLINIC_READ) == 3  # each form came from the thread's page: a read
    assert f"Opened your conversation with the {TEST_TEAM}" in history
    assert f"Assigned your conversation with the {TEST_TEAM} to Sam Staffer" in history
    assert f"Marked your conversation with the {TEST_TEAM} done" in history
    assert not re.search(r"\b(reply|conversation)\.[a-z]+\b", history)
    assert REPLY_TEXT not in history
    text = disclosures_text(world.patient)
    assert text.count(CLINIC_READ) == 3
    assert f"conversation with the {TEST_TEAM} opened in the portal" in text
    assert "Assigned" not in text
    assert "done" not in text


def test_unassigning_and_reopening_are_worded(world: World) -> None:
    assert reply(world).status_code == 302
    assert act(world.sam, world.conversation, "done").status_code == 302
    assert act(world.sam, world.conversation, "reopen").status_code == 302
    assert act(world.sam, world.conversation, "assign", {"assignee": ""}).status_code == 302
    history = world.patient.get("/history").get_data(as_text=True)
    assert f"Reopened your conversation with the {TEST_TEAM}" in history
    assert f"Unassigned your conversation with the {TEST_TEAM}" in history


def test_the_history_words_every_conversation_action_it_can_show() -> None:
    """No conversation event falls back to its raw action name, with or without a team."""
    for action in Action:
        if action.value.startswith(("conversation.", "reply.")):
            assert action in ACTION_TEXT, action
            for team in (None, TEST_TEAM):
                assert "." not in history_text(action.value, Role.STAFF, team, "Ada Second")


def test_a_patient_started_conversation_reads_as_written_to_the_team(world: World) -> None:
    started = world.patient.submit(
        "/conversations/new",
        {"team": team_public_id(world.app, OPEN_TEAM), "subject": SUBJECT, "body": BODY},
        form_page="/conversations/new",
    )
    assert started.status_code == 302, started.get_data(as_text=True)[:300]
    history = world.patient.get("/history").get_data(as_text=True)
    assert f"Wrote to the {OPEN_TEAM}" in history


def test_a_tampered_reply_names_its_patient_not_the_staff_recipient(world: World) -> None:
    """A patient's reply is addressed to a member of staff: content.tampered must name the
    conversation's patient (the old code named the recipient, Sam)."""
    assert reply(world).status_code == 302
    [_, written] = messages_in(world.app, world.conversation)
    assert written.recipient_id == user_id(world.app, SAM)
    with world.app.app_context():
        event = content.record_tampered(
            db.session,
            actor=SYSTEM,
            meta=NO_REQUEST,
            stage="before_response",
            message_public_id=written.public_id,
        )
        db.session.commit()
        assert event.patient_id == user_id(world.app, PATIENT)


def test_a_tampered_patient_message_outside_a_conversation_names_its_sender(
    world: World,
) -> None:
    """Old data: a reply filed in no conversation still names the patient who wrote it."""
    assert reply(world).status_code == 302
    [_, written] = messages_in(world.app, world.conversation)
    with world.app.app_context():
        db.session.execute(
            update(Message).where(Message.id == written.id).values(conversation_id=None)
        )
        event = content.record_tampered(
            db.session,
            actor=SYSTEM,
            meta=NO_REQUEST,
            stage="before_response",
            message_public_id=written.public_id,
        )
        assert event.patient_id == user_id(world.app, PATIENT)
        staff_sent = db.session.scalar(
            select(Message).where(Message.public_id == world.sent.public_id)
        )
        assert staff_sent is not None
        assert content.patient_of(db.session, staff_sent) == user_id(world.app, PATIENT)
        db.session.rollback()
