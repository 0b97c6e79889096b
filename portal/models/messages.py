"""Messages, their attachments and the pickup links that lead to them."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger, ForeignKey, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from portal.database import Base, UTCDateTime, utcnow
from portal.models.types import BigId, new_public_id, sealed_column


class MessageState(StrEnum):
    """Whether a message can still be read; derived from its timestamps, never stored as a column.

    The values appear in audit details (``access.denied``'s ``reason``) and pages, so they
    never change once released.
    """

    AVAILABLE = "available"
    REVOKED = "revoked"  # staff withdrew it (revoked_at)
    EXPIRED = "expired"  # expires_at has passed
    DELETED = "deleted"  # its data key was destroyed (crypto-shredded) or it cannot be read


class LinkState(StrEnum):
    """What a pickup link's landing page may do; derived, recorded in ``link.*`` audit details.

    ``UNKNOWN`` and ``UNAVAILABLE`` describe a request rather than a link: no link has
    the token, or the link expired together with its message (no new link can help).
    """

    USABLE = "usable"
    REVOKED = "revoked"  # the link, its message or its recipient was withdrawn or disabled
    EXPIRED = "expired"
    UNKNOWN = "unknown"
    UNAVAILABLE = "unavailable"


class Message(Base):
    """A message to one recipient; subject and body sealed under the message's own data key."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, default=new_public_id)
    sender_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    recipient_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    data_key_id: Mapped[int] = mapped_column(ForeignKey("data_keys.id"))
    in_reply_to_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"))
    # The care team and conversation it belongs to (portal.models.teams); set for every
    # message the services create (migration 0005 filled them in for older rows).
    team_id: Mapped[int | None] = mapped_column(ForeignKey("care_teams.id"), index=True)
    conversation_id: Mapped[int | None] = mapped_column(ForeignKey("conversations.id"), index=True)
    subject_sealed: Mapped[bytes] = sealed_column(nullable=False)
    body_sealed: Mapped[bytes] = sealed_column(nullable=False)
    body_format: Mapped[str] = mapped_column(String(16), default="text")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    first_opened_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    reminded_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    destroyed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    attachments: Mapped[list[Attachment]] = relationship(
        back_populates="message", order_by="Attachment.position"
    )


class Attachment(Base):
    """A file (a record PDF) whose ciphertext lives in the blob store under a random id."""

    __tablename__ = "attachments"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, default=new_public_id)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"), index=True)
    position: Mapped[int] = mapped_column(Integer, default=0)
    blob_id: Mapped[str] = mapped_column(String(64), unique=True)
    filename_sealed: Mapped[bytes] = sealed_column(nullable=False)
    content_type: Mapped[str] = mapped_column(String(100), default="application/pdf")
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    message: Mapped[Message] = relationship(back_populates="attachments")


class PickupLink(Base):
    """A time-limited link bound to one message and recipient; only the token's SHA-256 is kept."""

    __tablename__ = "pickup_links"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, default=new_public_id)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"), index=True)
    recipient_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    verify_failures: Mapped[int] = mapped_column(Integer, default=0)
    locked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    reissued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
