"""Notices: outbox rows the notifier turns into PHI-free emails.

A notice carries only a link (its payload, sealed under the recipient's data
key and erased once the mail server accepted it) and ids. Everything else in
the email comes from the PHI-free templates in ``templates/email/<kind>/``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from portal.database import rowcount, utcnow
from portal.models import Message, Notification, User
from portal.models.notifications import NoticeKind, NoticeStatus
from portal.models.types import new_public_id
from portal.services import keys
from portal.services.errors import ServiceError

PAYLOAD_FIELD = ("notifications", "payload")


def enqueue(
    session: Session,
    *,
    kind: str,
    recipient: User,
    url: str | None,
    message: Message | None = None,
    link_id: int | None = None,
    due: datetime | None = None,
) -> Notification:
    """Queue a notice of ``kind`` for ``recipient`` (flushed, not committed) and return it.

    ``url`` is sealed under the recipient's data key, bound to the new row.
    ``due`` (default now) is when the notifier may first send it. Raises
    ServiceError for an unknown kind; ContentDestroyed when the recipient's
    data key was shredded.
    """
    try:
        kind = NoticeKind(kind).value
    except ValueError:
        raise ServiceError("Unknown notice kind.") from None
    public_id = new_public_id()
    payload = _seal(session, recipient, public_id, url) if url is not None else None
    row = Notification(
        public_id=public_id,
        kind=kind,
        recipient_id=recipient.id,
        message_id=message.id if message is not None else None,
        link_id=link_id,
        payload_sealed=payload,
        status=NoticeStatus.QUEUED.value,
        attempts=0,
        next_attempt_at=due or utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def _seal(session: Session, recipient: User, public_id: str, url: str) -> bytes:
    key = keys.unwrap(session, recipient.data_key_id)
    return keys.seal_text(key, *PAYLOAD_FIELD, public_id, url)


def reseal(session: Session, notification: Notification, url: str) -> None:
    """Give a notice whose URL was erased a new one, sealed as :func:`enqueue` seals (flushed).

    For another attempt after a soft bounce: the first URL was erased once the
    server accepted it. Raises ContentDestroyed when the recipient's data key
    was shredded.
    """
    recipient = session.get(User, notification.recipient_id)
    assert recipient is not None  # a foreign key guarantees it
    notification.payload_sealed = _seal(session, recipient, notification.public_id, url)
    session.flush()


def open_payload(session: Session, notification: Notification) -> str | None:
    """Return the notice's URL, unsealed, or None once it was erased (sent or failed).

    Raises ContentDestroyed when the recipient's data key was shredded,
    ContentTampered when the payload was altered or moved to another row.
    """
    if notification.payload_sealed is None:
        return None
    recipient = session.get(User, notification.recipient_id)
    if recipient is None:
        return None
    key = keys.unwrap(session, recipient.data_key_id)
    return keys.open_text(key, *PAYLOAD_FIELD, notification.public_id, notification.payload_sealed)


def cancel_for_message(session: Session, message_id: int) -> int:
    """Cancel the message's queued notices, erasing their links; return how many (flushed).

    Notices already being sent are left to the notifier, which skips those of a
    revoked or expired message. The caller audits the change that caused it.
    """
    result = session.execute(
        update(Notification)
        .where(
            Notification.message_id == message_id, Notification.status == NoticeStatus.QUEUED.value
        )
        .values(status=NoticeStatus.CANCELLED.value, payload_sealed=None)
        .execution_options(synchronize_session="fetch")
    )
    session.flush()
    return rowcount(result)


def status_for_message(session: Session, message_id: int) -> list[Notification]:
    """Return the message's notices, oldest first (staff see whether and when each went)."""
    stmt = (
        select(Notification)
        .where(Notification.message_id == message_id)
        .order_by(Notification.created_at, Notification.id)
        .execution_options(populate_existing=True)
    )
    return list(session.scalars(stmt))
