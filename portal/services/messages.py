"""Messages: store one encrypted (subject, body, attachments) and read it back.

``create`` is the content half of sending; services.messaging.send adds the
pickup link, the notice and the audit event in the same transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

from sqlalchemy import ScalarSelect, Select, func, select
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from portal.models import Attachment, DataKey, Message, User
from portal.models.types import new_public_id
from portal.services import content, keys
from portal.services.errors import ServiceError
from portal.services.uploads import MAX_FILENAME as MAX_FILENAME
from portal.services.uploads import StagedUpload, Staging
from portal.services.uploads import safe_filename as safe_filename

MAX_SUBJECT = 200
MAX_BODY = 100_000
BODY_FORMATS = ("text", "markdown")
# What a list reads of a message: its state, its sealed subject and its data key's row, in
# one query and as plain rows (no ORM object per row); never the body (up to MAX_BODY
# characters, sealed, shown by no list) nor the attachments (see attachment_count).
LISTED = (
    Message.id,
    Message.public_id,
    Message.sender_id,
    Message.recipient_id,
    Message.subject_sealed,
    Message.created_at,
    Message.expires_at,
    Message.revoked_at,
    Message.destroyed_at,
    Message.first_opened_at,
    DataKey.id.label("key_id"),
    DataKey.kek_version,
    DataKey.wrapped,
)


@dataclass
class Upload:
    """A file to attach: its name as the sender gave it, and a readable stream.

    It streams through a ``Staging`` like an uploaded file (``create``).
    """

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
    staged: Staging | None = None,
    max_upload: int | None = None,
    validate: Callable[[Upload], None] | None = None,
    in_reply_to: Message | None = None,
) -> Message:
    """Store a message and its attachments encrypted under a new data key; return it (flushed).

    The attachments are the files of ``staged`` (uploaded, already encrypted under
    its key, which becomes the message's), then ``uploads``, streamed into it (or,
    without ``staged``, into a staging of their own that accepts ``max_upload``
    bytes a file and runs no inspector). Raises ServiceError for an empty or
    oversize subject or body, UploadTooLarge, UploadRefused (a file an inspector
    refused), and whatever ``validate`` raises for an upload; on any error the
    caller rolls back and the blobs already committed are deleted with it.
    """
    subject, body = _check_text(subject, body, body_format)
    staging = staged or Staging(content.blob_store(), max_bytes=max_upload)
    try:
        for upload in uploads:
            if validate:
                validate(upload)
            staging.add(upload.filename, upload.stream)
        files = staging.accepted()
        key_row, key = keys.create(session, "message", raw=staging.key)
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
        for position, staged_file in enumerate(files):
            _attach(session, message, key, staged_file, position)
    finally:
        if staged is None:
            staging.discard()  # what this call staged and did not commit
    return message


def _attach(
    session: Session, message: Message, key: bytes, upload: StagedUpload, position: int
) -> Attachment:
    # The upload's object id (bound into its ciphertext) is the attachment's public id.
    public_id = upload.object_id
    attachment = Attachment(
        public_id=public_id,
        message_id=message.id,
        position=position,
        blob_id=content.keep_upload(session, upload),
        size=upload.size,
        sha256=upload.sha256,
        content_type=upload.media_type or "application/pdf",  # no content check: a PDF
        filename_sealed=keys.seal_text(key, "attachments", "filename", public_id, upload.name),
    )
    session.add(attachment)
    session.flush()
    return attachment


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


def listed(*extra: Any) -> Select[*tuple[Any, ...]]:
    """Return a query of the LISTED columns (and ``extra``) of messages joined to their keys."""
    return select(*LISTED, *extra).join(DataKey, DataKey.id == Message.data_key_id)


def listed_subject(session: Session, row: Row[*tuple[Any, ...]]) -> str:
    """Return the unsealed subject of a row of :func:`listed`: all that a list shows of it.

    Each data key is unwrapped once per transaction. Raises ContentDestroyed when the
    message was shredded, ContentTampered when the sealed subject was altered or moved.
    """
    key = keys.unwrap_loaded(session, row.key_id, row.kek_version, row.wrapped)
    return keys.open_text(key, "messages", "subject", row.public_id, row.subject_sealed)


def attachment_count() -> ScalarSelect[int]:
    """Return a column counting a listed message's attachments (no attachment row loaded)."""
    return (
        select(func.count(Attachment.id))
        .where(Attachment.message_id == Message.id)
        .correlate(Message)
        .scalar_subquery()
    )
