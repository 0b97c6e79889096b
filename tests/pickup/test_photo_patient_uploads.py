"""Patients attach photos through HTTP (the real upload pipeline, on both databases): a JPEG
with GPS EXIF, a PNG and a HEIC are stored re-encoded and shown inline to the team without
their metadata; disguised, damaged, empty and bomb files, and EICAR inside a JPEG (refused by
the real clamd), are refused with a clear message and nothing stored; staff outside the team
get 404 (audited); no PHI reaches a log or the audit trail."""

from __future__ import annotations

import io
import logging
import re
from typing import Any

import pytest
from flask import Flask
from PIL import Image
from sqlalchemy import func, select

from portal.audit import Action
from portal.extensions import db
from portal.models import Attachment, Conversation, Message
from portal.web.downloads import IMAGE_CSP
from tests.factories import MINIMAL_PDF, SUBJECT
from tests.support import samples
from tests.support.clamd import EICAR, SIGNATURE, Clamd
from tests.support.conversations import (
    OPEN_TEAM,
    PATIENT,
    World,
    events_of,
    team_public_id,
    thread_url,
    user_id,
)
from tests.support.scanning import scan_events, scan_with, stored_files

NEW = "/conversations/new"
NAME = "Quagmire_Xylophonoma_rash"  # recognisable PHI in the file name (tests.factories)
BODY = "The Xylophonoma patch on my arm is bigger today; see the attached photo."
_INLINE = re.compile(r'<img src="(/staff/conversations/[0-9a-f]{32}/messages/[^"]+/inline)"')
_PATIENT_IMG = re.compile(r'<img src="(/messages/[0-9a-f]{32}/attachments/[0-9a-f]{32}/view)"')


def gps_jpeg() -> bytes:
    return samples.jpeg(exif=samples.gps_exif(orientation=6).tobytes())


def start(world: World, filename: str, data: bytes) -> Any:
    """The patient starts a conversation with the open team, attaching one file."""
    fields = {
        "csrf_token": world.patient.token(NEW),
        "team": team_public_id(world.app, OPEN_TEAM),
        "subject": SUBJECT,
        "body": BODY,
        "attachments": (io.BytesIO(data), filename),
    }
    return world.patient.client.post(NEW, data=fields, content_type="multipart/form-data")


def stored(app: Flask) -> tuple[int, int, int, tuple[int, int]]:
    """(conversations, messages, attachments, (blobs, .part files))."""
    with app.app_context():
        rows = [
            db.session.scalar(select(func.count()).select_from(model)) or 0
            for model in (Conversation, Message, Attachment)
        ]
    return rows[0], rows[1], rows[2], stored_files(app)


def newest_conversation(app: Flask) -> str:
    with app.app_context():
        found = db.session.scalar(select(Conversation.public_id).order_by(Conversation.id.desc()))
        assert found is not None
        return found


def newest_attachment(app: Flask) -> tuple[str, str, int]:
    """(public id, content type, size) of the newest attachment."""
    with app.app_context():
        row = db.session.scalars(select(Attachment).order_by(Attachment.id.desc())).first()
        assert row is not None
        return row.public_id, row.content_type, row.size


def inline_url(world: World, conversation: str) -> str:
    """The <img> the team's conversation page shows for the patient's photo."""
    page = world.sam.get(thread_url(conversation))
    assert page.status_code == 200
    (url,) = _INLINE.findall(page.get_data(as_text=True))
    return str(url)


def assert_served_clean(response: Any, media_type: str) -> Image.Image:
    """The inline response's headers are safe, and its body an image without metadata."""
    assert response.status_code == 200
    headers = response.headers
    assert headers["Content-Type"] == media_type
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert "sandbox" in headers["Content-Security-Policy"]
    assert headers["Content-Disposition"].startswith("inline;")
    assert headers["Content-Security-Policy"] == IMAGE_CSP  # staff and patient alike
    data = response.get_data()
    assert int(headers["Content-Length"]) == len(data)
    assert b"PickupCam" not in data
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes whole
    assert not image.getexif()
    assert "icc_profile" not in image.info or image.info["icc_profile"]
    return image


def test_a_gps_jpeg_from_a_patient_is_shown_inline_to_the_team_without_its_location(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert start(world, f"{NAME}.jpg", gps_jpeg()).status_code == 302
    conversation = newest_conversation(world.app)
    attachment_id, content_type, size = newest_attachment(world.app)
    assert content_type == "image/jpeg"
    served = world.sam.get(inline_url(world, conversation))
    image = assert_served_clean(served, "image/jpeg")
    assert image.size == (48, 64)  # EXIF orientation 6 applied: turned upright
    assert len(served.get_data()) == size
    (read,) = [
        e for e in events_of(world.app, Action.ATTACHMENT_VIEW) if e.target_id == attachment_id
    ]
    assert read.patient_id == user_id(world.app, PATIENT)
    assert "Quagmire" not in (read.details or "")
    for leak in ("Quagmire", "Xylophonoma", "PickupCam", "GPS"):
        assert leak not in caplog.text


@pytest.mark.parametrize(
    ("suffix", "make", "media_type", "stored_suffix"),
    [
        (".png", lambda: samples.png(exif=samples.gps_exif().tobytes()), "image/png", ".png"),
        (".heic", lambda: samples.heic(exif=samples.gps_exif().tobytes()), "image/jpeg", ".jpg"),
    ],
    ids=["png", "heic"],
)
def test_png_and_heic_are_accepted_and_shown_re_encoded(
    world: World, suffix: str, make: Any, media_type: str, stored_suffix: str
) -> None:
    assert start(world, NAME + suffix, make()).status_code == 302
    served = world.sam.get(inline_url(world, newest_conversation(world.app)))
    assert_served_clean(served, media_type)
    assert f'filename="photo{stored_suffix}"' in served.headers["Content-Disposition"]
    assert NAME not in served.headers["Content-Disposition"]  # the patient's own name for it


def polyglot_jpeg() -> bytes:
    """A valid JPEG whose first KiB carries an HTML page (in a comment segment)."""
    return samples.jpeg(comment=b"<html><script>alert(document.cookie)</script></html>")


REFUSED = {
    "pdf-named-jpg": (MINIMAL_PDF, "which does not match its name or type"),
    "html-named-jpg": (b"<!doctype html><html><body>hi</body></html>\n" * 40, "not a JPEG file"),
    "polyglot": (polyglot_jpeg(), "holds a second kind of content"),
    "truncated": (gps_jpeg()[:-200], "could not be read as a JPEG; it may be damaged"),
    "zero-bytes": (b"", "This file is empty."),
    "bomb": (samples.png_bomb(7_070, 7_070), "more than 25 megapixels"),  # 50 MP: was let in
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_bad_photo_is_refused_clearly_with_nothing_stored(
    world: World, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    data, message = REFUSED[case]
    filename = f"{NAME}.png" if case == "bomb" else f"{NAME}.jpg"
    before = stored(world.app)
    caplog.set_level(logging.DEBUG)
    refused = start(world, filename, data)
    html = refused.get_data(as_text=True)
    assert refused.status_code == 400
    assert f"{filename}: " in html
    assert message in html
    assert "Traceback" not in html
    assert "PIL" not in html
    assert "pypdf" not in html
    assert stored(world.app) == before
    assert before[3][1] == 0  # no .part file
    for phi in ("Quagmire", "Xylophonoma"):
        assert phi not in caplog.text


INFECTED = {
    "eicar-after-jpeg": samples.jpeg() + EICAR,
    "eicar-in-jpeg-comment": samples.jpeg(comment=EICAR),  # a JPEG that decodes
}


@pytest.mark.parametrize("case", sorted(INFECTED))
def test_eicar_as_a_jpeg_is_refused_by_clamd_audited_and_nothing_stored(
    world: World, clamd: Clamd, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = INFECTED[case]
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # a real JPEG: only the scanner can tell
    scan_with(world.app, str(clamd.socket_path))
    before = stored(world.app)
    caplog.set_level(logging.DEBUG)
    refused = start(world, f"{NAME}.jpg", data)
    assert refused.status_code == 400
    assert f"{NAME}.jpg: This file contains a virus or other malware" in refused.get_data(
        as_text=True
    )
    assert stored(world.app) == before
    (event,) = scan_events(world.app)
    assert (event["outcome"], event["details"]["verdict"]) == ("denied", "infected")
    assert event["details"]["signature"].startswith(SIGNATURE)
    assert event["details"]["size"] == len(data)  # the original bytes were scanned
    assert event["patient_id"] == user_id(world.app, PATIENT)
    assert "Quagmire" not in event["raw"]
    assert "Quagmire" not in caplog.text


def test_a_clean_photo_is_scanned_as_uploaded_then_stored_re_encoded(
    world: World, clamd: Clamd
) -> None:
    original = gps_jpeg()
    scan_with(world.app, str(clamd.socket_path))
    assert start(world, f"{NAME}.jpg", original).status_code == 302
    (event,) = scan_events(world.app)
    assert event["details"] == {"verdict": "clean", "size": len(original)}
    attachment_id, _, size = newest_attachment(world.app)
    assert event["target_id"] == attachment_id
    assert size != len(original)  # what is stored is the re-encoded copy


def test_staff_outside_the_team_get_404_on_the_inline_route_audited(world: World) -> None:
    assert start(world, f"{NAME}.jpg", gps_jpeg()).status_code == 302
    url = inline_url(world, newest_conversation(world.app))
    denied_before = len(events_of(world.app, Action.ACCESS_DENIED))
    for outsider in (world.olive, world.ada):  # olive: Records; ada: Clinic, not Front desk
        response = outsider.get(url)
        assert response.status_code == 404
        assert not response.headers["Content-Type"].startswith("image/")
        assert "Quagmire" not in response.get_data(as_text=True)
    assert len(events_of(world.app, Action.ACCESS_DENIED)) == denied_before + 2
    assert world.sam.get(url).status_code == 200


def test_a_photo_from_the_team_is_shown_inline_to_its_patient_only(world: World) -> None:
    conversation = world.conversation
    page = thread_url(conversation)
    fields = {
        "csrf_token": world.sam.token(page),
        "body": "Here is the photo of the Xylophonoma dressing.",
        "attachments": (io.BytesIO(gps_jpeg()), f"{NAME}.jpg"),
    }
    answered = world.sam.client.post(
        f"{page}/answer", data=fields, content_type="multipart/form-data"
    )
    assert answered.status_code == 302
    with world.app.app_context():
        message_id = db.session.scalar(select(Message.public_id).order_by(Message.id.desc()))
    shown = world.patient.get(f"/messages/{message_id}")
    assert shown.status_code == 200
    (url,) = _PATIENT_IMG.findall(shown.get_data(as_text=True))
    assert f'<img src="{url}" alt="{NAME}.jpg" loading="lazy">' in shown.get_data(as_text=True)
    assert_served_clean(world.patient.get(url), "image/jpeg")
    mine = world.patient.get(f"/conversations/{conversation}").get_data(as_text=True)
    assert url in mine  # the conversation page shows it inline too
    assert world.other_patient.get(url).status_code == 404
