"""The PHI guard: the last check before a notice leaves, independent of the templates.

:func:`phi_terms` unseals what must never appear in a notice (names, date of
birth, the message's subject, body words and file names) and :func:`find_phi`
looks for any of it in the rendered email. A hit stops the notice. The terms
are PHI themselves: never log them, never put them in an exception.

It runs once per notice, so it reads each notice's people and message in two
queries (none when the notifier's batch was read first by :func:`prefetch`), and
remembers each person's terms for the session (the notifier's pass) keyed by
everything they are computed from: the sealed name and date of birth and the
wrapped data key. A renamed patient or a rewrapped or destroyed key is a
different key, so a remembered entry is never stale. Template vocabularies are
remembered per template file version.
"""

from __future__ import annotations

import calendar
import functools
import html
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

from flask import has_app_context
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from notifier.render import PARTS, template_dir
from portal.config import current_settings
from portal.models import Attachment, DataKey, Message, Notification, PatientProfile, Role, User
from portal.services import keys

MIN_NAME_TOKEN = 3  # name parts shorter than this ("Li", "Jo") are only matched in the full name
MIN_SUBJECT_WORD = 4
MIN_BODY_WORD = 5
PERSON_MEMO_SIZE = 4096  # people whose terms a session remembers; then it starts afresh
_PERSON_MEMO = "phi_person_terms"  # Session.info key: kept across commits, gone with the session

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
    Remembered per version of the template files (an edited template is read
    again). Raises OSError (FileNotFoundError for a broken install) when a
    template cannot be read.
    """
    folder = template_dir(kind)
    versions = tuple(_file_version(folder / name) for name in PARTS)
    return _vocabulary(str(folder), versions, tuple(extra))


def _file_version(path: Path) -> tuple[int, int, int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size


@functools.lru_cache(maxsize=64)
def _vocabulary(
    folder: str, _versions: tuple[tuple[int, int, int, int], ...], extra: tuple[str, ...]
) -> frozenset[str]:
    found: set[str] = set(_CALENDAR_WORDS)
    for name in PARTS:
        found.update(w.lower() for w in words(Path(folder, name).read_text("utf-8")))
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


@dataclass(frozen=True)
class _Person:
    """What a person's terms are computed from, as read now: their sealed name and date of
    birth (a patient's only), and the data key row both are sealed under."""

    user_id: int
    public_id: str
    role: str
    name_sealed: bytes
    dob_sealed: bytes | None
    key: DataKey

    def memo_key(self) -> tuple[Any, ...]:
        """Everything the terms depend on: equal keys give equal terms."""
        key = self.key
        return (
            self.user_id,
            self.public_id,
            key.id,
            key.kek_version,
            key.wrapped,
            self.name_sealed,
            self.dob_sealed,
        )


def _people(session: Session, user_ids: set[int]) -> dict[int, _Person]:
    """Read ``user_ids`` with their date of birth and data key in one query."""
    rows = session.execute(
        select(
            User.id, User.public_id, User.role, User.name_sealed, PatientProfile.dob_sealed, DataKey
        )
        .join(DataKey, DataKey.id == User.data_key_id)
        .outerjoin(PatientProfile, PatientProfile.user_id == User.id)
        .where(User.id.in_(user_ids))
        .execution_options(populate_existing=True)  # the key row as it is now, not a cached one
    )
    return {
        uid: _Person(uid, pid, role, name, dob if role == Role.PATIENT else None, key)
        for uid, pid, role, name, dob, key in rows
    }


def _person_terms(session: Session, person: _Person) -> frozenset[str]:
    """The person's name terms (and date of birth terms), remembered for the session."""
    if person.key.wrapped is None:  # shredded: unwrap raises ContentDestroyed
        keys.unwrap(session, person.key.id)
    memo: dict[tuple[Any, ...], frozenset[str]] = session.info.setdefault(_PERSON_MEMO, {})
    memo_key = person.memo_key()
    found = memo.get(memo_key)
    if found is None:
        if len(memo) >= PERSON_MEMO_SIZE:
            memo.clear()
        found = memo[memo_key] = frozenset(_open_person(session, person))
    return found


def _open_person(session: Session, person: _Person) -> set[str]:
    key = keys.unwrap(session, person.key.id)  # the row just read: no query of its own
    pid = person.public_id
    found = name_terms(keys.open_text(key, "users", "name", pid, person.name_sealed))
    if person.dob_sealed is not None:
        found |= dob_terms(keys.open_text(key, "patient_profiles", "dob", pid, person.dob_sealed))
    return found


@dataclass(frozen=True)
class _SealedMessage:
    """A message's sealed subject, body and file names, its parties, and its data key row."""

    public_id: str
    subject_sealed: bytes
    body_sealed: bytes
    party_ids: tuple[int, int]  # sender, recipient
    key: DataKey
    attachments: tuple[tuple[str, bytes], ...]  # (public id, sealed file name)


def _sealed_messages(session: Session, message_ids: set[int]) -> dict[int, _SealedMessage]:
    """Read the messages, their data keys and their attachments' names in one query."""
    rows = session.execute(
        select(
            Message.id,
            Message.public_id,
            Message.subject_sealed,
            Message.body_sealed,
            Message.sender_id,
            Message.recipient_id,
            DataKey,
            Attachment.public_id.label("attachment_id"),
            Attachment.filename_sealed,
        )
        .join(DataKey, DataKey.id == Message.data_key_id)
        .outerjoin(Attachment, Attachment.message_id == Message.id)
        .where(Message.id.in_(message_ids))
        .order_by(Message.id, Attachment.id)
        .execution_options(populate_existing=True)
    ).all()
    found: dict[int, _SealedMessage] = {}
    for mid, pid, subject, body, sender_id, recipient_id, key, attachment_id, name in rows:
        known = found.get(mid) or _SealedMessage(
            pid, subject, body, (sender_id, recipient_id), key, ()
        )
        if attachment_id is not None:
            known = replace(known, attachments=(*known.attachments, (attachment_id, name)))
        found[mid] = known
    return found


def prefetch(session: Session, notifications: Iterable[Notification]) -> None:
    """Read what :func:`phi_terms` needs for all of ``notifications`` in two queries, kept
    for the transaction (the notifier's batch): its calls then make none. Returns None;
    raises only database errors."""
    rows = list(notifications)
    messages = _sealed_messages(session, {n.message_id for n in rows if n.message_id})
    parties = {party for message in messages.values() for party in message.party_ids}
    people = _people(session, {n.recipient_id for n in rows} | parties)
    session.info[_PREFETCHED] = (messages, people)


# Session.info key: prefetch's reads, for this transaction only (gone at commit or rollback,
# so a later transaction reads names, keys and messages as they are then).
_PREFETCHED = "phi_prefetched"


@event.listens_for(Session, "after_commit")
@event.listens_for(Session, "after_soft_rollback")
def _forget_prefetched(session: Session, *_args: object) -> None:
    session.info.pop(_PREFETCHED, None)


def _read(
    session: Session, notification: Notification
) -> tuple[_SealedMessage | None, dict[int, _Person]]:
    """The notice's message (None without one) and people: prefetched, or read now."""
    messages, people = session.info.get(_PREFETCHED, ({}, {}))
    message_id = notification.message_id
    if message_id is not None and message_id not in messages:
        messages = _sealed_messages(session, {message_id})
    message = messages.get(message_id) if message_id is not None else None
    wanted = {notification.recipient_id, *(message.party_ids if message else ())}
    if not wanted <= people.keys():
        people = _people(session, wanted)
    return message, people


def _message_terms(session: Session, message: _SealedMessage) -> set[str]:
    key = keys.unwrap(session, message.key.id)  # the row just read: no query of its own
    pid = message.public_id
    found = subject_terms(keys.open_text(key, "messages", "subject", pid, message.subject_sealed))
    found |= body_terms(keys.open_text(key, "messages", "body", pid, message.body_sealed))
    for attachment_id, sealed in message.attachments:
        found |= filename_terms(
            keys.open_text(key, "attachments", "filename", attachment_id, sealed)
        )
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
    message, people = _read(session, notification)
    parties = message.party_ids if message is not None else ()
    recipient = people.get(notification.recipient_id)
    if recipient is not None:
        found |= _person_terms(session, recipient)
    if message is not None:
        found |= _message_terms(session, message)
        for party_id in parties:
            party = people.get(party_id)
            if party is not None and party.role == Role.PATIENT:
                found |= _person_terms(session, party)
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
