"""Data keys: one per message (and per user), stored only wrapped by a versioned KEK."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from portal.database import Base, UTCDateTime, utcnow
from portal.models.types import BigId


class DataKey(Base):
    """A 256-bit data key wrapped by KEK ``kek_version``; ``wrapped`` is None once destroyed."""

    __tablename__ = "data_keys"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    purpose: Mapped[str] = mapped_column(String(16))
    kek_version: Mapped[int] = mapped_column(Integer)
    wrapped: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    destroyed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_data_keys_kek_version", "kek_version"),)
