"""Patients write first (issue 14 item 3), and read their conversations grouped: over HTTP, on
SQLite and PostgreSQL. A patient-started conversation reaches its team and nobody else;
writing is rate limited per patient; a team not open to patients takes nothing."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from portal.audit import NO_REQUEST, SYSTEM, Action
from portal.extensions import db
from portal.models import Attachment, AuditEvent, Conversation, Message
from portal.models.notifications import NoticeKind
from portal.pickup.conversations import TOO_MANY
from portal.services import teams
from tests.factories import MINIMAL_PDF, PATIENT_NAME
from tests.support.conversations import (
    OLIVE,
    OPEN_TEAM,
    OTHER_TEAM,
    PATIENT,
    REPLY_TEXT,
    SAM,
    World,
    act,
    events_of,
    inbox_ids,
    messages_in,
    notices_of,
    reply,
    team_public_id,
    thread_url,
    user_id,
)
from tests.support.teams import TEST_TEAM

SUBJECT = "Quasirandomitis rash photo"
BODY = "The Xylophonoma patch on my arm is bigger today; see the attached letter."
NEW = "/conversations/new"


def details(event: AuditEvent) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(event.details or "{}")
    return found


def start(world: World, team: str | None = OPEN_TEAM, who: str = "patient", **extra: Any) -> Any:
    fields = {
        "team": team_public_id(world.app, team) if team else "",
        "subject": SUBJECT,
        "body": BODY,
        **extra,
    }
    return world.browser(who).submit(NEW, fields)


def counts(app: Flask) -> tuple[int, int, int]:
    """(conversations, messages, attachments) stored."""
    with app.app_context():
        found = [
            db.session.scalar(select(func.count()).select_from(model)) or 0
            for model in (Conversation, Message, Attachment)
        ]
        return found[0], found[1], found[2]


def test_a_patient_started_conversation_reaches_its_team_only(world: World) -> None:
    sent = start(world)
    assert sent.status_code == 302
    public_id = sent.location.rsplit("/", 1)[1]
    assert public_id in inbox_ids(world.sam)  # sam is in Front desk
    assert public_id not in inbox_ids(world.ada)  # Clinic only
    assert inbox_ids(world.olive) == []
    html = world.sam.get(thread_url(public_id)).get_data(as_text=True)
    assert BODY in html
    assert "From the patient" in world.sam.get("/staff/inbox").get_data(as_text=True)

    (address, url), *more = notices_of(world.app, NoticeKind.TEAM_MESSAGE)
    assert more == []
    assert address == SAM
    assert url == world.app.config["BASE_URL"] + thread_url(public_id)
    (started,) = events_of(world.app, Action.CONVERSATION_START)
    assert (started.actor_id, started.target_id) == (user_id(world.app, PATIENT), public_id)
    (first,) = messages_in(world.app, public_id)
    assert (first.sender_id, first.recipient_id) == (
        user_id(world.app, PATIENT),
        user_id(world.app, SAM),
    )


def test_every_member_of_the_team_is_told(world: World) -> None:
    with world.app.app_context():
        front = teams.find_by_name(db.session, OPEN_TEAM)
        assert front is not None
        teams.add_member(db.session, front, "ada@example.org", actor=SYSTEM, meta=NO_REQUEST)
        db.session.commit()
    start(world)
    told = sorted(address for address, _ in notices_of(world.app, NoticeKind.TEAM_MESSAGE))
    assert told == ["ada@example.org", SAM]


@pytest.mark.parametrize("team", [TEST_TEAM, OTHER_TEAM])
def test_a_team_not_open_to_patients_takes_nothing(world: World, team: str) -> None:
    before = counts(world.app)
    refused = start(world, team)
    assert refused.status_code == 400
    assert "Choose one of the care teams listed." in refused.get_data(as_text=True)
    assert counts(world.app) == before
    assert notices_of(world.app, NoticeKind.TEAM_MESSAGE) == []
    (denied,) = events_of(world.app, Action.ACCESS_DENIED)
    assert (denied.target_type, details(denied)["reason"]) == ("team", "team_not_open")


def test_an_archived_or_unknown_team_takes_nothing(world: World) -> None:
    with world.app.app_context():
        front = teams.find_by_name(db.session, OPEN_TEAM)
        assert front is not None
        teams.archive_team(db.session, front, actor=SYSTEM, meta=NO_REQUEST)
        db.session.commit()
    before = counts(world.app)
    assert start(world).status_code == 400
    assert (
        world.patient.submit(NEW, {"team": "f" * 32, "subject": "s", "body": "b"}).status_code
        == 400
    )
    assert world.patient.submit(NEW, {"team": "", "subject": "s", "body": "b"}).status_code == 400
    assert counts(world.app) == before
    page = world.patient.get(NEW).get_data(as_text=True)
    assert "No care team takes messages through the portal" in page


def test_bad_input_is_a_clear_error_and_stores_nothing(world: World) -> None:
    before = counts(world.app)
    for extra, text in (
        ({"subject": ""}, "Enter a subject."),
        ({"body": "  "}, "Write your message."),
        ({"body": "x" * 10_001}, "Keep your message under 10,000 characters."),
        ({"subject": "s" * 201}, "Field cannot be longer than 200 characters."),
    ):
        refused = start(world, **extra)
        assert refused.status_code == 400
        assert text in refused.get_data(as_text=True)
    assert counts(world.app) == before


def test_staff_cannot_use_the_patient_pages(world: World) -> None:
    assert world.sam.get(NEW).status_code == 403
    assert world.sam.get("/conversations").status_code == 403


def test_writing_first_is_rate_limited_per_patient(world: World) -> None:
    for _ in range(5):
        assert start(world).status_code == 302
    refused = start(world)
    assert refused.status_code == 429
    assert TOO_MANY in refused.get_data(as_text=True)
    assert counts(world.app)[0] == 6  # sam's conversation and the five
    assert start(world, who="other_patient").status_code == 302  # another patient is not held


def test_a_start_without_a_csrf_token_is_refused(world: World) -> None:
    refused = world.patient.client.post(
        NEW, data={"team": team_public_id(world.app, OPEN_TEAM), "subject": "s", "body": "b"}
    )
    assert refused.status_code == 400
    assert counts(world.app)[0] == 1


def test_a_file_from_the_patient_is_stored_encrypted_and_reaches_the_team(world: World) -> None:
    fields = {
        "csrf_token": world.patient.token(NEW),
        "team": team_public_id(world.app, OPEN_TEAM),
        "subject": SUBJECT,
        "body": BODY,
        "attachments": (_bytes_io(MINIMAL_PDF), "Quagmire_rash_letter.pdf"),
    }
    done = world.patient.client.post(NEW, data=fields, content_type="multipart/form-data")
    assert done.status_code == 302, done.get_data(as_text=True)[:500]
    public_id = done.location.rsplit("/", 1)[1]
    (first,) = messages_in(world.app, public_id)
    with world.app.app_context():
        (attachment,) = db.session.scalars(
            select(Attachment).where(Attachment.message_id == first.id)
        ).all()
        assert b"Quagmire" not in attachment.filename_sealed
        stored = attachment.public_id
    page = world.sam.get(thread_url(public_id)).get_data(as_text=True)
    assert "Quagmire_rash_letter.pdf" in page
    got = world.sam.get(f"{thread_url(public_id)}/messages/{first.public_id}/attachments/{stored}")
    assert got.status_code == 200
    assert got.data == MINIMAL_PDF


def test_a_file_that_is_not_a_pdf_is_refused_with_nothing_stored(world: World) -> None:
    before = counts(world.app)
    fields = {
        "csrf_token": world.patient.token(NEW),
        "team": team_public_id(world.app, OPEN_TEAM),
        "subject": SUBJECT,
        "body": BODY,
        "attachments": (_bytes_io(b"MZ\x90\x00 not a document"), "photo.pdf"),
    }
    refused = world.patient.client.post(NEW, data=fields, content_type="multipart/form-data")
    assert refused.status_code == 400
    assert "Traceback" not in refused.get_data(as_text=True)
    assert counts(world.app) == before
    assert notices_of(world.app, NoticeKind.TEAM_MESSAGE) == []


def _bytes_io(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


def test_the_patient_sees_conversations_grouped_and_reads_the_answer(world: World) -> None:
    public_id = start(world).location.rsplit("/", 1)[1]
    listed = world.patient.get("/conversations").get_data(as_text=True)
    assert SUBJECT in listed
    assert OPEN_TEAM in listed
    assert f'href="/conversations/{world.conversation}"' in listed  # sam's message: its thread

    act(world.sam, public_id, "answer", {"body": "Please send a photo of the Phiseed patch."})
    listed = world.patient.get("/conversations").get_data(as_text=True)
    assert listed.count("1 new") == 2  # sam's first message, unopened, and the answer
    page = world.patient.get(f"/conversations/{public_id}").get_data(as_text=True)
    assert "Please send a photo of the Phiseed patch." in page
    assert BODY in page
    answer = messages_in(world.app, public_id)[-1]
    viewed = [e for e in events_of(world.app, Action.MESSAGE_VIEW) if e.message_id == answer.id]
    assert [(e.actor_id, details(e)["page"]) for e in viewed] == [
        (user_id(world.app, PATIENT), "conversation")
    ]
    assert messages_in(world.app, public_id)[-1].first_opened_at is not None
    assert world.patient.get("/conversations").get_data(as_text=True).count("1 new") == 1


def test_the_patient_writes_again_and_the_team_is_told(world: World) -> None:
    url = f"/conversations/{world.conversation}"
    act(world.sam, world.conversation, "done")
    done = world.patient.submit(
        url + "/write", {"body": "One more Xylophonoma question"}, form_page=url
    )
    assert done.status_code == 302
    assert [address for address, _ in notices_of(world.app, NoticeKind.REPLY)] == [SAM]
    assert world.conversation in inbox_ids(world.ada)  # reopened, unread
    latest = messages_in(world.app, world.conversation)[-1]
    assert latest.in_reply_to_id == messages_in(world.app, world.conversation)[0].id


def test_another_patients_conversation_is_404_and_audited(world: World) -> None:
    url = f"/conversations/{world.conversation}"
    assert world.other_patient.get(url).status_code == 404
    refused = world.other_patient.submit(url + "/write", {"body": "hi"}, form_page="/conversations")
    assert refused.status_code == 404
    assert len(messages_in(world.app, world.conversation)) == 1
    denied = events_of(world.app, Action.ACCESS_DENIED)
    assert [details(e)["reason"] for e in denied] == ["not_patient", "not_patient"]
    assert PATIENT_NAME not in refused.get_data(as_text=True)


def test_olive_never_sees_a_patient_started_conversation(world: World) -> None:
    public_id = start(world).location.rsplit("/", 1)[1]
    assert world.olive.get(thread_url(public_id)).status_code == 404
    (denied,) = events_of(world.app, Action.ACCESS_DENIED)
    assert denied.actor_id == user_id(world.app, OLIVE)


def test_a_patients_first_message_has_no_staff_status_page_nor_resend(world: World) -> None:
    public_id = start(world).location.rsplit("/", 1)[1]
    (first,) = messages_in(world.app, public_id)
    before = notices_of(world.app, NoticeKind.PICKUP)
    assert world.sam.get(f"/staff/messages/{first.public_id}").status_code == 404
    resend = world.sam.submit(
        f"/staff/messages/{first.public_id}/resend", {}, form_page=thread_url(public_id)
    )
    assert resend.status_code == 404
    assert notices_of(world.app, NoticeKind.PICKUP) == before  # no link sent to staff


def test_opening_another_patients_reply_is_denied_under_the_patient_who_wrote_it(
    world: World,
) -> None:
    """A patient's reply is addressed to staff: its refusal is filed under its sender."""
    assert reply(world).status_code in (200, 302, 303)
    [first, answer] = messages_in(world.app, world.conversation)[:2]
    assert answer.in_reply_to_id == first.id
    refused = world.other_patient.get(f"/messages/{answer.public_id}")
    assert refused.status_code == 404
    [denied] = events_of(world.app, Action.ACCESS_DENIED)
    assert denied.patient_id == user_id(world.app, PATIENT)  # not the member of staff
    assert REPLY_TEXT not in refused.get_data(as_text=True)
