"""Every upload form, submitted with a file by headless Chromium: the file is stored.

The upload gate stages a file only after the form's CSRF token has been read and checked
(``portal.web.uploads``), which holds as long as the browser sends the token before the
files. This drives the real forms (staff compose, staff answer, the patient's next message
and first message to a team) in a real browser, so a template that moved its token after
its file input, or a browser that sent fields out of page order, would fail here (the
request would get the CSRF 400 page and nothing would be stored).
"""

from __future__ import annotations

import io

import pytest
from playwright.sync_api import Browser, Page, expect
from sqlalchemy import func, select

from portal.audit import NO_REQUEST, SYSTEM
from portal.extensions import db
from portal.models import Attachment, Conversation
from portal.services import accounts, messaging, teams
from portal.services.messages import Upload
from tests.browser_client import current_code, enrolled_user
from tests.factories import BODY, FILENAME, MINIMAL_PDF, SUBJECT
from tests.support.browser import VIEWPORTS, Portal

pytestmark = pytest.mark.browser

STAFF_EMAIL = "sam@example.org"
PATIENT_EMAIL = "zq@example.org"
PASSWORD = "Correct horse battery staple 42"  # tests.browser_client.enrolled_user's
OPEN_TEAM = "Front desk"
PDF = {"name": "letter.pdf", "mimeType": "application/pdf", "buffer": MINIMAL_PDF}


def sign_in(page: Page, portal: Portal, email: str, secret: str) -> None:
    page.goto(portal.base_url + "/signin")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Continue").click()
    page.get_by_label("Authentication code").fill(current_code(secret))
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()


def attachments(portal: Portal) -> int:
    with portal.app.app_context():
        return int(db.session.scalar(select(func.count()).select_from(Attachment)) or 0)


def test_every_upload_form_sends_its_file_after_the_token(
    portal_server: Portal, chromium: Browser
) -> None:
    app = portal_server.app
    _, staff_secret, _ = enrolled_user(app, role="staff", email=STAFF_EMAIL)
    _, patient_secret, _ = enrolled_user(app, role="patient", email=PATIENT_EMAIL)
    with app.app_context():
        sender = accounts.find_by_email(db.session, STAFF_EMAIL)
        patient = accounts.find_by_email(db.session, PATIENT_EMAIL)
        assert sender is not None
        assert patient is not None
        front = teams.create_team(
            db.session, name=OPEN_TEAM, open_to_patients=True, actor=SYSTEM, meta=NO_REQUEST
        )
        teams.add_member(db.session, front, STAFF_EMAIL, actor=SYSTEM, meta=NO_REQUEST)
        messaging.send(
            db.session,
            sender=sender,
            recipient=patient,
            subject=SUBJECT,
            body=BODY,
            uploads=[Upload(FILENAME, io.BytesIO(MINIMAL_PDF))],
            team=teams.teams_of(db.session, sender)[0],
            meta=NO_REQUEST,
        )
        db.session.commit()
        patient_id = patient.public_id
        conversation = db.session.scalars(select(Conversation.public_id)).one()
    stored = attachments(portal_server)

    staff_context = chromium.new_context(**VIEWPORTS["desktop"])
    patient_context = chromium.new_context(**VIEWPORTS["desktop"])
    for made in (staff_context, patient_context):
        made.set_default_timeout(15_000)
    try:
        staff = staff_context.new_page()
        sign_in(staff, portal_server, STAFF_EMAIL, staff_secret)
        staff.goto(f"{portal_server.base_url}/staff/messages/new?to={patient_id}")
        if staff.get_by_label("Care team").count():
            staff.get_by_label("Care team").select_option(index=1)
        staff.get_by_label("Subject").fill("Your letter")
        staff.get_by_label("Message", exact=True).fill("The letter is attached.")
        staff.get_by_label("Attachments (PDF or photos)").set_input_files(PDF)
        staff.get_by_role("button", name="Send securely").click()
        expect(staff.get_by_text("Message sent.")).to_be_visible()
        assert attachments(portal_server) == stored + 1

        staff.goto(f"{portal_server.base_url}/staff/conversations/{conversation}")
        staff.get_by_label("Your answer").fill("Here it is again.")
        staff.get_by_label("Attachments (PDF or photos)").set_input_files(PDF)
        staff.get_by_role("button", name="Send answer").click()
        expect(staff.get_by_text("Your answer was sent.")).to_be_visible()
        assert attachments(portal_server) == stored + 2

        writer = patient_context.new_page()
        sign_in(writer, portal_server, PATIENT_EMAIL, patient_secret)
        writer.goto(f"{portal_server.base_url}/conversations/{conversation}")
        writer.get_by_label("Your message").fill("My own copy, signed.")
        writer.get_by_label("Attachments (optional)").set_input_files(PDF)
        writer.get_by_role("button", name="Send", exact=True).click()
        expect(writer.get_by_text("Your message was sent.")).to_be_visible()
        assert attachments(portal_server) == stored + 3

        writer.goto(f"{portal_server.base_url}/conversations/new")
        writer.get_by_label("Care team").select_option(label=OPEN_TEAM)
        writer.get_by_label("Subject").fill("A new letter")
        writer.get_by_label("Your message").fill("Please file this one.")
        writer.get_by_label("Attachments (optional)").set_input_files(PDF)
        writer.get_by_role("button", name="Send message").click()
        expect(writer.get_by_text(f"Your message was sent to {OPEN_TEAM}.")).to_be_visible()
        assert attachments(portal_server) == stored + 4
    finally:
        staff_context.close()
        patient_context.close()
