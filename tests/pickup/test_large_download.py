"""A 200 MiB record streams through the portal byte for byte, in constant memory."""

from __future__ import annotations

import gc
import hashlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
from flask import Flask

from portal.database import utcnow
from portal.extensions import db
from portal.services import accounts, messages
from tests.factories import BODY, SUBJECT
from tests.support.pickup import PATIENT_EMAIL, STAFF_EMAIL, chain_ok, enrolled_patient, events
from tests.support.pickup import signed_in as sign_in

MIB = 1024 * 1024
SIZE_MIB = 200
RSS_LIMIT = 64 * MIB


def write_record(path: Path) -> str:
    """Write a 200 MiB PDF-ish file (a PDF header, then distinct 1 MiB blocks); return SHA-256."""
    digest = hashlib.sha256()
    block = bytes(range(256)) * (MIB // 256)
    with path.open("wb") as out:
        for index in range(SIZE_MIB):
            prefix = b"%PDF-1.4\n" if index == 0 else index.to_bytes(8, "big")
            chunk = prefix + block[len(prefix) :]
            out.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def store(app: Flask, path: Path) -> tuple[str, str]:
    """Store the file as an attachment (no PDF validation: it is not a real PDF)."""
    with app.app_context():
        sender = accounts.find_by_email(db.session, STAFF_EMAIL)
        recipient = accounts.find_by_email(db.session, PATIENT_EMAIL)
        assert sender is not None
        assert recipient is not None
        with path.open("rb") as stream:
            message = messages.create(
                db.session,
                sender=sender,
                recipient=recipient,
                subject=SUBJECT,
                body=BODY,
                expires_at=utcnow() + timedelta(days=7),
                uploads=[messages.Upload("record.pdf", stream)],
                validate=None,
            )
        db.session.commit()
        return message.public_id, message.attachments[0].public_id


def test_200_mib_download_is_byte_identical_in_flat_memory(
    app: Flask, staff: Any, tmp_path: Path
) -> None:
    _, secret = enrolled_patient(app)
    source = tmp_path / "record.pdf"
    expected = write_record(source)
    message_id, attachment_id = store(app, source)
    source.unlink()
    browser = sign_in(app, PATIENT_EMAIL, secret)
    url = f"/messages/{message_id}/attachments/{attachment_id}/download"
    process = psutil.Process()
    gc.collect()
    baseline = peak = process.memory_info().rss
    response = browser.client.get(url, buffered=False)
    assert response.headers["Content-Length"] == str(SIZE_MIB * MIB)
    digest, received = hashlib.sha256(), 0
    for index, chunk in enumerate(response.response):
        digest.update(chunk)
        received += len(chunk)
        if index % 8 == 0:
            peak = max(peak, process.memory_info().rss)
    response.close()
    assert received == SIZE_MIB * MIB
    assert digest.hexdigest() == expected
    assert peak - baseline < RSS_LIMIT, f"RSS grew {(peak - baseline) / MIB:.1f} MiB"
    assert len(events(app, "attachment.download")) == 1
    assert chain_ok(app)
