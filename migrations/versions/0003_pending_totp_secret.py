"""pending TOTP secret: a replacement authenticator is kept apart until it is proved

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 01:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import portal.database
import portal.models.types

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("totp_pending_sealed", portal.models.types.Sealed(), nullable=True)
        )
        batch_op.add_column(
            sa.Column("totp_pending_at", portal.database.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("totp_pending_at")
        batch_op.drop_column("totp_pending_sealed")
