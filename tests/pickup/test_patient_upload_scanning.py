"""Patients' uploads (starting a conversation, writing again) are scanned by a real clamd:
infected files and a scanner that is down are refused with nothing stored, every verdict
audited without the file's name."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from portal.extensions import db
from portal.models import Attachment, Conversation, Message
from tests.factories import MINIMAL_PDF, SUBJECT
from tests.support import samples
from tests.support.clamd import EICAR, SIGNATURE, Clamd
from tests.support.conversations import OPEN_TEAM, PATIENT, World, team_public_id, user_id
from tests.support.scanning import scan_events, scan_with, stored_files

NEW = "/conversations/new"
BODY = "The Xylophonoma patch on my arm is bigger today; see the attached photo."
INFECTED = {
    "eicar-in-pdf": ("Quagmire_letter.pdf", samples.pdf(attachment=EICAR)),
    "eicar-after-jpeg": ("Quagmire_rash.jpg", samples.jpeg() + EICAR),
}


def start(world: World, name: str, data: bytes) -> Any:
    fields = {
        "csrf_token": world.patient.token(NEW),
        "team": team_public_id(world.app, OPEN_TEAM),
        "subject": SUBJECT,
        "body": BODY,
        "attachments": (io.BytesIO(data), name),
    }
    return world.patient.client.post(NEW, data=fields, content_type="multipart/form-data")


def write(world: World, name: str, data: bytes) -> Any:
    page = f"/conversations/{world.conversation}"
    fields = {
        "csrf_token": world.patient.token(page),
        "body": BODY,
        "attachments": (io.BytesIO(data), name),
    }
    return world.patient.client.post(
        f"{page}/write", data=fields, content_type="multipart/form-data"
    )


def stored(app: Flask) -> tuple[int, int, int, tuple[int, int]]:
    """(conversations, messages, attachments, (blobs, .part files))."""
    with app.app_context():
        rows = [
            db.session.scalar(select(func.count()).select_from(model)) or 0
            for model in (Conversation, Message, Attachment)
        ]
    return rows[0], rows[1], rows[2], stored_files(app)


@pytest.mark.parametrize("case", sorted(INFECTED))
def test_an_infected_file_is_refused_with_its_name_and_audited(
    world: World, clamd: Clamd, case: str
) -> None:
    name, data = INFECTED[case]
    scan_with(world.app, str(clamd.socket_path))
    before = stored(world.app)
    for post in (start, write):
        refused = post(world, name, data)
        html = refused.get_data(as_text=True)
        assert refused.status_code == 400
        assert f"{name}: This file contains a virus or other malware" in html
        assert stored(world.app) == before
    assert before[3][1] == 0  # no .part
    events = scan_events(world.app)
    assert [(e["outcome"], e["details"]["verdict"]) for e in events] == [("denied", "infected")] * 2
    for event in events:
        assert event["details"]["signature"].startswith(SIGNATURE)
        assert event["patient_id"] == user_id(world.app, PATIENT)
        assert "Quagmire" not in event["raw"]


def test_a_clean_pdf_is_accepted_with_a_clean_verdict(world: World, clamd: Clamd) -> None:
    scan_with(world.app, str(clamd.socket_path))
    done = start(world, "Quagmire_letter.pdf", MINIMAL_PDF)
    assert done.status_code == 302
    (event,) = scan_events(world.app)
    assert (event["outcome"], event["details"]) == (
        "success",
        {"verdict": "clean", "size": len(MINIMAL_PDF)},
    )
    with world.app.app_context():
        attachment = db.session.scalars(select(Attachment).order_by(Attachment.id.desc())).first()
        assert attachment is not None
        assert (event["target_id"], event["message_id"]) == (
            attachment.public_id,
            attachment.message_id,
        )


def test_a_scanner_that_is_down_refuses_the_upload(world: World, tmp_path: Path) -> None:
    scan_with(world.app, str(tmp_path / "nobody-listens.sock"))
    before = stored(world.app)
    refused = write(world, "Quagmire_letter.pdf", MINIMAL_PDF)
    assert refused.status_code == 400
    html = refused.get_data(as_text=True)
    assert "The virus scanner is not available; please try again later." in html
    assert stored(world.app) == before
    (event,) = scan_events(world.app)
    assert (event["outcome"], event["details"]["verdict"]) == ("failure", "unavailable")


def test_with_scanning_off_nothing_is_scanned_and_each_file_is_recorded_unscanned(
    world: World,
) -> None:
    data = samples.pdf(attachment=EICAR)
    assert start(world, "Quagmire_letter.pdf", data).status_code == 302
    (event,) = scan_events(world.app)  # the trail says which files were never scanned
    assert (event["outcome"], event["details"]) == (
        "success",
        {"verdict": "not-scanned", "size": len(data)},
    )
    assert event["patient_id"] == user_id(world.app, PATIENT)
    assert "Quagmire" not in event["raw"]
