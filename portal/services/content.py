"""Message content at rest: encrypted attachment blobs, their cleanup, and crypto-shredding.

Blobs are written before the transaction commits (a file cannot join a
database transaction), so every blob written in a session is remembered: if
the session rolls back, they are deleted at once; if the process dies first,
:func:`sweep_orphans` (run by ``portal retention run``) removes blobs that no
attachment row names.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from flask import current_app
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from portal import audit
from portal.audit import Action, Actor, Outcome, RequestMeta
from portal.config import current_settings
from portal.database import utcnow
from portal.models import Attachment, AuditEvent, Conversation, Message, Role, User
from portal.services import keys
from portal.storage import FilesystemBlobStore, read_decrypted

if TYPE_CHECKING:
    from portal.services.uploads import StagedUpload

log = logging.getLogger(__name__)
ORPHAN_GRACE_SECONDS = 3600  # a blob younger than this may belong to a transaction in flight
READ_CHUNK = 256 * 1024


def blob_store() -> FilesystemBlobStore:
    """Return the current app's blob store (``PORTAL_BLOB_DIR``)."""
    store = current_app.extensions.get("blob_store")
    if store is None:
        store = current_app.extensions["blob_store"] = FilesystemBlobStore(
            current_settings().blob_dir
        )
    return store


@dataclass
class Digest:
    """Size and SHA-256 of the plaintext that streamed through :func:`measured`."""

    size: int = 0
    sha256: str = ""


def measured(src: IO[bytes], digest: Digest, limit: int | None = None) -> Iterator[bytes]:
    """Yield ``src`` in chunks, filling ``digest``; raise ValueError past ``limit`` bytes."""
    hasher = hashlib.sha256()
    while chunk := src.read(READ_CHUNK):
        digest.size += len(chunk)
        if limit is not None and digest.size > limit:
            raise ValueError("file larger than the limit")
        hasher.update(chunk)
        yield chunk
    digest.sha256 = hasher.hexdigest()


def store_blob(session: Session, key: bytes, object_id: str, chunks: Iterator[bytes]) -> str:
    """Encrypt ``chunks`` for ``object_id`` into a new blob; return its id.

    The blob is deleted again if ``session`` rolls back. Exceptions from
    ``chunks`` propagate and leave no blob.
    """
    from portal.storage import put_encrypted

    blob_id = put_encrypted(blob_store(), key, object_id, chunks)
    session.info.setdefault("new_blobs", []).append(blob_id)
    return blob_id


def keep_upload(session: Session, upload: StagedUpload) -> str:
    """Rename the sealed, accepted ``upload`` into the blob store; return its blob id.

    Like :func:`store_blob`, the blob is deleted again if ``session`` rolls back.
    Raises StorageUnavailable, and ValueError for an upload not sealed and accepted.
    """
    blob_id = upload.keep()
    session.info.setdefault("new_blobs", []).append(blob_id)
    return blob_id


@event.listens_for(Session, "after_soft_rollback")
def _delete_blobs_of_rolled_back(session: Session, _previous: object) -> None:
    session.info.pop("delete_blobs", None)
    blob_ids = session.info.pop("new_blobs", [])
    if blob_ids:
        store = blob_store()
        for blob_id in blob_ids:
            store.delete(blob_id)
        log.info("deleted blobs of a rolled-back transaction", extra={"count": len(blob_ids)})


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    session.info.pop("new_blobs", None)
    doomed = session.info.pop("delete_blobs", [])
    if doomed:
        store = blob_store()
        for blob_id in doomed:
            store.delete(blob_id)


def open_attachment(session: Session, attachment: Attachment) -> Iterator[bytes]:
    """Return the verified plaintext of ``attachment`` as an iterator of segments.

    Raises ContentDestroyed when the message was shredded, ContentTampered when
    the blob fails authentication (also while iterating: the consumer aborts).
    """
    key = keys.unwrap(session, attachment.message.data_key_id)
    return read_decrypted(blob_store(), key, attachment.blob_id, attachment.public_id)


def record_tampered(
    session: Session,
    *,
    actor: Actor,
    meta: RequestMeta,
    stage: str,
    message_public_id: str | None = None,
    attachment_public_id: str | None = None,
) -> AuditEvent:
    """Audit content that failed authentication (content.tampered, high severity); return it.

    Ids name the message and attachment only when they exist (a URL can say
    anything). ``stage`` says whether the response had begun ("mid_stream").
    Logs at CRITICAL with ids only, for alerting (ASVS 7.2.2, 6.4.2: integrity
    failures of protected data are security events). Raises nothing of ours.
    """
    message = (
        session.scalar(select(Message).where(Message.public_id == message_public_id))
        if message_public_id
        else None
    )
    attachment = (
        next((a for a in message.attachments if a.public_id == attachment_public_id), None)
        if message
        else None
    )
    target_type, target = ("attachment", attachment) if attachment else ("message", message)
    event = audit.record(
        session,
        Action.CONTENT_TAMPERED,
        actor=actor,
        meta=meta,
        outcome=Outcome.FAILURE,
        target_type=target_type if target else None,
        target_id=target.public_id if target else None,
        patient_id=patient_of(session, message) if message else None,
        message_id=message.id if message else None,
        details={"severity": "high", "stage": stage},
    )
    log.critical(
        "content failed its integrity check",
        extra={
            "event": "content_tampered",
            "audit_seq": event.seq,
            "stage": stage,
            "target_type": event.target_type,
            "target_id": event.target_id,
            "message_id": event.message_id,
            "actor_id": actor.id,
        },
    )
    return event


def patient_of(session: Session, message: Message) -> int | None:
    """Return the id of the patient ``message`` is about: its conversation's patient, else
    its sender when a patient wrote it (a reply's recipient is a member of staff), else its
    recipient (staff write to patients). Two queries at most; None for a message between
    staff members outside any conversation (none is created so, but old data may hold one).
    """
    if message.conversation_id is not None:
        found = session.scalar(
            select(Conversation.patient_id).where(Conversation.id == message.conversation_id)
        )
        if found is not None:
            return found
    wanted = {message.sender_id, message.recipient_id}
    found_roles = session.execute(select(User.id, User.role).where(User.id.in_(wanted)))
    people = {row.id: row.role for row in found_roles}
    if people.get(message.sender_id) == Role.PATIENT:
        return message.sender_id
    if people.get(message.recipient_id) == Role.PATIENT:
        return message.recipient_id
    return None


def shred(session: Session, message: Message, *, actor: Actor, meta: RequestMeta) -> None:
    """Destroy ``message``'s data key and blobs: its content is unrecoverable. Audited.

    The ``message.shred`` event names ``actor`` as who shredded, and as its patient the
    patient the message is about (:func:`patient_of`), not its recipient: a patient's
    reply or a patient-started message is addressed to a member of staff. Ids only, no
    details. Idempotent. The blob files are deleted too once the caller commits;
    without the key they were already unreadable. Returns None; raises nothing of ours.
    """
    if message.destroyed_at is not None:
        return
    keys.destroy(session, message.data_key_id)
    message.destroyed_at = utcnow()
    audit.record(
        session,
        Action.MESSAGE_SHRED,
        actor=actor,
        meta=meta,
        target_type="message",
        target_id=message.public_id,
        patient_id=patient_of(session, message),
        message_id=message.id,
    )
    session.flush()
    # Deleted once the shredding commits; a rollback keeps key and blobs together.
    session.info.setdefault("delete_blobs", []).extend(a.blob_id for a in message.attachments)


def sweep_partial_uploads() -> int:
    """Delete the temporary files of uploads whose writer died; return how many.

    Safe while uploads run: a live writer holds a lock on its file
    (``FilesystemBlobStore.sweep_temp``). Raises OSError when the folder is unreadable.
    """
    return blob_store().sweep_temp()


def sweep_orphans(session: Session, grace_seconds: int = ORPHAN_GRACE_SECONDS) -> int:
    """Delete blobs no attachment names (older than ``grace_seconds``).

    Returns how many blobs were deleted. Temporary files: :func:`sweep_partial_uploads`.
    """
    store = blob_store()
    known = set(session.scalars(select(Attachment.blob_id)))
    cutoff, removed = time.time() - grace_seconds, 0
    for blob_id in list(store.iter_ids()):
        if blob_id not in known and store.mtime(blob_id) < cutoff:
            store.delete(blob_id)
            removed += 1
    return removed
