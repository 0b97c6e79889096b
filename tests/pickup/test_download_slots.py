"""Issue 13 item 2: a worker streams at most DOWNLOAD_SLOTS downloads at once; one more is
refused at once (503, Retry-After) instead of waiting for a thread, and every way a download
ends gives its slot back. The real server under slow clients: tests/serving/."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from portal.crypto.stream import HEADER_SIZE
from portal.extensions import db
from portal.models import Message
from portal.services import content
from portal.web.downloads import BUSY, RETRY_AFTER_SECONDS, DownloadSlots, slots_of
from tests.browser_client import Browser
from tests.factories import MINIMAL_PDF, PHI_STRINGS, SUBJECT
from tests.support.pickup import (
    PATIENT_EMAIL,
    SentMessage,
    enrolled_patient,
    events,
    send,
    signed_in,
)

THREADS = 4  # DOWNLOAD_SLOTS defaults to threads minus 4, at least 1: one slot here


@pytest.fixture
def app(make_app: Any) -> Flask:
    """The portal with one download slot (and the threads it is sized for)."""
    return make_app(WEB_THREADS=THREADS)


@pytest.fixture
def reader(app: Flask, staff: Any) -> tuple[Browser, SentMessage, str]:
    """The recipient signed in, a message with one PDF, and the PDF's download path."""
    _, secret = enrolled_patient(app)
    sent = send(app)
    with app.app_context():
        message = db.session.scalar(select(Message).where(Message.public_id == sent.public_id))
        assert message is not None
        attachment = message.attachments[0].public_id
    path = f"/messages/{sent.public_id}/attachments/{attachment}/download"
    return signed_in(app, PATIENT_EMAIL, secret), sent, path


def test_the_default_is_threads_minus_four_at_least_one(app: Flask, make_app: Any) -> None:
    assert slots_of(app).count == 1
    assert slots_of(make_app(WEB_THREADS=16)).count == 12
    assert slots_of(make_app(WEB_THREADS=16, DOWNLOAD_SLOTS=14)).count == 14


def test_a_download_over_the_limit_is_refused_at_once_and_audits_nothing(
    app: Flask, reader: tuple[Browser, SentMessage, str]
) -> None:
    browser, _, path = reader
    held = browser.client.get(path, buffered=False)  # streaming: its body not yet read
    assert held.status_code == 200
    assert slots_of(app).busy == 1
    refused = browser.get(path)
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert refused.headers["Cache-Control"] == "no-store"
    page = refused.get_data(as_text=True)
    assert BUSY.split(",")[0] in page
    assert b"%PDF" not in refused.data
    assert not [s for s in (*PHI_STRINGS, SUBJECT) if s in page]
    assert len(events(app, "attachment.download")) == 1  # the held one only
    assert b"".join(held.response) == MINIMAL_PDF
    held.close()
    assert slots_of(app).busy == 0
    again = browser.get(path)
    assert (again.status_code, again.data) == (200, MINIMAL_PDF)
    again.close()  # as the server does once the body is sent
    assert slots_of(app).busy == 0


def test_the_inline_view_shares_the_slots(
    app: Flask, reader: tuple[Browser, SentMessage, str]
) -> None:
    browser, _, path = reader
    view = path.removesuffix("/download") + "/view"
    held = browser.client.get(view, buffered=False)
    assert held.status_code == 200
    assert browser.get(path).status_code == 503
    held.close()
    assert browser.get(view).status_code == 200


def test_pages_need_no_slot(app: Flask, reader: tuple[Browser, SentMessage, str]) -> None:
    browser, sent, path = reader
    held = browser.client.get(path, buffered=False)
    for page in ("/inbox", f"/messages/{sent.public_id}", "/healthz", "/readyz"):
        assert browser.get(page).status_code == 200, page
    held.close()


def test_a_head_request_gives_its_slot_back(
    app: Flask, reader: tuple[Browser, SentMessage, str]
) -> None:
    browser, _, path = reader
    assert browser.client.head(path).status_code == 200
    assert slots_of(app).busy == 0


def test_a_denied_download_takes_no_slot(
    app: Flask, reader: tuple[Browser, SentMessage, str]
) -> None:
    browser, sent, _ = reader
    held = browser.client.get(
        f"/messages/{sent.public_id}/attachments/not-an-attachment/download", buffered=False
    )
    assert held.status_code == 404
    assert slots_of(app).busy == 0
    held.close()


def test_a_tampered_download_gives_its_slot_back(
    app: Flask, reader: tuple[Browser, SentMessage, str]
) -> None:
    browser, sent, path = reader
    with app.app_context():
        message = db.session.scalar(select(Message).where(Message.public_id == sent.public_id))
        assert message is not None
        blob_id = message.attachments[0].blob_id
        blob = Path(content.blob_store().root) / blob_id[:2] / blob_id
    data = bytearray(blob.read_bytes())
    data[HEADER_SIZE + 3] ^= 0x01  # the first segment: refused before the response began
    blob.write_bytes(bytes(data))
    assert browser.get(path).status_code == 500
    assert slots_of(app).busy == 0


def test_a_body_dropped_unclosed_gives_its_slot_back(
    app: Flask, reader: tuple[Browser, SentMessage, str]
) -> None:
    browser, _, path = reader
    held = browser.client.get(path, buffered=False)
    assert slots_of(app).busy == 1
    held.response = []  # an error page replacing the body after the view, as set_data does
    del held
    gc.collect()
    assert slots_of(app).busy == 0


def test_slots_never_go_below_zero() -> None:
    slots = DownloadSlots(2)
    assert [slots.try_take() for _ in range(3)] == [True, True, False]
    slots.give_back()
    slots.give_back()
    with pytest.raises(RuntimeError):
        slots.give_back()
    assert slots.busy == 0


def test_each_app_has_its_own_slots(make_app: Any) -> None:
    first, second = make_app(WEB_THREADS=THREADS), make_app(WEB_THREADS=THREADS)
    assert slots_of(first) is not slots_of(second)
