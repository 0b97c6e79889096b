"""Upload-scanning test helpers: switch a test app's malware scanning on (a real clamd, or a
socket nobody listens on) and read what an upload left behind (scan events, blobs, parts)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from flask import Flask
from sqlalchemy import select

from portal.audit import Action
from portal.config import settings_of
from portal.extensions import db
from portal.models import AuditEvent
from portal.services import content
from portal.storage import FilesystemBlobStore


def scan_with(app: Flask, socket: str) -> None:
    """Scan ``app``'s uploads (``PORTAL_SCAN_UPLOADS=required``) with the clamd at ``socket``,
    from the next upload on (settings are read when an upload starts)."""
    settings = settings_of(app)
    app.extensions["settings"] = dataclasses.replace(
        settings, clamd_socket=socket, scan_uploads="required"
    )


def scan_events(app: Flask) -> list[dict[str, Any]]:
    """Every ``upload.scanned`` event, oldest first: outcome, ids and parsed details."""
    with app.app_context():
        events = db.session.scalars(
            select(AuditEvent)
            .where(AuditEvent.action == Action.UPLOAD_SCANNED.value)
            .order_by(AuditEvent.id)
        ).all()
        return [
            {
                "outcome": event.outcome,
                "target_id": event.target_id,
                "message_id": event.message_id,
                "patient_id": event.patient_id,
                "details": json.loads(event.details or "{}"),
                "raw": event.details or "",
            }
            for event in events
        ]


def stored_files(app: Flask) -> tuple[int, int]:
    """(blobs kept, temporary ``.part`` files left) in ``app``'s blob store."""
    with app.app_context():
        store = content.blob_store()
        assert isinstance(store, FilesystemBlobStore)
        parts = list(Path(store.root, "tmp").glob("*.part"))
        return len(list(store.iter_ids())), len(parts)
