"""Care teams and the conversations they hold with patients.

A care team ("Cardiology clinic", "Records office") is who a message belongs to:
staff see and act on their teams' conversations only. A conversation is a thread
between one patient and one team; every message (a staff message, a patient's reply,
a patient-started message) belongs to exactly one. Team names are organisational,
not PHI, so they are stored in the clear.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Boolean, CheckConstraint, ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from portal.database import Base, UTCDateTime, utcnow
from portal.models.types import BigId, new_public_id

DEFAULT_TEAM_NAME = "All staff"  # migration 0005 puts existing messages and staff here
MAX_TEAM_NAME = 100
MAX_TEAM_DESCRIPTION = 500


class StartedBy(StrEnum):
    """Who wrote a conversation's first message."""

    STAFF = "staff"
    PATIENT = "patient"


class ConversationState(StrEnum):
    """Open until a staff member marks it done; a new patient message reopens it."""

    OPEN = "open"
    DONE = "done"


class CareTeam(Base):
    """A group of staff that owns conversations with patients."""

    __tablename__ = "care_teams"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, default=new_public_id)
    name: Mapped[str] = mapped_column(String(MAX_TEAM_NAME), unique=True)
    description: Mapped[str] = mapped_column(String(MAX_TEAM_DESCRIPTION), default="")
    # Patients may start a conversation with this team (an admin setting per team).
    open_to_patients: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    archived_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class CareTeamMember(Base):
    """One staff member in one team."""

    __tablename__ = "care_team_members"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("care_teams.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    added_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    added_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))

    __table_args__ = (UniqueConstraint("team_id", "user_id"),)


class Conversation(Base):
    """A thread between one patient and one care team."""

    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True, default=new_public_id)
    team_id: Mapped[int] = mapped_column(ForeignKey("care_teams.id"))
    patient_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    started_by: Mapped[str] = mapped_column(String(16), default=StartedBy.STAFF)
    assigned_to_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    state: Mapped[str] = mapped_column(String(16), default=ConversationState.OPEN)
    last_patient_message_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_message_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (
        Index("ix_conversations_team_activity", "team_id", "last_message_at"),
        CheckConstraint("started_by IN ('staff', 'patient')", name="started_by"),
        CheckConstraint("state IN ('open', 'done')", name="state"),
    )


class ConversationRead(Base):
    """How far one staff member has read a conversation: unread while a patient message
    is newer than ``read_at``."""

    __tablename__ = "conversation_reads"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    read_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (UniqueConstraint("conversation_id", "user_id"),)
