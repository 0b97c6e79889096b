"""People's names for pages: unsealed in batches and remembered for the transaction.

A list page names the same few people on many rows (one sender, one patient's staff).
Looking each row's person up on its own costs a query for the user, one for their data
key and an unwrap, row after row; here a page names everyone it shows with one query (the
users not yet named in this transaction, joined to their data keys), and each name is
unsealed once. The names go with the transaction (commit or rollback), like the
unwrapped keys they come from, so a name shredded meanwhile is not served afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import bindparam, event, select
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from portal.crypto.errors import ContentDestroyed
from portal.models import DataKey, User
from portal.services import accounts, keys

UNKNOWN = "(unknown)"
DELETED_ACCOUNT = "(deleted account)"
_CACHE = "display_names"


def display_names(session: Session, user_ids: Iterable[int]) -> dict[int, str]:
    """Return each user's name for a page: UNKNOWN when no such user, DELETED_ACCOUNT when
    their data key was shredded.

    One query (users joined to their data keys, as plain rows), whatever the number of
    ids, and none for ids already named in this transaction. Raises KeyUnavailable when
    a KEK is missing from the keyring and ContentTampered when a sealed name was altered
    (as ``accounts.display_name`` does).
    """
    wanted = set(user_ids)
    cache: dict[int, str] = session.info.setdefault(_CACHE, {})
    missing = wanted - cache.keys()
    if missing:
        found = session.execute(_NAMED, {"ids": sorted(missing)})
        for row in found:
            cache[row.id] = _unsealed(session, row)
        for user_id in missing - cache.keys():
            cache[user_id] = UNKNOWN
    return {user_id: cache[user_id] for user_id in wanted}


def names_of(session: Session, users: Iterable[User]) -> dict[int, str]:
    """Return the name of each of ``users`` (rows the caller loaded), by user id: one query
    at most (their data keys), none for users already named in this transaction. Raises
    what :func:`display_names` raises."""
    listed = list(users)
    cache: dict[int, str] = session.info.setdefault(_CACHE, {})
    unnamed = [user for user in listed if user.id not in cache]
    keys.prefetch(session, [user.data_key_id for user in unnamed])
    for user in unnamed:
        cache[user.id] = _name(session, user)
    return {user.id: cache[user.id] for user in listed}


def display_name(session: Session, user_id: int) -> str:
    """Return one user's name for a page (see :func:`display_names`); raises what it raises."""
    return display_names(session, [user_id])[user_id]


def _name(session: Session, user: User) -> str:
    try:
        return accounts.display_name(session, user)
    except ContentDestroyed:
        return DELETED_ACCOUNT


_KEY = (DataKey.id.label("key_id"), DataKey.kek_version, DataKey.wrapped)
# Built once (every list page runs it): users joined to their data keys, by id.
_NAMED = (
    select(User.id, User.public_id, User.name_sealed, *_KEY)
    .join(DataKey, DataKey.id == User.data_key_id)
    .where(User.id.in_(bindparam("ids", expanding=True)))
)


def _unsealed(session: Session, row: Row[*tuple[Any, ...]]) -> str:
    """The name in a row of users joined to their keys (the AAD ``accounts`` seals it with)."""
    return unsealed_name(
        session, row.public_id, row.name_sealed, row.key_id, row.kek_version, row.wrapped
    )


def unsealed_name(
    session: Session,
    public_id: str,
    name_sealed: bytes,
    key_id: int,
    kek_version: int,
    wrapped: bytes | None,
) -> str:
    """The name of the user ``public_id`` from columns a query read with the user's data key
    (a list joining its rows' people): DELETED_ACCOUNT when the key was shredded. Raises
    what :func:`display_names` raises."""
    try:
        key = keys.unwrap_loaded(session, key_id, kek_version, wrapped)
    except ContentDestroyed:
        return DELETED_ACCOUNT
    return keys.open_text(key, "users", "name", public_id, name_sealed)


@event.listens_for(Session, "after_commit")
@event.listens_for(Session, "after_soft_rollback")
def _forget_names(session: Session, *_args: object) -> None:
    session.info.pop(_CACHE, None)
