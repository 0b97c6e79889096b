"""Conversation notices end to end (issue 14 items 2 and 3): the notifier delivers them over
TLS into a real mail sink, and none carries PHI. A staff answer reaches the patient as a
pickup notice with its own link; a patient's reply or first message reaches the team with
the conversation's link (a public id, nothing else), which leads to it after sign-in."""

from __future__ import annotations

from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import pytest
from flask import Flask

from notifier import render, worker
from notifier.sink import MailSink
from portal.extensions import limiter
from tests.factories import BODY, FILENAME, PATIENT_NAME, PHI_STRINGS, SUBJECT
from tests.support.conversations import (
    OPEN_TEAM,
    PATIENT,
    SAM,
    World,
    act,
    build_world,
    reply,
    team_public_id,
    thread_url,
)

BASE_URL = "https://portal.example.org"
ANSWER = "Apply the Phiseedwell ointment to the Quasirandomitis patch twice a day."
STARTED = (
    "Xylophonoma lump question",
    "Is the Xylophonoma lump on my neck something to worry about?",
)
# Everything seeded that is PHI: the patient's name and date of birth, the first message's
# subject, body and file name, the reply, the answer and the patient's own first message.
LEAKS = [
    *PHI_STRINGS,
    PATIENT_NAME,
    SUBJECT,
    FILENAME,
    *BODY.split()[1:3],
    "rash",
    "elbow",
    "ointment",
    "neck",
    "lump",
    PATIENT,
]


@pytest.fixture
def mailed_world(make_app: Callable[..., Flask], sink: MailSink) -> World:
    """The conversation world (tests/support/conversations.py) on an app that mails ``sink``."""
    app = make_app(
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=sink.port,
        SMTP_CA_FILE=str(sink.cert_file),
        BASE_URL=BASE_URL,
        MAIL_FROM="no-reply@portal.example.org",
        ORG_NAME="Riverside Family Practice",
    )
    with app.app_context():
        limiter.reset()
    return build_world(app)


def deliver(
    world: World, sink: MailSink, delivered: Callable[..., list[EmailMessage]]
) -> list[EmailMessage]:
    """Run the notifier until nothing is due; every email the sink holds, oldest first."""
    worker.run_once(world.app, "w1")
    return delivered(sink)


def text_of(email: EmailMessage) -> str:
    return "\n".join(render.readable_texts(email))


def assert_phi_free(email: EmailMessage) -> None:
    text = text_of(email).lower()
    found = [leak for leak in LEAKS if leak.lower() in text]
    assert found == [], f"PHI in the email: {found}"


def to_of(emails: list[EmailMessage], address: str) -> list[EmailMessage]:
    return [e for e in emails if e["To"] == address]


def test_a_reply_tells_the_team_with_the_conversations_link(
    mailed_world: World, sink: MailSink, delivered: Any
) -> None:
    world = mailed_world
    reply(world)
    (email,) = to_of(deliver(world, sink, delivered), SAM)
    assert_phi_free(email)
    assert BASE_URL + thread_url(world.conversation) in text_of(email)
    assert "has replied" in email["Subject"]


def test_a_staff_answer_reaches_the_patient_as_a_phi_free_pickup_notice(
    mailed_world: World, sink: MailSink, delivered: Any
) -> None:
    world = mailed_world
    reply(world)
    assert act(world.sam, world.conversation, "answer", {"body": ANSWER}).status_code == 302
    to_patient = to_of(deliver(world, sink, delivered), PATIENT)
    assert len(to_patient) == 2  # the first message's notice, then the answer's
    for email in to_patient:
        assert_phi_free(email)
    link = next(line for line in text_of(to_patient[-1]).split() if "/p/" in line)
    assert link.startswith(BASE_URL + "/p/")
    # The link leads the signed-in patient to the answer.
    landing = world.patient.get(link.removeprefix(BASE_URL))
    assert landing.status_code == 200


def test_a_patient_started_conversation_tells_the_team_without_phi(
    mailed_world: World, sink: MailSink, delivered: Any
) -> None:
    world = mailed_world
    form = {"team": team_public_id(world.app, OPEN_TEAM), "subject": STARTED[0], "body": STARTED[1]}
    started = world.patient.submit("/conversations/new", form)
    assert started.status_code == 302
    public_id = started.location.rsplit("/", 1)[1]
    (email,) = to_of(deliver(world, sink, delivered), SAM)
    assert_phi_free(email)
    assert "written to your care team" in email["Subject"]
    assert BASE_URL + thread_url(public_id) in text_of(email)
