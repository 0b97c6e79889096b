"""People and programs: users of every role, patient verification data, consents, API clients."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from flask_login import UserMixin
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from portal.database import Base, UTCDateTime, utcnow
from portal.models.types import BigId, new_public_id, sealed_column


class Role(StrEnum):
    """Who a user is; each view states which roles may use it."""

    PATIENT = "patient"
    STAFF = "staff"
    AUDITOR = "auditor"
    ADMIN = "admin"


class User(UserMixin, Base):
    """An account. Never deleted: disabled instead, so the audit trail keeps its actors."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, default=new_public_id)
    role: Mapped[str] = mapped_column(String(16))
    email: Mapped[str] = mapped_column(String(254), unique=True)
    data_key_id: Mapped[int] = mapped_column(ForeignKey("data_keys.id"))
    name_sealed: Mapped[bytes] = sealed_column(nullable=False)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    totp_secret_sealed: Mapped[bytes | None] = sealed_column()
    totp_enabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Last accepted RFC 6238 time step: codes are single-use (advanced by one
    # conditional UPDATE, so concurrent requests with one code cannot both pass).
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger)
    # A replacement authenticator being set up: kept apart, sealed like the active
    # secret, and swapped in only once a code from it is proved (NIST SP 800-63B 6.1.2).
    totp_pending_sealed: Mapped[bytes | None] = sealed_column()
    totp_pending_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    failed_signins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    must_reset: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))

    profile: Mapped[PatientProfile | None] = relationship(back_populates="user", uselist=False)

    def get_id(self) -> str:
        """Return the id flask-login keeps in the session: the public id, never the row id."""
        return self.public_id

    @property
    def is_active(self) -> bool:
        """Disabled accounts cannot sign in or stay signed in."""
        return not self.disabled

    __table_args__ = (
        CheckConstraint("role IN ('patient', 'staff', 'auditor', 'admin')", name="role"),
    )


class PatientProfile(Base):
    """What a first-time recipient proves identity with: date of birth or an access code."""

    __tablename__ = "patient_profiles"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    dob_sealed: Mapped[bytes | None] = sealed_column()
    access_code_hash: Mapped[str | None] = mapped_column(String(255))
    verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    user: Mapped[User] = relationship(back_populates="profile")


class Consent(Base):
    """A patient's consent (for example to email notices), versioned and withdrawable.

    No code reads or writes it yet: the model stays because its table exists (migration
    0001); dropping it takes a migration.
    """

    __tablename__ = "consents"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    version: Mapped[str] = mapped_column(String(32))
    granted_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    withdrawn_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ApiClient(Base):
    """A program (an EHR) that sends through the API; only its key's hash is stored.

    No code reads or writes it yet (there is no API blueprint): the model stays because its
    table exists (migration 0001); dropping it takes a migration.
    """

    __tablename__ = "api_clients"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, default=new_public_id)
    label: Mapped[str] = mapped_column(String(100))
    key_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    acts_as_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
