"""Migration 0005 on a database with data: existing staff join "All staff", every message
with its replies becomes one conversation of that team, and the downgrade takes it all
back out with the messages intact (SQLite and PostgreSQL)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.orm import Session

from portal.crypto.keyring import Keyring
from portal.database import make_engine
from portal.migrate import alembic_config, schema_state, upgrade
from portal.models import CareTeam, CareTeamMember, Conversation, Message
from portal.models.teams import DEFAULT_TEAM_NAME
from portal.services.keys import seal_text
from portal.storage import FilesystemBlobStore
from tests.support.databases import own_schema
from tests.support.upgrade import T0, Seed

BEFORE = "0004"
NEW_TABLES = {"care_teams", "care_team_members", "conversations", "conversation_reads"}


@pytest.fixture
def engine(backend: str, tmp_path: Path) -> Iterator[Engine]:
    """An empty database of this test's own, migrated to 0004 (a schema on PostgreSQL)."""
    if backend == "sqlite":
        made = make_engine(f"sqlite:///{tmp_path / 'at0004.db'}")
        upgrade(made, BEFORE)
        yield made
        made.dispose()
        return
    with own_schema("pp_m0005") as url:
        made = make_engine(url)
        upgrade(made, BEFORE)
        yield made
        made.dispose()


class Old:
    """What the 0004 seed holds: people's and messages' row ids."""

    def __init__(self) -> None:
        self.staff: list[int] = []
        self.patients: list[int] = []
        self.others: list[int] = []
        self.roots: dict[str, int] = {}
        self.replies: dict[str, list[int]] = {}


def message(seed: Seed, sender: int, recipient: int, at: Any, reply_to: int | None = None) -> int:
    key_id, key = seed.data_key("message")
    public_id = secrets.token_hex(16)
    return seed.insert(
        "messages",
        public_id=public_id,
        sender_id=sender,
        recipient_id=recipient,
        data_key_id=key_id,
        in_reply_to_id=reply_to,
        subject_sealed=seal_text(key, "messages", "subject", public_id, "Letter"),
        body_sealed=seal_text(key, "messages", "body", public_id, "Body"),
        body_format="text",
        created_at=at,
        expires_at=at + timedelta(days=30),
    )


def seed_0004(engine: Engine, tmp_path: Path) -> Old:
    """Two staff, an auditor, an admin, two patients; message A (two replies, one link),
    message B (none), and message C to the second patient (one reply)."""
    old = Old()
    ring = Keyring.load_or_create(tmp_path / "keyring.json")
    with engine.begin() as connection:
        seed = Seed(connection, ring, FilesystemBlobStore(tmp_path / "blobs"))
        for n in range(2):
            old.staff.append(seed.user("staff", f"s{n}@example.org", f"Staff {n}", None)[0])
            old.patients.append(seed.user("patient", f"p{n}@example.org", f"Pat {n}", None)[0])
        for role in ("auditor", "admin"):
            old.others.append(seed.user(role, f"{role}@example.org", role, None)[0])
        s0, s1 = old.staff
        p0, p1 = old.patients
        old.roots["A"] = message(seed, s0, p0, T0)
        old.replies["A"] = [
            message(seed, p0, s0, T0 + timedelta(hours=h), old.roots["A"]) for h in (5, 2)
        ]
        old.roots["B"] = message(seed, s1, p0, T0 + timedelta(hours=1))
        old.roots["C"] = message(seed, s1, p1, T0 + timedelta(hours=3))
        old.replies["C"] = [message(seed, p1, s1, T0 + timedelta(hours=4), old.roots["C"])]
        old.replies["B"] = []
        seed.insert(
            "pickup_links",
            public_id=secrets.token_hex(16),
            message_id=old.roots["A"],
            recipient_id=p0,
            token_hash=secrets.token_bytes(32),
            created_at=T0,
            expires_at=T0 + timedelta(days=30),
            verify_failures=0,
        )
    return old


def test_upgrade_puts_staff_and_messages_in_the_default_team(
    engine: Engine, tmp_path: Path
) -> None:
    old = seed_0004(engine, tmp_path)
    upgrade(engine, "0005")
    with Session(engine) as session:
        [team] = session.scalars(select(CareTeam)).all()
        assert (team.name, team.open_to_patients, team.archived_at) == (
            DEFAULT_TEAM_NAME,
            False,
            None,
        )
        members = session.scalars(select(CareTeamMember).where(CareTeamMember.team_id == team.id))
        assert sorted(m.user_id for m in members) == sorted(old.staff)  # staff only
        conversations = {c.id: c for c in session.scalars(select(Conversation))}
        assert len(conversations) == 3
        for name, root_id in old.roots.items():
            root = session.get(Message, root_id)
            assert root is not None
            conversation = conversations[root.conversation_id or 0]
            assert (conversation.team_id, conversation.patient_id) == (team.id, root.recipient_id)
            assert (conversation.started_by, conversation.state) == ("staff", "open")
            assert conversation.created_at == root.created_at
            replies = [session.get(Message, r) for r in old.replies[name]]
            assert {(r.team_id, r.conversation_id) for r in replies if r} <= {
                (team.id, conversation.id)
            }
            latest = max((r.created_at for r in replies if r), default=None)
            assert conversation.last_patient_message_at == latest
            assert conversation.last_message_at == (latest or root.created_at)
        assert session.scalar(select(Message).where(Message.team_id.is_(None))) is None
        assert session.scalar(select(Message).where(Message.conversation_id.is_(None))) is None
        public_ids = [c.public_id for c in conversations.values()]
        assert len(set(public_ids)) == 3
        assert all(len(p) == 32 and int(p, 16) >= 0 for p in public_ids)


def test_new_rows_after_the_upgrade_get_new_ids(engine: Engine, tmp_path: Path) -> None:
    """Migrated conversations took their root message's id: the id sequence (PostgreSQL)
    must continue after them."""
    old = seed_0004(engine, tmp_path)
    upgrade(engine, "0005")
    with Session(engine) as session:
        team = session.scalars(select(CareTeam)).one()
        made = Conversation(team_id=team.id, patient_id=old.patients[0])
        session.add(made)
        session.flush()
        assert made.id > max(old.roots.values())
        session.commit()


def test_upgrade_of_an_empty_database_makes_an_empty_default_team(engine: Engine) -> None:
    upgrade(engine, "0005")
    with Session(engine) as session:
        assert session.scalars(select(CareTeam.name)).all() == [DEFAULT_TEAM_NAME]
        assert session.scalars(select(CareTeamMember)).all() == []
        assert session.scalars(select(Conversation)).all() == []


def test_downgrade_with_data_keeps_the_messages(engine: Engine, tmp_path: Path) -> None:
    old = seed_0004(engine, tmp_path)
    upgrade(engine, "0005")
    command.downgrade(alembic_config(engine), BEFORE)
    assert schema_state(engine)[0] == BEFORE
    tables = set(inspect(engine).get_table_names())
    assert not tables & NEW_TABLES
    columns = {c["name"] for c in inspect(engine).get_columns("messages")}
    assert not columns & {"team_id", "conversation_id"}
    with engine.connect() as connection:
        ids = set(connection.scalars(text("SELECT id FROM messages")))
        assert ids == set(old.roots.values()) | {r for rs in old.replies.values() for r in rs}
        links = connection.scalars(text("SELECT message_id FROM pickup_links")).all()
        assert links == [old.roots["A"]]
        if engine.dialect.name == "sqlite":
            assert connection.execute(text("PRAGMA foreign_key_check")).all() == []
            assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1  # back on
    upgrade(engine, "0005")  # and up again, from the data as the downgrade left it
    with Session(engine) as session:
        assert len(session.scalars(select(Conversation)).all()) == 3
