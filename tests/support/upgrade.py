"""Helpers for upgrade tests: rows of an older schema written with plain SQL through its
tables as they were (reflected, so no model of today is involved), and the audit chain's
encoding as v0.1.0 hashed it (frozen)."""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import argon2
from sqlalchemy import Connection, MetaData

from portal.crypto.keyring import Keyring
from portal.services.keys import seal_text
from portal.storage import FilesystemBlobStore

WRAP_AAD_V010 = b"pickup-portal/data-key/v1"  # v0.1.0's data-key wrapping AAD, frozen
T0 = datetime(2026, 1, 5, 9, 30, tzinfo=UTC)


def v010_event_hash(row: dict[str, Any]) -> str:
    """The audit chain's encoding as v0.1.0 wrote it: sorted compact JSON, UTC micro-timestamps."""
    fields = {
        name: row[name]
        for name in (
            "seq",
            "occurred_at",
            "actor_id",
            "actor_role",
            "action",
            "target_type",
            "target_id",
            "patient_id",
            "message_id",
            "outcome",
            "client_ip",
            "user_agent",
            "request_id",
            "details",
            "prev_hash",
        )
    }
    fields["occurred_at"] = row["occurred_at"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    encoded = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode()).hexdigest()


class Seed:
    """Rows of the previous release, written with plain SQL into its own tables."""

    def __init__(self, connection: Connection, ring: Keyring, blobs: FilesystemBlobStore) -> None:
        self.connection, self.ring, self.blobs = connection, ring, blobs
        self.tables = MetaData()
        self.tables.reflect(connection)
        self.events: list[dict[str, Any]] = []

    def insert(self, table: str, **values: Any) -> int:
        result = self.connection.execute(self.tables.tables[table].insert().values(**values))
        return int(result.inserted_primary_key[0]) if result.inserted_primary_key else 0

    def data_key(self, purpose: str) -> tuple[int, bytes]:
        raw = Keyring.new_data_key()
        version, wrapped = self.ring.wrap(raw, WRAP_AAD_V010)
        return self.insert(
            "data_keys", purpose=purpose, kek_version=version, wrapped=wrapped, created_at=T0
        ), raw

    def user(
        self, role: str, email: str, name: str, password: str | None
    ) -> tuple[int, str, bytes]:
        key_id, key = self.data_key("user")
        public_id = secrets.token_hex(16)
        user_id = self.insert(
            "users",
            public_id=public_id,
            role=role,
            email=email,
            data_key_id=key_id,
            name_sealed=seal_text(key, "users", "name", public_id, name),
            password_hash=argon2.PasswordHasher().hash(password) if password else None,
            disabled=False,
            failed_signins=0,
            must_reset=False,
            created_at=T0,
        )
        self.event("user.create", None, "system", "user", public_id)
        return user_id, public_id, key

    def event(
        self,
        action: str,
        actor_id: int | None,
        role: str,
        target_type: str,
        target_id: str,
        **extra: Any,
    ) -> None:
        prev = self.events[-1]["hash"] if self.events else "0" * 64
        row = {
            "seq": len(self.events) + 1,
            "occurred_at": T0 + timedelta(seconds=len(self.events)),
            "actor_id": actor_id,
            "actor_role": role,
            "action": action,
            "target_type": target_type,
            "target_id": target_id,
            "patient_id": None,
            "message_id": None,
            "outcome": "success",
            "client_ip": None,
            "user_agent": None,
            "request_id": None,
            "details": "{}",
            "prev_hash": prev,
            **extra,
        }
        row["hash"] = v010_event_hash(row)
        self.insert("audit_events", **row)
        self.events.append(row)
        self.connection.execute(
            self.tables.tables["audit_head"].update().values(seq=row["seq"], hash=row["hash"])
        )
