"""The outbox: notices waiting for the notifier. Payloads (URLs) are sealed and erased once sent."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from portal.database import Base, UTCDateTime, utcnow
from portal.models.types import BigId, new_public_id, sealed_column


class NoticeKind(StrEnum):
    """Which template a notice uses; each template is PHI-free by construction."""

    PICKUP = "pickup"
    REMINDER = "reminder"
    INVITE = "invite"
    RESET = "reset"
    REPLY = "reply"
    # A patient started a conversation with a care team: to its members, linking to it.
    TEAM_MESSAGE = "team_message"
    # Security notices (ASVS 2.2.3): a credential changed. They carry no name and link only
    # to the portal's front page (no per-notice link, nothing stored in the payload).
    MFA_CHANGED = "mfa_changed"
    PASSWORD_CHANGED = "password_changed"  # noqa: S105 - a template name, not a secret
    # The 100-failure lock was reached (NIST SP 800-63B 5.2.2): whom to contact to unlock.
    ACCOUNT_LOCKED = "account_locked"


class NoticeStatus(StrEnum):
    """Where a notice is in its life."""

    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BOUNCED = "bounced"  # accepted, then returned by a hard bounce (RFC 3464 DSN, 5.x.x)


class Notification(Base):
    """One email notice to one user."""

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, default=new_public_id)
    kind: Mapped[str] = mapped_column(String(16))
    recipient_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), index=True)
    link_id: Mapped[int | None] = mapped_column(ForeignKey("pickup_links.id"))
    payload_sealed: Mapped[bytes | None] = sealed_column()
    status: Mapped[str] = mapped_column(String(16), default=NoticeStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    smtp_response: Mapped[str | None] = mapped_column(String(200))
    failure_reason: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (Index("ix_notifications_due", "status", "next_attempt_at"),)
