"""Column helpers shared by the models."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import BigInteger, Integer, LargeBinary
from sqlalchemy.orm import mapped_column
from sqlalchemy.types import TypeDecorator

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets BIGINT.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Sealed(TypeDecorator[bytes]):
    """Ciphertext of a PHI value, sealed by portal.crypto.fields before it reaches here.

    Refuses ``str`` so no code path can store PHI as plaintext by accident; the
    services seal with the owning message's (or user's) data key and an AAD
    that binds the value to its table, column and row.
    """

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> bytes | None:
        if value is not None and not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError("PHI columns take sealed bytes, never plaintext")
        return None if value is None else bytes(value)


def sealed_column(nullable: bool = True) -> Any:
    """Return a mapped column for a sealed PHI value, marked ``info['phi']``."""
    return mapped_column(Sealed(), nullable=nullable, info={"phi": True})


def new_public_id() -> str:
    """Return a random public identifier (32 hex characters) that says nothing about its row."""
    return uuid.uuid4().hex
