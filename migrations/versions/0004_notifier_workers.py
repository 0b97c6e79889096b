"""notifier workers: each worker's heartbeat, last pass and last transport error

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import portal.database

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notifier_workers",
        sa.Column("worker_id", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("lease_seconds", sa.Integer(), nullable=False),
        sa.Column("started_at", portal.database.UTCDateTime(timezone=True), nullable=False),
        sa.Column("beat_at", portal.database.UTCDateTime(timezone=True), nullable=False),
        sa.Column("pass_at", portal.database.UTCDateTime(timezone=True), nullable=True),
        sa.Column("pass_sent", sa.Integer(), nullable=False),
        sa.Column("pass_failed", sa.Integer(), nullable=False),
        sa.Column("pass_retrying", sa.Integer(), nullable=False),
        sa.Column("pass_delayed", sa.Integer(), nullable=False),
        sa.Column("transport_error", sa.String(length=64), nullable=True),
        sa.Column("transport_error_at", portal.database.UTCDateTime(timezone=True), nullable=True),
        sa.Column("transport_ok_at", portal.database.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("worker_id", name=op.f("pk_notifier_workers")),
    )


def downgrade() -> None:
    op.drop_table("notifier_workers")
