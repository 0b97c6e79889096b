"""The PHI guard: the last check before a notice leaves, independent of the templates.

:func:`phi_terms` unseals what must never appear in a notice (names, date of
birth, the message's subject, body words and file names) and :func:`find_phi`
looks for any of it in the rendered email. A hit stops the notice. The terms
are PHI themselves: never log them, never put them in an exception.
"""

from __future__ import annotations

import calendar
import html
import re
from collections.abc import Iterable
from datetime import date
from pathlib import Path

from flask import has_app_context
from sqlalchemy import select
from sqlalchemy.orm import Session

from notifier.render import PARTS, template_dir
from portal.config import current_settings
from portal.models import Attachment, Message, Notification, PatientProfile, Role, User
from portal.services import keys

MIN_NAME_TOKEN = 3  # name parts shorter than this ("Li", "Jo") are only matched in the full name
MIN_SUBJECT_WORD = 4
MIN_BODY_WORD = 5

_WORD = re.compile(r"[^\W_]+")
_STOPWORD_TEXT = """
about above after again against also been before being below between both cannot could
dear does doing down during each from further have having hello here hers herself himself
into itself just more most once only other ought ours ourselves over please regards same
should some such than thank thanks that their theirs them themselves then there these they
this those through today under until very were what when where which while whom will with
would your yours yourself yourselves because tomorrow yesterday kind best wishes sincerely
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_CALENDAR_WORDS = frozenset(
    w.lower()
    for w in (*calendar.month_name, *calendar.month_abbr, *calendar.day_name, *calendar.day_abbr)
    if w
)


def words(text: str) -> list[str]:
    """Return the words (letters and digits) of ``text``, in order."""
    return _WORD.findall(text)


def template_vocabulary(kind: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """Return the lower-cased words a notice of ``kind`` may contain without leaking anything.

    That is every word of its templates, of ``extra`` (the organisation's
    name, address, contact) and the month and day names dates are written with.
    """
    found: set[str] = set(_CALENDAR_WORDS)
    folder = template_dir(kind)
    for name in PARTS:
        found.update(w.lower() for w in words((folder / name).read_text("utf-8")))
    for text in extra:
        found.update(w.lower() for w in words(text))
    return frozenset(found)


def _config_texts() -> list[str]:
    if not has_app_context():
        return []
    settings = current_settings()  # the words a notice may carry from settings
    return [
        settings.org_name,
        settings.org_address,
        settings.support_contact,
        settings.mail_from,
        settings.base_url,
    ]


def name_terms(name: str) -> set[str]:
    """Return a person's whole name and each part of at least MIN_NAME_TOKEN characters."""
    return {name, *(w for w in words(name) if len(w) >= MIN_NAME_TOKEN)}


def dob_terms(iso: str) -> set[str]:
    """Return a date of birth (ISO ``1984-03-07``) in the formats people write it."""
    d = date.fromisoformat(iso)
    month, abbr = calendar.month_name[d.month], calendar.month_abbr[d.month]
    return {
        iso,
        f"{d:%d/%m/%Y}",
        f"{d:%m/%d/%Y}",
        f"{d.day}/{d.month}/{d.year}",
        f"{d.month}/{d.day}/{d.year}",
        f"{d:%d.%m.%Y}",
        f"{d:%d-%m-%Y}",
        f"{d.day} {month} {d.year}",
        f"{d.day} {abbr} {d.year}",
        f"{month} {d.day}, {d.year}",
        f"{month} {d.day} {d.year}",
    }


def subject_terms(subject: str) -> set[str]:
    """Return the whole subject and its words of 4+ characters that are not stopwords."""
    found = {w for w in words(subject) if len(w) >= MIN_SUBJECT_WORD and w.lower() not in STOPWORDS}
    return {subject.strip(), *found}


def body_terms(body: str) -> set[str]:
    """Return the body's words of 5+ characters that are not stopwords."""
    return {w for w in words(body) if len(w) >= MIN_BODY_WORD and w.lower() not in STOPWORDS}


def filename_terms(filename: str) -> set[str]:
    """Return a file name whole and without its extension."""
    return {filename, Path(filename).stem}


def _person(session: Session, user: User) -> set[str]:
    key = keys.unwrap(session, user.data_key_id)
    found = name_terms(keys.open_text(key, "users", "name", user.public_id, user.name_sealed))
    profile = session.get(PatientProfile, user.id) if user.role == Role.PATIENT else None
    if profile is not None and profile.dob_sealed is not None:
        iso = keys.open_text(key, "patient_profiles", "dob", user.public_id, profile.dob_sealed)
        found |= dob_terms(iso)
    return found


def _message(session: Session, message: Message) -> set[str]:
    key = keys.unwrap(session, message.data_key_id)
    pid = message.public_id
    found = subject_terms(keys.open_text(key, "messages", "subject", pid, message.subject_sealed))
    found |= body_terms(keys.open_text(key, "messages", "body", pid, message.body_sealed))
    attachments = session.scalars(select(Attachment).where(Attachment.message_id == message.id))
    for item in attachments:
        found |= filename_terms(
            keys.open_text(key, "attachments", "filename", item.public_id, item.filename_sealed)
        )
    for party_id in (message.sender_id, message.recipient_id):
        party = session.get(User, party_id)
        if party is not None and party.role == Role.PATIENT:
            found |= _person(session, party)
    return found


def phi_terms(session: Session, notification: Notification) -> set[str]:
    """Return the PHI that must not appear in ``notification``'s email. NEVER log it.

    The recipient's name (and date of birth for a patient); for a notice tied
    to a message also its subject, body words, attachment names and the
    patient party's name and date of birth (for a reply: the patient who
    wrote it). Single words the template itself uses are left out, so a
    patient called "Portal" cannot block every notice. Raises
    ContentDestroyed, KeyUnavailable or ContentTampered when a key or value
    cannot be opened.
    """
    found: set[str] = set()
    recipient = session.get(User, notification.recipient_id)
    if recipient is not None:
        found |= _person(session, recipient)
    message = session.get(Message, notification.message_id) if notification.message_id else None
    if message is not None:
        found |= _message(session, message)
    allowed = template_vocabulary(notification.kind, _config_texts())
    return {t for t in found if t.strip() and not _harmless(t, allowed)}


def _harmless(term: str, allowed: frozenset[str]) -> bool:
    """A term made only of words the notice legitimately contains reveals nothing."""
    parts = words(term)
    return bool(parts) and all(p.lower() in allowed for p in parts)


def _pattern(terms: set[str]) -> re.Pattern[str]:
    alternatives = sorted(
        (r"\s+".join(map(re.escape, t.split())) for t in terms), key=len, reverse=True
    )
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def find_phi(texts: list[str], terms: set[str]) -> bool:
    """Return True when any of ``terms`` occurs in any of ``texts`` as a whole word or phrase.

    Case-insensitive; whitespace inside a term matches any run of whitespace
    (a wrapped line); HTML entities are decoded before matching. Raises nothing.
    """
    usable = {t for t in terms if t.strip()}
    if not usable:
        return False
    pattern = _pattern(usable)
    for text in texts:
        candidates = (text, html.unescape(text)) if "&" in text else (text,)
        if any(pattern.search(candidate) for candidate in candidates):
            return True
    return False
