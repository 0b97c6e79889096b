"""Data keys: create, unwrap, destroy; and sealing of PHI columns with them.

Every message and every user has its own 256-bit data key, stored only
wrapped by the keyring's active key-encryption key (KEK) with the KEK's
version recorded. Destroying the wrapped key makes everything sealed under it
unrecoverable (crypto-shredding).
"""

from __future__ import annotations

from flask import current_app
from sqlalchemy.orm import Session

from portal.crypto.errors import ContentDestroyed
from portal.crypto.fields import field_aad, open_sealed, seal
from portal.crypto.keyring import Keyring
from portal.database import utcnow
from portal.models import DataKey

WRAP_AAD = b"pickup-portal/data-key/v1"


def keyring() -> Keyring:
    """Return the current app's keyring, created on first use in the embedded default.

    Raises portal.crypto.errors.KeyUnavailable when the keyring file is unreadable.
    """
    ring = current_app.extensions.get("keyring")
    if ring is None:
        ring = Keyring.load_or_create(current_app.config["KEYRING_PATH"])
        current_app.extensions["keyring"] = ring
    return ring


def create(session: Session, purpose: str) -> tuple[DataKey, bytes]:
    """Return a new data key row (flushed) and the raw key, wrapped under the active KEK."""
    raw = Keyring.new_data_key()
    version, wrapped = keyring().wrap(raw, WRAP_AAD)
    row = DataKey(purpose=purpose, kek_version=version, wrapped=wrapped)
    session.add(row)
    session.flush()
    return row, raw


def unwrap(session: Session, data_key_id: int) -> bytes:
    """Return the raw data key of ``data_key_id``.

    Raises ContentDestroyed when it was shredded, KeyUnavailable when its KEK is
    missing from the keyring, ContentTampered when the wrapped key was altered.
    """
    row = session.get(DataKey, data_key_id)
    if row is None or row.wrapped is None:
        raise ContentDestroyed("the data key was destroyed")
    return keyring().unwrap(row.kek_version, row.wrapped, WRAP_AAD)


def destroy(session: Session, data_key_id: int) -> None:
    """Destroy a data key for good (crypto-shredding); idempotent. The caller audits it."""
    row = session.get(DataKey, data_key_id)
    if row is not None and row.wrapped is not None:
        row.wrapped = None
        row.destroyed_at = utcnow()
        session.flush()


def seal_text(key: bytes, table: str, column: str, row_id: str, value: str) -> bytes:
    """Return ``value`` sealed under ``key``, bound to ``table``.``column`` of row ``row_id``."""
    return seal(key, value.encode("utf-8"), field_aad(table, column, row_id))


def open_text(key: bytes, table: str, column: str, row_id: str, sealed: bytes) -> str:
    """Return the text sealed by :func:`seal_text`; raises ContentTampered if altered or moved."""
    return open_sealed(key, sealed, field_aad(table, column, row_id)).decode("utf-8")
