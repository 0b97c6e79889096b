"""Data keys: create, unwrap, destroy; and sealing of PHI columns with them.

Every message and every user has its own 256-bit data key, stored only
wrapped by the keyring's active key-encryption key (KEK) with the KEK's
version recorded. Destroying the wrapped key makes everything sealed under it
unrecoverable (crypto-shredding).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from flask import current_app
from sqlalchemy import event, func, select, true
from sqlalchemy.orm import Session

from portal import audit
from portal.audit import Action, Actor, Outcome, RequestMeta
from portal.config import current_settings
from portal.crypto.errors import ContentDestroyed, ContentTampered, KeyUnavailable
from portal.crypto.fields import field_aad, open_sealed, seal
from portal.crypto.keyring import Keyring, file_identity
from portal.database import utcnow
from portal.models import AuditEvent, DataKey
from portal.services.errors import ServiceError

WRAP_AAD = b"pickup-portal/data-key/v1"
ROTATION_PASSES = 3  # passes over the keys; a later one retries keys that were locked


@dataclass(frozen=True)
class RotationResult:
    """What a rotation did: the active KEK version, keys rewrapped, whether it resumed.

    ``failed`` holds the ids of data keys that could not be unwrapped (corrupted
    or altered); they stay under their old KEK, each with an audit event.
    ``left`` counts other keys still under an older KEK after every pass (held
    locked by other transactions throughout); rerun to finish them.
    """

    version: int
    rewrapped: int
    resumed: bool
    failed: tuple[int, ...] = ()
    left: int = 0  # live keys still under an older KEK (locked by other writers throughout)


def keyring() -> Keyring:
    """Return the current app's keyring, created on first use in the embedded default.

    Cached by the file's identity (device, inode, modification and change times, size):
    one ``stat`` per call, and the file is read again only when it changed (another
    process rotated, or an operator restored a copy). A page's unwraps go through
    :func:`unwrap`, which asks here once per transaction. Raises
    portal.crypto.errors.KeyUnavailable when the keyring file is unreadable.
    """
    path = Path(current_settings().keyring_path)
    cached: Keyring | None = current_app.extensions.get("keyring")
    if (
        cached is not None
        and cached.path == path
        and cached.identity is not None  # made here, never read: read it once
        and file_identity(path) == cached.identity
    ):
        return cached
    ring = Keyring.load_or_create(path)
    current_app.extensions["keyring"] = ring
    return ring


def create(session: Session, purpose: str, raw: bytes | None = None) -> tuple[DataKey, bytes]:
    """Return a new data key row (flushed) and the raw key, wrapped under the active KEK.

    ``raw``: a key made already (``Keyring.new_data_key``), for content encrypted
    before its row existed (``services.uploads.Staging``); otherwise a fresh one.
    """
    raw = raw or Keyring.new_data_key()
    version, wrapped = keyring().wrap(raw, WRAP_AAD)
    row = DataKey(purpose=purpose, kek_version=version, wrapped=wrapped)
    session.add(row)
    session.flush()
    return row, raw


def unwrap(session: Session, data_key_id: int) -> bytes:
    """Return the raw data key of ``data_key_id``.

    Each key is unwrapped once per transaction (then served from memory), with the
    keyring the transaction first asked for; a key wrapped under a KEK that keyring
    lacks (a rotation committed since) asks for the keyring again once. Raises
    ContentDestroyed when it was shredded, KeyUnavailable when its KEK is missing from
    the keyring, ContentTampered when the wrapped key was altered.
    """
    cache: dict[int, bytes] = session.info.get(_CACHE, {})
    if data_key_id in cache:
        return cache[data_key_id]
    held: dict[int, DataKey] = session.info.get(_ROWS, {})
    row = held.get(data_key_id) or session.get(DataKey, data_key_id)
    if row is None:
        raise ContentDestroyed("the data key was destroyed")
    return unwrap_loaded(session, row.id, row.kek_version, row.wrapped)


def unwrap_loaded(
    session: Session, data_key_id: int, kek_version: int, wrapped: bytes | None
) -> bytes:
    """Return the raw data key of the ``data_keys`` row the caller already read (a list
    joins its rows' keys into its own query): ``data_key_id``, ``kek_version`` and
    ``wrapped`` must be that row's. Remembered like :func:`unwrap`'s; raises what it raises.
    """
    cache: dict[int, bytes] = session.info.setdefault(_CACHE, {})
    if data_key_id in cache:
        return cache[data_key_id]
    if wrapped is None:
        raise ContentDestroyed("the data key was destroyed")
    ring = _ring(session)
    try:
        key = ring.unwrap(kek_version, wrapped, WRAP_AAD)
    except KeyUnavailable:
        fresh = session.info[_RING] = keyring()
        if fresh is ring:
            raise
        key = fresh.unwrap(kek_version, wrapped, WRAP_AAD)
    cache[data_key_id] = key
    return key


def prefetch(session: Session, data_key_ids: Iterable[int]) -> None:
    """Load the data key rows of ``data_key_ids`` in one query (none when all are unwrapped
    already), so that :func:`unwrap` of each needs no query of its own. Returns None;
    raises nothing of ours (a missing or destroyed key is :func:`unwrap`'s to report)."""
    cache: dict[int, bytes] = session.info.get(_CACHE, {})
    held: dict[int, DataKey] = session.info.setdefault(_ROWS, {})
    missing = {i for i in data_key_ids if i not in cache and i not in held}
    if missing:
        # Held for the transaction: the identity map alone keeps rows only weakly.
        held.update(
            (row.id, row) for row in session.scalars(select(DataKey).where(DataKey.id.in_(missing)))
        )


def _ring(session: Session) -> Keyring:
    """The keyring this transaction unwraps with (one ``stat`` of the file per transaction)."""
    ring: Keyring | None = session.info.get(_RING)
    if ring is None:
        ring = session.info[_RING] = keyring()
    return ring


# Unwrapped keys are remembered for one transaction only (a page or a notice reads the same
# key several times); the cache goes at commit and rollback, so a key destroyed by another
# transaction is never served from it afterwards. The keyring the transaction unwraps with
# goes with it, so the next transaction sees a rotation at once.
_CACHE = "unwrapped_data_keys"
_ROWS = "prefetched_data_keys"
_RING = "transaction_keyring"


@event.listens_for(Session, "after_commit")
@event.listens_for(Session, "after_soft_rollback")
def _forget_keys(session: Session, *_args: object) -> None:
    for name in (_CACHE, _ROWS, _RING):
        session.info.pop(name, None)


def status(session: Session) -> dict[int, int]:
    """Return the number of live (not destroyed) data keys per KEK version."""
    rows = session.execute(
        select(DataKey.kek_version, func.count())
        .where(DataKey.wrapped.is_not(None))
        .group_by(DataKey.kek_version)
    )
    return {int(version): int(count) for version, count in rows}


def rotate(
    session: Session,
    *,
    actor: Actor,
    meta: RequestMeta,
    checkpoint: Callable[[], None],
    batch_size: int = 500,
    after_batch: Callable[[int], None] | None = None,
) -> RotationResult:
    """Make a new KEK active and rewrap every live data key under it, in checkpointed batches.

    Resumable: when live keys are still wrapped by older versions (a rotation
    that crashed, or keys that failed before), no new version is made and the
    rewrapping carries on. Content is never re-encrypted. A wrapped key that
    fails authentication is skipped, audited and listed in the result's
    ``failed``; the others are still rewrapped. A long job commits per batch by
    design, but services never commit: ``checkpoint`` is the caller's commit (the
    ``portal keys rotate`` command passes the session's), called after the intent,
    the start and each batch, so each batch and its audit events land together;
    ``after_batch`` (tests) runs after each checkpoint. Raises KeyUnavailable when a
    key's KEK is missing from the keyring.

    A new KEK's ``intent`` event commits before the keyring file changes, so a crash
    between the two leaves a record of a key the trail would otherwise never name; a
    rerun after an intent whose KEK exists resumes instead of adding another.
    """
    ring = keyring()
    resumed = any(version != ring.active_version for version in status(session)) or _intent_pending(
        session, ring.active_version
    )
    if not resumed:
        _audit_rotation(session, actor, meta, max(ring.versions()) + 1, {"stage": "intent"})
        checkpoint()  # on record before the keyring changes (NIST SP 800-57 Part 1)
        ring.add_version()
    target, total, after = ring.active_version, 0, 0
    failed: list[int] = []
    _audit_rotation(session, actor, meta, target, {"stage": "start", "resumed": resumed})
    checkpoint()
    for _pass in range(ROTATION_PASSES):  # a later pass takes keys another writer had locked
        after = 0
        while batch := _next_batch(session, target, after, batch_size, failed):
            after = batch[-1].id
            bad = _rewrap_batch(session, ring, batch, actor, meta)
            total, failed = total + len(batch) - len(bad), failed + bad
            _audit_rotation(
                session,
                actor,
                meta,
                target,
                {"stage": "batch", "rewrapped": len(batch) - len(bad), "failed": len(bad)},
            )
            checkpoint()
            if after_batch:
                after_batch(total)
        left = _left_behind(session, target, failed)
        if not left:
            break
    return RotationResult(target, total, resumed, tuple(failed), left)


def _intent_pending(session: Session, active: int) -> bool:
    """Whether the newest rotation event is the intent for the active KEK (no start after it)."""
    last = session.scalars(
        select(AuditEvent)
        .where(AuditEvent.action == Action.KEY_ROTATE)
        .order_by(AuditEvent.seq.desc())
        .limit(1)
    ).first()
    return (
        last is not None
        and last.target_id == str(active)
        and json.loads(last.details or "{}").get("stage") == "intent"
    )


def _left_behind(session: Session, target: int, failed: list[int]) -> int:
    """How many live keys, not known bad, are still under an older KEK."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(DataKey)
            .where(
                DataKey.wrapped.is_not(None),
                DataKey.kek_version != target,
                DataKey.id.not_in(failed) if failed else true(),
            )
        )
        or 0
    )


def _audit_rotation(
    session: Session, actor: Actor, meta: RequestMeta, target: int, details: dict[str, object]
) -> None:
    audit.record(
        session,
        Action.KEY_ROTATE,
        actor=actor,
        meta=meta,
        target_type="keyring",
        target_id=str(target),
        details=details,
    )


def _next_batch(
    session: Session, target: int, after: int, size: int, failed: list[int]
) -> list[DataKey]:
    # Keyset paging (id > the last one seen); keys that failed are never picked up again.
    return list(
        session.scalars(
            select(DataKey)
            .where(
                DataKey.wrapped.is_not(None),
                DataKey.kek_version != target,
                DataKey.id > after,
                DataKey.id.not_in(failed) if failed else true(),
            )
            .order_by(DataKey.id)
            .limit(size)
            .with_for_update(skip_locked=True)
        )
    )


def _rewrap_batch(
    session: Session, ring: Keyring, rows: list[DataKey], actor: Actor, meta: RequestMeta
) -> list[int]:
    """Rewrap ``rows`` under the active KEK; return the ids of those that failed (audited)."""
    failed: list[int] = []
    for row in rows:
        assert row.wrapped is not None
        try:
            row.kek_version, row.wrapped = ring.rewrap(row.kek_version, row.wrapped, WRAP_AAD)
        except ContentTampered:
            failed.append(row.id)
            audit.record(
                session,
                Action.KEY_REWRAP_FAILED,
                actor=actor,
                meta=meta,
                outcome=Outcome.FAILURE,
                target_type="data_key",
                target_id=str(row.id),
                details={"kek_version": row.kek_version, "purpose": row.purpose},
            )
    session.flush()
    return failed


def remove_kek(session: Session, version: int) -> None:
    """Delete KEK ``version`` from the keyring (dangerous: irreversible).

    Raises ServiceError while any live data key is still wrapped by it, or when
    it is the active version.
    """
    if version == keyring().active_version:
        raise ServiceError(f"KEK version {version} is the active one; rotate first.")
    still = status(session).get(version, 0)
    if still:
        raise ServiceError(
            f"KEK version {version} still wraps {still} data keys; run 'portal keys rotate' first."
        )
    try:
        keyring().remove_version(version)
    except ValueError as error:
        raise ServiceError(str(error)) from None


def destroy(session: Session, data_key_id: int) -> None:
    """Destroy a data key for good (crypto-shredding); idempotent. The caller audits it."""
    session.info.get(_CACHE, {}).pop(data_key_id, None)
    session.info.get(_ROWS, {}).pop(data_key_id, None)
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
