"""Pickup helpers: the people, the recognisable-PHI message sent through the real service,
and the audit trail as a test reads it."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

from flask import Flask
from sqlalchemy import select
from werkzeug.test import TestResponse

from portal import audit
from portal.audit import NO_REQUEST
from portal.extensions import db
from portal.models import AuditEvent, User
from portal.services import accounts, messaging
from portal.services.messages import Upload
from tests.browser_client import Browser, current_code, enrolled_user
from tests.factories import BODY, FILENAME, MINIMAL_PDF, SUBJECT

PASSWORD = "Correct horse battery staple 42"
NEW_PASSWORD = "Lantern orchard velvet compass 77"
STAFF_EMAIL = "sam@example.org"
PATIENT_EMAIL = "zq@example.org"
_CSRF_VALUE = re.compile(r'(name="csrf_token"[^>]*value=")[^"]+(")')


@dataclass(frozen=True)
class SentMessage:
    """A message as a test knows it: its public id and the path of its pickup link."""

    public_id: str
    path: str

    @property
    def token(self) -> str:
        return self.path.rsplit("/", 1)[1]


def send(
    app: Flask, to: str = PATIENT_EMAIL, files: list[tuple[str, bytes]] | None = None, **kwargs: Any
) -> SentMessage:
    """Send the recognisable-PHI message from staff to ``to``; return its id and link path."""
    with app.app_context():
        sender = accounts.find_by_email(db.session, STAFF_EMAIL)
        recipient = accounts.find_by_email(db.session, to)
        assert sender is not None
        assert recipient is not None
        uploads = [
            Upload(name, io.BytesIO(data))
            for name, data in (files if files is not None else [(FILENAME, MINIMAL_PDF)])
        ]
        sent = messaging.send(
            db.session,
            sender=sender,
            recipient=recipient,
            subject=SUBJECT,
            body=kwargs.pop("body", BODY),
            uploads=uploads,
            meta=NO_REQUEST,
            **kwargs,
        )
        db.session.commit()
        return SentMessage(sent.message.public_id, "/" + sent.url.split("/", 3)[3])


def enrolled_patient(
    app: Flask, email: str = PATIENT_EMAIL, name: str = "Zebulon Quagmire-Phiseed"
) -> tuple[User, str]:
    """A returning patient with password and authenticator; returns (user, TOTP secret)."""
    user, secret, _ = enrolled_user(app, role="patient", email=email, name=name)
    return user, secret


def signed_in(app: Flask, email: str, secret: str) -> Browser:
    """A browser signed in as ``email`` with both factors."""
    browser = Browser(app)
    done = browser.sign_in(email, PASSWORD, code=current_code(secret))
    assert done.status_code == 302, done.get_data(as_text=True)[:300]
    return browser


def strip_csrf(response: TestResponse) -> str:
    """The page without its CSRF token value (the only part allowed to differ)."""
    return _CSRF_VALUE.sub(r"\1-\2", response.get_data(as_text=True))


def events(app: Flask, action: str | None = None) -> list[AuditEvent]:
    """The audit events (of ``action``), oldest first."""
    with app.app_context():
        stmt = select(AuditEvent).order_by(AuditEvent.seq)
        if action:
            stmt = stmt.where(AuditEvent.action == action)
        return list(db.session.scalars(stmt))


def chain_ok(app: Flask) -> bool:
    """Whether the audit chain verifies."""
    with app.app_context():
        return audit.verify(db.session).ok
