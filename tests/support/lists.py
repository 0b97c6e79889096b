"""List-page helpers: many messages made quickly through the real services, the page links a
test follows, and a counting spy on the keyring and the sealed-field opener."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from portal.crypto.keyring import Keyring
from portal.database import utcnow
from portal.extensions import db
from portal.models import User
from portal.services import keys, messages
from tests.factories import PATIENT_DOB, make_user
from tests.support.statements import Statements
from tests.support.teams import file_in_team

_PAGE_LINK = re.compile(r'href="([^"]*[?&](?:[a-z_]*)(?:after|before)=[^"]*)"')
_INBOX_LINK = re.compile(r'href="/messages/([0-9a-f]{32})"')


def fill_inbox(
    app: Flask, patient_email: str, count: int, sender_emails: list[str], subject: str = "Letter"
) -> list[str]:
    """Store ``count`` messages to the patient from the senders in turn; their public ids,
    oldest first (see :func:`store_messages`)."""
    return store_messages(app, sender_emails, [patient_email], count, subject)


def store_messages(
    app: Flask,
    sender_emails: list[str],
    recipient_emails: list[str],
    count: int,
    subject: str = "Letter",
) -> list[str]:
    """Store ``count`` messages (no attachments) through the messages service, senders and
    recipients each in turn, each in a conversation of its sender's care team (when they
    have one); return their public ids, oldest first. Subjects are ``subject N``."""
    with app.app_context():
        people = {
            u.email: u
            for u in db.session.scalars(
                select(User).where(User.email.in_([*sender_emails, *recipient_emails]))
            )
        }
        senders = [people[e] for e in sender_emails]
        recipients = [people[e] for e in recipient_emails]
        made = []
        for n in range(count):
            message = messages.create(
                db.session,
                sender=senders[n % len(senders)],
                recipient=recipients[n % len(recipients)],
                subject=f"{subject} {n}",
                body=f"Body of {subject} {n}.",
                expires_at=utcnow() + timedelta(days=7),
            )
            file_in_team(db.session, message, senders[n % len(senders)])
            made.append(message.public_id)
        db.session.commit()
        return made


def add_people(app: Flask, role: str, emails: list[str]) -> list[str]:
    """Create an account of ``role`` for each address (no sign-in); return the addresses."""
    with app.app_context():
        for n, email in enumerate(emails):
            name = f"{role.title()} Number {n}"
            extra = {"dob": PATIENT_DOB} if role == "patient" else {}
            make_user(db.session, role, email, name, **extra)
        db.session.commit()
    return emails


def page_links(html: str) -> list[str]:
    """The hrefs of a page's pager links (those with an ``after`` or ``before`` cursor)."""
    return [link.replace("&amp;", "&") for link in _PAGE_LINK.findall(html)]


def link_named(html: str, rel: str) -> str | None:
    """The href of the pager link with ``rel`` ("next" or "prev"), or None."""
    found = re.search(rf'<a rel="{rel}" href="([^"]+)"', html)
    return found.group(1).replace("&amp;", "&") if found else None


def listed_messages(html: str) -> list[str]:
    """The public ids of the messages an inbox page links to, in page order."""
    return _INBOX_LINK.findall(html)


def without_sessions(seen: Statements) -> list[str]:
    """The statements other than the server-side session's own (its row is touched at most
    every 30 s, whatever the page)."""
    return [s for s in seen.sql if "web_sessions" not in s]


@dataclass
class CryptoCalls:
    """Unwraps of data keys (by wrapped value) and sealed fields opened (by table.column)."""

    unwrapped: Counter[bytes] = field(default_factory=Counter)
    opened: Counter[str] = field(default_factory=Counter)
    keyring_loads: int = 0
    keyring_stats: int = 0


def _aad_parts(aad: bytes) -> list[bytes]:
    """The parts of a field AAD (portal.crypto.fields: 4-byte length, then the bytes)."""
    parts, at = [], 0
    while at < len(aad):
        size = int.from_bytes(aad[at : at + 4], "big")
        parts.append(aad[at + 4 : at + 4 + size])
        at += 4 + size
    return parts


@contextmanager
def crypto_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[CryptoCalls]:
    """Count what the real crypto does (each call goes through to the real function)."""
    calls = CryptoCalls()
    real_unwrap, real_open = Keyring.unwrap, keys.open_sealed
    real_load, real_identity = vars(Keyring)["load"].__func__, keys.file_identity

    def unwrap(self: Keyring, version: int, wrapped: bytes, aad: bytes) -> bytes:
        calls.unwrapped[wrapped] += 1
        return real_unwrap(self, version, wrapped, aad)

    def open_sealed(key: bytes, token: bytes, aad: bytes) -> bytes:
        _label, table, column, _row = _aad_parts(aad)
        calls.opened[f"{table.decode()}.{column.decode()}"] += 1
        return real_open(key, token, aad)

    def load(cls: type[Keyring], path: Any) -> Keyring:
        calls.keyring_loads += 1
        return real_load(cls, path)

    def file_identity(path: Any) -> Any:
        calls.keyring_stats += 1
        return real_identity(path)

    monkeypatch.setattr(Keyring, "unwrap", unwrap)
    monkeypatch.setattr(keys, "open_sealed", open_sealed)
    monkeypatch.setattr(Keyring, "load", classmethod(load))
    monkeypatch.setattr(keys, "file_identity", file_identity)
    yield calls
