"""Staff attach photos through HTTP (compose and answers, the real upload pipeline, both
databases): stored re-encoded, shown inline on the team's conversation page under the same
access rules as a download; EICAR as a JPEG refused by the real clamd, audited, nothing
stored; a PDF keeps its download link."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest
from flask import Flask
from PIL import Image
from sqlalchemy import func, select

from portal.audit import Action
from portal.extensions import db
from portal.models import Attachment, Message
from portal.services import messaging
from portal.web.downloads import IMAGE_CSP
from tests.browser_client import Browser
from tests.factories import BODY, MINIMAL_PDF, SUBJECT
from tests.support import samples
from tests.support.clamd import EICAR, SIGNATURE, Clamd
from tests.support.conversations import (
    OLIVE,
    PATIENT,
    World,
    events_of,
    public_id_of,
    team_public_id,
    thread_url,
    user_id,
)
from tests.support.scanning import scan_events, scan_with, stored_files
from tests.support.teams import TEST_TEAM

NAME = "Quagmire_wound"  # recognisable PHI in the file name (tests.factories)
_IMG = re.compile(r'<img src="([^"]+/inline)"')
INFECTED = {
    "eicar-after-jpeg": samples.jpeg() + EICAR,
    "eicar-in-jpeg-comment": samples.jpeg(comment=EICAR),
}


def gps_jpeg() -> bytes:
    return samples.jpeg(exif=samples.gps_exif().tobytes())


def answer(world: World, files: list[tuple[bytes, str]]) -> Any:
    url = thread_url(world.conversation)
    fields = {
        "csrf_token": world.sam.token(url),
        "body": BODY,
        "attachments": [(io.BytesIO(data), name) for data, name in files],
    }
    return world.sam.client.post(f"{url}/answer", data=fields, content_type="multipart/form-data")


def compose(world: World, data: bytes, name: str) -> Any:
    browser: Browser = world.sam
    fields: dict[str, Any] = {
        "subject": SUBJECT,
        "body": BODY,
        "body_format": "text",
        "expires_days": "7",
        "team": team_public_id(world.app, TEST_TEAM),
        "attachments": [(io.BytesIO(data), name)],
    }
    url = f"/staff/messages/new?to={public_id_of(world.app, PATIENT)}"
    return browser.submit(url, fields, content_type="multipart/form-data")


def counts(app: Flask) -> tuple[int, int, tuple[int, int]]:
    """(messages, attachments, (blobs, .part files))."""
    with app.app_context():
        messages = db.session.scalar(select(func.count()).select_from(Message)) or 0
        attachments = db.session.scalar(select(func.count()).select_from(Attachment)) or 0
    return messages, attachments, stored_files(app)


def page_images(world: World, browser: Browser | None = None) -> list[str]:
    page = (browser or world.sam).get(thread_url(world.conversation))
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert html.count("<img ") == html.count('loading="lazy"')  # each fetched when scrolled to
    return [str(url) for url in _IMG.findall(html)]


def test_a_photo_in_an_answer_is_shown_inline_re_encoded_and_audited(world: World) -> None:
    assert answer(
        world, [(gps_jpeg(), f"{NAME}.jpg"), (MINIMAL_PDF, "letter.pdf")]
    ).status_code == (302)
    (url,) = page_images(world)  # the photo inline; the PDF only as a link
    served = world.ada.get(url)  # a colleague in the team
    assert served.status_code == 200
    assert served.headers["Content-Type"] == "image/jpeg"
    assert served.headers["X-Content-Type-Options"] == "nosniff"
    assert served.headers["Cache-Control"] == "no-store"
    assert served.headers["Content-Security-Policy"] == IMAGE_CSP  # as the patient's side
    assert served.headers["Content-Disposition"].startswith('inline; filename="photo.jpg";')
    assert NAME not in served.headers["Content-Disposition"]  # the patient's name for it
    with Image.open(io.BytesIO(served.get_data())) as image:
        image.load()
        assert not image.getexif()
    assert b"PickupCam" not in served.get_data()
    attachment_id = url.split("/attachments/")[1].split("/")[0]
    # Shown on the page: a view, as the patient's, not a download (issue 14 item 4).
    (viewed,) = [
        e for e in events_of(world.app, Action.ATTACHMENT_VIEW) if e.target_id == attachment_id
    ]
    assert viewed.patient_id == user_id(world.app, PATIENT)
    assert json.loads(viewed.details or "{}") == {"size": len(served.get_data()), "inline": True}
    with world.app.app_context():
        message = db.session.get(Message, viewed.message_id)
        assert message is not None
        shown = [entry.what for entry in messaging.status(db.session, message)]
    assert "Attachment viewed by staff" in shown  # the sender's status page, not "by the patient"
    assert [
        e for e in events_of(world.app, Action.ATTACHMENT_DOWNLOAD) if e.target_id == attachment_id
    ] == []
    download = world.ada.get(url.removesuffix("/inline"))
    assert download.headers["Content-Disposition"].startswith("attachment;")
    assert f"{NAME}.jpg" in download.headers["Content-Disposition"]
    assert download.get_data() == served.get_data()
    (read,) = [
        e for e in events_of(world.app, Action.ATTACHMENT_DOWNLOAD) if e.target_id == attachment_id
    ]
    assert json.loads(read.details or "{}") == {"size": len(served.get_data())}


@pytest.mark.parametrize("suffix", ["", "/inline"], ids=["download", "inline"])
def test_staff_outside_the_team_get_404_on_both_file_routes(world: World, suffix: str) -> None:
    assert answer(world, [(gps_jpeg(), f"{NAME}.jpg")]).status_code == 302
    (url,) = page_images(world)
    url = url.removesuffix("/inline") + suffix
    before = len(events_of(world.app, Action.ACCESS_DENIED))
    refused = world.olive.get(url)
    assert refused.status_code == 404
    assert NAME not in refused.get_data(as_text=True)
    assert len(events_of(world.app, Action.ACCESS_DENIED)) == before + 1
    olive = user_id(world.app, OLIVE)
    for action in (Action.ATTACHMENT_DOWNLOAD, Action.ATTACHMENT_VIEW):
        assert [e for e in events_of(world.app, action) if e.actor_id == olive] == []


def test_inline_is_for_photos_a_pdf_stays_a_download(world: World) -> None:
    assert answer(world, [(MINIMAL_PDF, "letter.pdf")]).status_code == 302
    assert page_images(world) == []
    with world.app.app_context():
        (pdf,) = db.session.scalars(
            select(Attachment)
            .where(Attachment.content_type == "application/pdf")
            .order_by(Attachment.id.desc())
            .limit(1)
        ).all()
        message = db.session.get(Message, pdf.message_id)
        assert message is not None
        message_id = message.public_id
        attachment_id = pdf.public_id
    url = f"{thread_url(world.conversation)}/messages/{message_id}/attachments/{attachment_id}"
    served = world.sam.get(url + "/inline")
    assert served.headers["Content-Disposition"].startswith("attachment;")


@pytest.mark.parametrize("case", sorted(INFECTED))
@pytest.mark.parametrize("route", ["compose", "answer"])
def test_eicar_as_a_jpeg_from_staff_is_refused_audited_and_nothing_stored(
    world: World, clamd: Clamd, case: str, route: str
) -> None:
    data = INFECTED[case]
    scan_with(world.app, str(clamd.socket_path))
    before = counts(world.app)
    name = f"{NAME}.jpg"
    refused = compose(world, data, name) if route == "compose" else answer(world, [(data, name)])
    html = refused.get_data(as_text=True)
    assert refused.status_code == 400
    assert f"{name}: This file contains a virus or other malware" in html
    assert counts(world.app) == before
    assert before[2][1] == 0  # no .part
    (event,) = scan_events(world.app)
    assert (event["outcome"], event["details"]["verdict"]) == ("denied", "infected")
    assert event["details"]["signature"].startswith(SIGNATURE)
    assert event["details"]["size"] == len(data)
    assert event["message_id"] is None
    assert "Quagmire" not in event["raw"]
