"""Issue 10 item 15: tampered ciphertext gets a handled page, an audit event and an alert.

An attacker with write access to the blob folder or the database flips a byte.
The patient sees a fixed error page (no stack trace, no PHI), the trail gets a
committed ``content.tampered`` event although the request fails, and the log
gets a CRITICAL line carrying ids only.
"""

from __future__ import annotations

import io
import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from portal.crypto.errors import ContentTampered
from portal.crypto.stream import HEADER_SIZE, SEGMENT_SIZE, TAG_SIZE
from portal.database import utcnow
from portal.extensions import db
from portal.models import Attachment, Message
from portal.services import accounts, content, messages
from portal.web.errors import TAMPERED_MESSAGE
from tests.browser_client import Browser
from tests.factories import BODY, MINIMAL_PDF, PHI_STRINGS, SUBJECT
from tests.support.pickup import (
    PATIENT_EMAIL,
    STAFF_EMAIL,
    SentMessage,
    chain_ok,
    enrolled_patient,
    events,
    send,
    signed_in,
)


@pytest.fixture
def reader(app: Flask, staff: Any) -> tuple[Browser, SentMessage]:
    """The recipient, signed in, and a message with one PDF attachment."""
    _, secret = enrolled_patient(app)
    sent = send(app)
    return signed_in(app, PATIENT_EMAIL, secret), sent


def attachment_of(app: Flask, public_id: str) -> Attachment:
    with app.app_context():
        message = db.session.scalar(select(Message).where(Message.public_id == public_id))
        assert message is not None
        return message.attachments[0]


def flip_blob_byte(app: Flask, blob_id: str, offset: int) -> None:
    """Flip one bit of the ciphertext file on disk, as someone with the blob folder could."""
    with app.app_context():
        path = Path(content.blob_store().root) / blob_id[:2] / blob_id
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def flip_sealed_body(app: Flask, public_id: str) -> None:
    """Flip one bit of the sealed body column, as someone with database access could."""
    with app.app_context():
        message = db.session.scalar(select(Message).where(Message.public_id == public_id))
        assert message is not None
        sealed = bytearray(message.body_sealed)
        sealed[-1] ^= 0x01
        message.body_sealed = bytes(sealed)
        db.session.commit()


def assert_alerted(caplog: pytest.LogCaptureFixture, stage: str) -> dict[str, Any]:
    """The CRITICAL line: present, ids only. Returns its extras."""
    alerts = [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR and getattr(r, "event", None) == "content_tampered"
    ]
    assert len(alerts) == 1
    assert alerts[0].levelno == logging.CRITICAL
    extras = {
        k: v
        for k, v in vars(alerts[0]).items()
        if k in {"stage", "target_type", "target_id", "message_id", "actor_id"}
    }
    assert extras["stage"] == stage
    logged = caplog.text + json.dumps(extras, default=str)
    assert not [s for s in PHI_STRINGS if s in logged]
    return extras


def assert_audited(app: Flask, target_type: str, stage: str) -> None:
    [event] = events(app, "content.tampered")
    assert event.outcome == "failure"
    assert event.target_type == target_type
    assert event.patient_id is not None
    assert event.message_id is not None
    assert json.loads(event.details) == {"severity": "high", "stage": stage}
    assert chain_ok(app)


def assert_handled_page(response: Any) -> None:
    assert response.status_code == 500
    page = response.get_data(as_text=True)
    assert TAMPERED_MESSAGE.split(",")[0] in page
    assert "Traceback" not in page
    assert b"%PDF" not in response.data
    assert not [s for s in (*PHI_STRINGS, SUBJECT) if s in page]


def test_tampered_sealed_body_is_a_handled_audited_error(
    app: Flask, reader: tuple[Browser, SentMessage], caplog: pytest.LogCaptureFixture
) -> None:
    browser, sent = reader
    flip_sealed_body(app, sent.public_id)
    caplog.set_level(logging.INFO)
    response = browser.get(f"/messages/{sent.public_id}")
    assert_handled_page(response)
    assert_audited(app, "message", "before_response")
    assert events(app, "message.view") == []  # the request's own work was rolled back
    assert assert_alerted(caplog, "before_response")["target_id"] == sent.public_id
    pdf = browser.get(f"/messages/{sent.public_id}/pdf")
    assert_handled_page(pdf)
    assert len(events(app, "content.tampered")) == 2


def test_tampered_first_segment_is_refused_before_the_response(
    app: Flask, reader: tuple[Browser, SentMessage], caplog: pytest.LogCaptureFixture
) -> None:
    browser, sent = reader
    attachment = attachment_of(app, sent.public_id)
    flip_blob_byte(app, attachment.blob_id, HEADER_SIZE + 3)
    caplog.set_level(logging.INFO)
    url = f"/messages/{sent.public_id}/attachments/{attachment.public_id}/download"
    assert_handled_page(browser.get(url))
    assert_audited(app, "attachment", "before_response")
    assert events(app, "attachment.download") == []
    extras = assert_alerted(caplog, "before_response")
    assert extras["target_id"] == attachment.public_id


def test_tampered_later_segment_aborts_the_stream_and_is_audited(
    app: Flask, staff: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _, secret = enrolled_patient(app)
    record = MINIMAL_PDF + bytes(range(256)) * (3 * SEGMENT_SIZE // 256)  # four segments
    with app.app_context():
        sender = accounts.find_by_email(db.session, STAFF_EMAIL)
        recipient = accounts.find_by_email(db.session, PATIENT_EMAIL)
        assert sender is not None
        assert recipient is not None
        message = messages.create(
            db.session,
            sender=sender,
            recipient=recipient,
            subject=SUBJECT,
            body=BODY,
            expires_at=utcnow() + timedelta(days=7),
            uploads=[messages.Upload("record.pdf", io.BytesIO(record))],
            validate=None,
        )
        db.session.commit()
        message_id, attachment = message.public_id, message.attachments[0]
    flip_blob_byte(app, attachment.blob_id, HEADER_SIZE + 2 * (SEGMENT_SIZE + TAG_SIZE) + 5)
    browser = signed_in(app, PATIENT_EMAIL, secret)
    caplog.set_level(logging.INFO)
    url = f"/messages/{message_id}/attachments/{attachment.public_id}/download"
    response = browser.client.get(url, buffered=False)
    assert response.status_code == 200  # the headers went out with the first segments
    received: list[bytes] = []
    with pytest.raises(ContentTampered):
        received.extend(response.response)  # keeps what arrived before the abort
    response.close()
    assert sum(map(len, received)) == 2 * SEGMENT_SIZE  # verified segments only, never all
    assert len(events(app, "attachment.download")) == 1
    assert_audited(app, "attachment", "mid_stream")
    assert assert_alerted(caplog, "mid_stream")["target_id"] == attachment.public_id


def test_tampered_subject_on_the_staff_status_page_names_the_message(
    app: Flask, staff: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Staff routes name the message ``public_id``: the event must still carry it."""
    _, staff_secret, _ = staff
    enrolled_patient(app)
    sent = send(app)
    with app.app_context():
        message = db.session.scalar(select(Message).where(Message.public_id == sent.public_id))
        assert message is not None
        sealed = bytearray(message.subject_sealed)
        sealed[-1] ^= 0x01
        message.subject_sealed = bytes(sealed)
        db.session.commit()
    caplog.set_level(logging.INFO)
    browser = signed_in(app, STAFF_EMAIL, staff_secret)
    assert_handled_page(browser.get(f"/staff/messages/{sent.public_id}"))
    assert_audited(app, "message", "before_response")
