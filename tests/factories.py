"""Test data built through the real services (no hand-made rows)."""

from __future__ import annotations

import io
from datetime import date, timedelta
from typing import Any

from sqlalchemy.orm import Session

from portal.audit import NO_REQUEST, SYSTEM
from portal.database import utcnow
from portal.models import Message, User
from portal.services import accounts, messages
from tests.support.teams import TEST_TEAM, put_in_team

# Recognisable PHI: tests search every output for these strings.
PATIENT_NAME = "Zebulon Quagmire-Phiseed"
PATIENT_DOB = date(1961, 7, 23)
SUBJECT = "Biopsy result Xylophonoma"
BODY = "Your Xylophonoma biopsy shows Quasirandomitis; please call Dr Phiseedwell."
FILENAME = "Quagmire_Xylophonoma_pathology.pdf"
PHI_STRINGS = (
    PATIENT_NAME,
    "Quagmire",
    "Phiseed",
    "1961-07-23",
    "Xylophonoma",
    "Quasirandomitis",
    "Phiseedwell",
    FILENAME,
)

MINIMAL_PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]>>endobj\n"
    b"xref\n0 4\n0000000000 65535 f \n0000000009 00000 n \n0000000052 00000 n \n"
    b"0000000101 00000 n \ntrailer<</Size 4/Root 1 0 R>>\nstartxref\n164\n%%EOF\n"
)


def make_user(
    session: Session,
    role: str = "staff",
    email: str | None = None,
    name: str = "Sam Staffer",
    team: str | None = TEST_TEAM,
    **kwargs: Any,
) -> User:
    """Create a user through the accounts service (flushed); staff join the care team
    ``team`` (None: no team)."""
    address = email or f"{role}-{utcnow().timestamp()}@example.org".replace(".", "-", 1)
    user = accounts.create_user(
        session, role=role, email=address, name=name, actor=SYSTEM, meta=NO_REQUEST, **kwargs
    ).user
    if role == "staff" and team is not None:
        put_in_team(session, user, team)
    return user


def make_patient(session: Session, email: str = "zq@example.org", **kwargs: Any) -> User:
    """Create the recognisable-PHI patient."""
    kwargs.setdefault("dob", PATIENT_DOB)
    return make_user(session, "patient", email, PATIENT_NAME, **kwargs)


def make_message(
    session: Session,
    sender: User,
    recipient: User,
    files: list[tuple[str, bytes]] | None = None,
    **kwargs: Any,
) -> Message:
    """Store a message with the recognisable PHI through the messages service (flushed)."""
    uploads = [
        messages.Upload(name, io.BytesIO(data))
        for name, data in (files if files is not None else [(FILENAME, MINIMAL_PDF)])
    ]
    kwargs.setdefault("subject", SUBJECT)
    kwargs.setdefault("body", BODY)
    kwargs.setdefault("expires_at", utcnow() + timedelta(days=7))
    return messages.create(session, sender=sender, recipient=recipient, uploads=uploads, **kwargs)
