"""Conversation helpers: a small world of care teams, staff and a patient, signed in, with a
message sent through the real service, and the rows a test reads back.

- Clinic (the test team): sam and ada. Records: olive (another team, never sees Clinic's).
- The recognisable-PHI patient (tests.factories), enrolled, and a second patient.
- Front desk: a team open to patients, with sam in it.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

from flask import Flask
from sqlalchemy import select
from werkzeug.test import TestResponse

from portal.audit import NO_REQUEST, SYSTEM
from portal.extensions import db
from portal.models import AuditEvent, CareTeam, Conversation, Message, Notification, User
from portal.services import accounts, messaging, notices, teams
from portal.services.messages import Upload
from tests.browser_client import Browser, enrolled_user
from tests.factories import BODY, FILENAME, MINIMAL_PDF, PATIENT_NAME, SUBJECT
from tests.support.pickup import SentMessage, signed_in
from tests.support.teams import TEST_TEAM

OTHER_TEAM = "Records"
OPEN_TEAM = "Front desk"
SAM, ADA, OLIVE = "sam@example.org", "ada@example.org", "olive@example.org"
PATIENT, OTHER_PATIENT = "zq@example.org", "other@example.org"
REPLY_TEXT = "The Xylophonoma rash spread to my Quasirandomitis elbow overnight."
_ROW = re.compile(r'href="/staff/conversations/([0-9a-f]{32})"')


@dataclass
class World:
    """Everyone a conversation test needs and the first message sam sent. Each person's
    browser signs in the first time a test uses it (a sign-in is most of a world's cost)."""

    app: Flask
    sent: SentMessage
    conversation: str  # the public id of the sent message's conversation
    secrets: dict[str, str]  # each person's TOTP secret, by address
    signed: dict[str, Browser] = field(default_factory=dict)

    def browser(self, who: str) -> Browser:
        """The signed-in browser of ``who`` (sam, ada, olive, patient, other_patient)."""
        email = PEOPLE[who]
        if email not in self.signed:
            self.signed[email] = signed_in(self.app, email, self.secrets[email])
        return self.signed[email]

    @property
    def sam(self) -> Browser:
        return self.browser("sam")

    @property
    def ada(self) -> Browser:
        return self.browser("ada")

    @property
    def olive(self) -> Browser:
        return self.browser("olive")

    @property
    def patient(self) -> Browser:
        return self.browser("patient")

    @property
    def other_patient(self) -> Browser:
        return self.browser("other_patient")


PEOPLE = {
    "sam": SAM,
    "ada": ADA,
    "olive": OLIVE,
    "patient": PATIENT,
    "other_patient": OTHER_PATIENT,
}


def build_world(app: Flask) -> World:
    """Make the teams and people and send the first message (committed)."""
    secrets = {
        SAM: _enrol(app, SAM, "Sam Staffer", TEST_TEAM),
        ADA: _enrol(app, ADA, "Ada Second", TEST_TEAM),
        OLIVE: _enrol(app, OLIVE, "Olive Other", OTHER_TEAM),
        PATIENT: _enrol(app, PATIENT, PATIENT_NAME, None),
        OTHER_PATIENT: _enrol(app, OTHER_PATIENT, "Otto Outsider", None),
    }
    with app.app_context():
        front = teams.create_team(
            db.session, name=OPEN_TEAM, open_to_patients=True, actor=SYSTEM, meta=NO_REQUEST
        )
        teams.add_member(db.session, front, SAM, actor=SYSTEM, meta=NO_REQUEST)
        db.session.commit()
    sent = send_from(app)
    return World(app, sent, conversation_of(app, sent.public_id), secrets)


def _enrol(app: Flask, email: str, name: str, team: str | None) -> str:
    """An enrolled account (staff in ``team``; a patient when None); its TOTP secret."""
    role = "staff" if team else "patient"
    _, secret, _ = enrolled_user(app, role=role, email=email, name=name, team=team)
    return secret


def send_from(
    app: Flask,
    sender: str = SAM,
    team: str = TEST_TEAM,
    to: str = PATIENT,
    files: list[tuple[str, bytes]] | None = None,
) -> SentMessage:
    """Send the recognisable-PHI message (with its PDF) from ``sender`` for ``team``
    through messaging.send, as tests.support.pickup.send does (sam is in two teams, so
    each message says which); its id and link path."""
    with app.app_context():
        staff = accounts.find_by_email(db.session, sender)
        patient = accounts.find_by_email(db.session, to)
        chosen = teams.find_by_name(db.session, team)
        assert staff is not None
        assert patient is not None
        assert chosen is not None
        sent = messaging.send(
            db.session,
            sender=staff,
            recipient=patient,
            subject=SUBJECT,
            body=BODY,
            uploads=[
                Upload(name, io.BytesIO(data))
                for name, data in (files if files is not None else [(FILENAME, MINIMAL_PDF)])
            ],
            team=chosen,
            meta=NO_REQUEST,
        )
        db.session.commit()
        return SentMessage(sent.message.public_id, "/" + sent.url.split("/", 3)[3])


def conversation_of(app: Flask, message_public_id: str) -> str:
    """The public id of the conversation a message belongs to."""
    with app.app_context():
        found = db.session.scalar(
            select(Conversation.public_id)
            .join(Message, Message.conversation_id == Conversation.id)
            .where(Message.public_id == message_public_id)
        )
        assert found is not None
        return found


def reply(world: World, text: str = REPLY_TEXT) -> TestResponse:
    """The patient replies to sam's message from its page."""
    url = f"/messages/{world.sent.public_id}"
    return world.patient.submit(url + "/reply", {"body": text}, form_page=url)


def inbox_ids(browser: Browser, query: str = "") -> list[str]:
    """The conversations a member of staff's inbox lists, in order (public ids)."""
    page = browser.get("/staff/inbox" + query)
    assert page.status_code == 200, page.status_code
    return _ROW.findall(page.get_data(as_text=True))


def thread_url(public_id: str) -> str:
    return f"/staff/conversations/{public_id}"


def act(
    browser: Browser, public_id: str, action: str, data: dict[str, str] | None = None
) -> TestResponse:
    """POST one of a conversation's forms (answer, assign, done, reopen) with its CSRF token."""
    url = thread_url(public_id)
    return browser.submit(f"{url}/{action}", data or {}, form_page=url)


def user_id(app: Flask, email: str) -> int:
    with app.app_context():
        user = accounts.find_by_email(db.session, email)
        assert user is not None
        return user.id


def public_id_of(app: Flask, email: str) -> str:
    with app.app_context():
        user = accounts.find_by_email(db.session, email)
        assert user is not None
        return user.public_id


def conversation_row(app: Flask, public_id: str) -> Conversation:
    """The conversation's row, detached (its columns as they are now)."""
    with app.app_context():
        row = db.session.scalar(select(Conversation).where(Conversation.public_id == public_id))
        assert row is not None
        db.session.expunge(row)
        return row


def notices_of(app: Flask, kind: str) -> list[tuple[str, str | None]]:
    """Each queued notice of ``kind``: (recipient's address, its URL), oldest first."""
    with app.app_context():
        rows = db.session.scalars(
            select(Notification).where(Notification.kind == kind).order_by(Notification.id)
        ).all()
        found = []
        for row in rows:
            recipient = db.session.get(User, row.recipient_id)
            assert recipient is not None
            found.append((recipient.email, notices.open_payload(db.session, row)))
        return found


def events_of(app: Flask, action: str) -> list[AuditEvent]:
    with app.app_context():
        rows = db.session.scalars(
            select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)
        ).all()
        for row in rows:
            db.session.expunge(row)
        return list(rows)


def messages_in(app: Flask, public_id: str) -> list[Message]:
    """The conversation's messages, oldest first (detached)."""
    with app.app_context():
        rows = db.session.scalars(
            select(Message)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .where(Conversation.public_id == public_id)
            .order_by(Message.id)
        ).all()
        for row in rows:
            db.session.expunge(row)
        return list(rows)


def team_public_id(app: Flask, name: str) -> str:
    with app.app_context():
        found = db.session.scalar(select(CareTeam.public_id).where(CareTeam.name == name))
        assert found is not None
        return found
