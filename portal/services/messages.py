"""Messages: store one encrypted (subject, body, attachments) and read it back.

``create`` is the content half of sending; services.messaging.send adds the
pickup link, the notice and the audit event in the same transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import IO

from sqlalchemy.orm import Session

from portal.models import Attachment, Message, User
from portal.models.types import new_public_id
from portal.services import content, keys
from portal.services.errors import ServiceError

MAX_SUBJECT = 200
MAX_BODY = 100_000
MAX_FILENAME = 255
BODY_FORMATS = ("text", "markdown")


@dataclass
class Upload:
    """A file to attach: its name as the sender gave it, and a readable (seekable) stream."""

    filename: str
    stream: IO[bytes]  # what Werkzeug's FileStorage.stream is typed as


@dataclass(frozen=True)
class Readable:
    """A message's unsealed subject, body and attachment names, for its recipient or sender."""

    subject: str
    body: str
    body_format: str
    filenames: dict[int, str]


def _check_text(subject: str, body: str, body_format: str) -> tuple[str, str]:
    subject = " ".join(subject.split())
    if not subject or len(subject) > MAX_SUBJECT:
        raise ServiceError(f"Enter a subject of 1 to {MAX_SUBJECT} characters.")
    if not body.strip() or len(body) > MAX_BODY:
        raise ServiceError(f"Enter a message of 1 to {MAX_BODY:,} characters.")
    if body_format not in BODY_FORMATS:
        raise ServiceError("Choose plain text or Markdown for the message.")
    return subject, body.replace("\r\n", "\n")


def create(
    session: Session,
    *,
    sender: User,
    recipient: User,
    subject: str,
    body: str,
    expires_at: datetime,
    body_format: str = "text",
    uploads: Iterable[Upload] = (),
    max_upload: int | None = None,
    validate: Callable[[Upload], None] | None = None,
    in_reply_to: Message | None = None,
) -> Message:
    """Store a message and its attachments encrypted under a new data key; return it (flushed).

    Raises ServiceError for an empty or oversize subject or body, and whatever
    ``validate`` raises for an upload; on any error the caller rolls back and
    the blobs already written are deleted with it.
    """
    subject, body = _check_text(subject, body, body_format)
    key_row, key = keys.create(session, "message")
    public_id = new_public_id()
    message = Message(
        public_id=public_id,
        sender_id=sender.id,
        recipient_id=recipient.id,
        data_key_id=key_row.id,
        body_format=body_format,
        expires_at=expires_at,
        in_reply_to_id=in_reply_to.id if in_reply_to else None,
        subject_sealed=keys.seal_text(key, "messages", "subject", public_id, subject),
        body_sealed=keys.seal_text(key, "messages", "body", public_id, body),
    )
    session.add(message)
    session.flush()
    for position, upload in enumerate(uploads):
        if validate:
            validate(upload)
        _attach(session, message, key, upload, position, max_upload)
    return message


def _attach(
    session: Session,
    message: Message,
    key: bytes,
    upload: Upload,
    position: int,
    max_upload: int | None,
) -> Attachment:
    name = safe_filename(upload.filename)
    public_id, digest = new_public_id(), content.Digest()
    try:
        blob_id = content.store_blob(
            session, key, public_id, content.measured(upload.stream, digest, max_upload)
        )
    except ValueError:
        raise ServiceError(f"{name} is larger than this portal accepts.") from None
    attachment = Attachment(
        public_id=public_id,
        message_id=message.id,
        position=position,
        blob_id=blob_id,
        size=digest.size,
        sha256=digest.sha256,
        filename_sealed=keys.seal_text(key, "attachments", "filename", public_id, name),
    )
    session.add(attachment)
    session.flush()
    return attachment


def safe_filename(raw: str) -> str:
    """Return a file name without paths or control characters, at most 255 characters."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable() and ch not in '"<>:|?*').strip(" .")
    return (name or "document.pdf")[:MAX_FILENAME]


def read(session: Session, message: Message) -> Readable:
    """Return ``message``'s unsealed subject, body and attachment names.

    Raises ContentDestroyed when the message was shredded, ContentTampered when
    a sealed value was altered or moved.
    """
    key = keys.unwrap(session, message.data_key_id)
    pid = message.public_id
    names = {
        a.id: keys.open_text(key, "attachments", "filename", a.public_id, a.filename_sealed)
        for a in message.attachments
    }
    return Readable(
        subject=keys.open_text(key, "messages", "subject", pid, message.subject_sealed),
        body=keys.open_text(key, "messages", "body", pid, message.body_sealed),
        body_format=message.body_format,
        filenames=names,
    )
