"""care teams and conversations: every message belongs to a team and a conversation

Existing staff join a default team, "All staff", which owns every existing message;
each existing message with its replies becomes one conversation.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 13:30:00.000000
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

import portal.database

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
When = portal.database.UTCDateTime(timezone=True)
DEFAULT_TEAM_NAME = "All staff"  # as portal.models.teams.DEFAULT_TEAM_NAME (frozen here)


def upgrade() -> None:
    op.create_table(
        "care_teams",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("description", sa.String(length=500), nullable=False),
        sa.Column("open_to_patients", sa.Boolean(), nullable=False),
        sa.Column("created_at", When, nullable=False),
        sa.Column("archived_at", When, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_care_teams")),
        sa.UniqueConstraint("name", name=op.f("uq_care_teams_name")),
        sa.UniqueConstraint("public_id", name=op.f("uq_care_teams_public_id")),
    )
    op.create_table(
        "care_team_members",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("team_id", BigId, nullable=False),
        sa.Column("user_id", BigId, nullable=False),
        sa.Column("added_at", When, nullable=False),
        sa.Column("added_by_id", BigId, nullable=True),
        sa.ForeignKeyConstraint(
            ["team_id"], ["care_teams.id"], name=op.f("fk_care_team_members_team_id_care_teams")
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_care_team_members_user_id_users")
        ),
        sa.ForeignKeyConstraint(
            ["added_by_id"], ["users.id"], name=op.f("fk_care_team_members_added_by_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_care_team_members")),
        sa.UniqueConstraint("team_id", "user_id", name=op.f("uq_care_team_members_team_id")),
    )
    op.create_index(
        op.f("ix_care_team_members_user_id"), "care_team_members", ["user_id"], unique=False
    )
    op.create_table(
        "conversations",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("team_id", BigId, nullable=False),
        sa.Column("patient_id", BigId, nullable=False),
        sa.Column("started_by", sa.String(length=16), nullable=False),
        sa.Column("assigned_to_id", BigId, nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("last_patient_message_at", When, nullable=True),
        sa.Column("last_message_at", When, nullable=False),
        sa.Column("created_at", When, nullable=False),
        sa.ForeignKeyConstraint(
            ["team_id"], ["care_teams.id"], name=op.f("fk_conversations_team_id_care_teams")
        ),
        sa.ForeignKeyConstraint(
            ["patient_id"], ["users.id"], name=op.f("fk_conversations_patient_id_users")
        ),
        sa.ForeignKeyConstraint(
            ["assigned_to_id"], ["users.id"], name=op.f("fk_conversations_assigned_to_id_users")
        ),
        sa.CheckConstraint(
            "started_by IN ('staff', 'patient')", name=op.f("ck_conversations_started_by")
        ),
        sa.CheckConstraint("state IN ('open', 'done')", name=op.f("ck_conversations_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversations")),
        sa.UniqueConstraint("public_id", name=op.f("uq_conversations_public_id")),
    )
    op.create_index(
        op.f("ix_conversations_patient_id"), "conversations", ["patient_id"], unique=False
    )
    op.create_index(
        "ix_conversations_team_activity",
        "conversations",
        ["team_id", "last_message_at"],
        unique=False,
    )
    op.create_table(
        "conversation_reads",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("conversation_id", BigId, nullable=False),
        sa.Column("user_id", BigId, nullable=False),
        sa.Column("read_at", When, nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_conversation_reads_conversation_id_conversations"),
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_conversation_reads_user_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversation_reads")),
        sa.UniqueConstraint(
            "conversation_id", "user_id", name=op.f("uq_conversation_reads_conversation_id")
        ),
    )
    op.create_index(
        op.f("ix_conversation_reads_user_id"), "conversation_reads", ["user_id"], unique=False
    )
    _add_reference("team_id", "care_teams", "fk_messages_team_id_care_teams")
    _add_reference("conversation_id", "conversations", "fk_messages_conversation_id_conversations")
    op.create_index(op.f("ix_messages_team_id"), "messages", ["team_id"], unique=False)
    op.create_index(
        op.f("ix_messages_conversation_id"), "messages", ["conversation_id"], unique=False
    )
    _fill_in()


def _add_reference(column: str, table: str, constraint: str) -> None:
    """Add a nullable column referencing ``table`` to messages.

    SQLite adds it in place (``ADD COLUMN ... REFERENCES``): a batch copy of messages
    would trip the foreign keys that point at it, and SQLite cannot add a constraint.
    """
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            f"ALTER TABLE messages ADD COLUMN {column} INTEGER "
            f"CONSTRAINT {constraint} REFERENCES {table} (id)"
        )
        return
    op.add_column("messages", sa.Column(column, BigId, nullable=True))
    op.create_foreign_key(op.f(constraint), "messages", table, [column], ["id"])


def _fill_in() -> None:
    """Put every existing staff member and message in the default team, one conversation
    per message and its replies."""
    bind = op.get_bind()
    now = datetime.now(UTC)
    teams = sa.table(
        "care_teams",
        sa.column("id"),
        sa.column("public_id"),
        sa.column("name"),
        sa.column("description"),
        sa.column("open_to_patients"),
        sa.column("created_at", When),
    )
    bind.execute(
        teams.insert().values(
            public_id=uuid.uuid4().hex,
            name=DEFAULT_TEAM_NAME,
            description="Every member of staff at the upgrade to care teams.",
            open_to_patients=False,
            created_at=now,
        )
    )
    team_id = bind.execute(
        sa.text("SELECT id FROM care_teams WHERE name = :n"), {"n": DEFAULT_TEAM_NAME}
    ).scalar_one()
    bind.execute(
        sa.text(
            "INSERT INTO care_team_members (team_id, user_id, added_at) "
            "SELECT :team, id, :now FROM users WHERE role = 'staff'"
        ).bindparams(sa.bindparam("now", type_=When)),
        {"team": team_id, "now": now},
    )
    _fill_conversations(bind, team_id)


def _fill_conversations(bind: sa.Connection, team_id: int) -> None:
    """One conversation per root message (in_reply_to_id NULL), in three statements
    whatever the number of messages (a hospital's table is large).

    A migrated conversation takes its root message's id, so each message finds its own
    with ``COALESCE(in_reply_to_id, id)``. Before 0005 only the patient replied (to a
    message they received, never to a reply), so every reply is a patient message and
    points at a root.
    """
    postgresql = bind.dialect.name == "postgresql"
    # A random public id per row, as new_public_id() makes (gen_random_uuid: PostgreSQL 13+).
    public_id = (
        "replace(gen_random_uuid()::text, '-', '')" if postgresql else "lower(hex(randomblob(16)))"
    )
    bind.execute(
        sa.text(
            # {public_id} is one of the two constant expressions above, never input
            "INSERT INTO conversations (id, public_id, team_id, patient_id, started_by, state,"  # noqa: S608
            " last_patient_message_at, last_message_at, created_at)"
            f" SELECT m.id, {public_id}, :team, m.recipient_id, 'staff', 'open', r.last_at,"
            " CASE WHEN r.last_at > m.created_at THEN r.last_at ELSE m.created_at END,"
            " m.created_at"
            " FROM messages m LEFT JOIN (SELECT in_reply_to_id AS root_id,"
            " max(created_at) AS last_at FROM messages WHERE in_reply_to_id IS NOT NULL"
            " GROUP BY in_reply_to_id) r ON r.root_id = m.id"
            " WHERE m.in_reply_to_id IS NULL"
        ),
        {"team": team_id},
    )
    bind.execute(
        sa.text(
            "UPDATE messages SET team_id = :team, conversation_id = COALESCE(in_reply_to_id, id)"
            " WHERE in_reply_to_id IS NULL"
            " OR in_reply_to_id IN (SELECT id FROM conversations)"
        ),
        {"team": team_id},
    )
    if postgresql:  # ids were given explicitly: the sequence continues after them
        bind.execute(
            sa.text(
                "SELECT setval(pg_get_serial_sequence('conversations', 'id'),"
                " COALESCE((SELECT max(id) FROM conversations), 0) + 1, false)"
            )
        )


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        _sqlite_foreign_keys(on=False)
    with op.batch_alter_table("messages", schema=None) as batch_op:
        if not sqlite:
            # SQLite reflects the references _add_reference made inline without their
            # names; its batch copy leaves them out together with their columns.
            batch_op.drop_constraint(
                batch_op.f("fk_messages_conversation_id_conversations"), type_="foreignkey"
            )
            batch_op.drop_constraint(
                batch_op.f("fk_messages_team_id_care_teams"), type_="foreignkey"
            )
        batch_op.drop_index(batch_op.f("ix_messages_conversation_id"))
        batch_op.drop_index(batch_op.f("ix_messages_team_id"))
        batch_op.drop_column("conversation_id")
        batch_op.drop_column("team_id")
    op.drop_index(op.f("ix_conversation_reads_user_id"), table_name="conversation_reads")
    op.drop_table("conversation_reads")
    op.drop_index("ix_conversations_team_activity", table_name="conversations")
    op.drop_index(op.f("ix_conversations_patient_id"), table_name="conversations")
    op.drop_table("conversations")
    op.drop_index(op.f("ix_care_team_members_user_id"), table_name="care_team_members")
    op.drop_table("care_team_members")
    op.drop_table("care_teams")
    if sqlite:
        _sqlite_foreign_keys(on=True)


def _sqlite_foreign_keys(*, on: bool) -> None:
    """Turn SQLite's foreign key enforcement off around the batch copy of messages, as
    SQLite's own procedure for rebuilding a table has it (lang_altertable.html, "Making
    Other Kinds Of Table Schema Changes"): dropping the old messages table would orphan
    the rows that point at it (attachments, links, notices, replies), even for the moment
    until the copy takes its name, and a deferred check still counts them at the commit.

    The pragma does nothing inside a transaction: off, it must come first (pysqlite opens
    one at the first data change), so this refuses to go on when it did not take; on, the
    copy is checked, committed and enforcement restored for the connection's next user.
    """
    bind = op.get_bind()
    if on:
        broken = bind.exec_driver_sql("PRAGMA foreign_key_check").first()
        if broken is not None:
            raise RuntimeError(f"downgrade left a broken reference in {broken[0]}")
        dbapi = bind.connection.dbapi_connection
        assert dbapi is not None  # a live connection: the migration runs on it
        dbapi.commit()
    bind.exec_driver_sql(f"PRAGMA foreign_keys = {'ON' if on else 'OFF'}")
    if bind.exec_driver_sql("PRAGMA foreign_keys").scalar() != int(on):
        raise RuntimeError("run this downgrade on its own: SQLite is inside a transaction")
