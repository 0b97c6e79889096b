"""People's names in the audit trail: opened in one pass, remembered in a bounded per-process LRU.

An auditor's page names up to two people per event (actor and patient), and the same
few hundred people fill most pages. Opening a name costs an unwrap of the user's data
key under the KEK and an open of the sealed name; done for every distinct user of every
page, that was most of a page's time. So names are kept, per process, in a bounded LRU
(:class:`NameCache`) keyed by user id, each with *everything it was opened from*: public
id, data key id, KEK version, wrapped key and sealed name. The query that reads the
events returns those columns with each row (a join by primary key), and an entry serves
only while they are all unchanged and the keyring still holds that KEK version. So a
renamed user (a new sealed name), a rewrapped or replaced key, a shredded key (the entry
is dropped) or a KEK removed from the keyring is never answered from memory, whichever
process made the change; nothing has to remember to invalidate the cache.

What stays in memory is at most NAME_CACHE_SIZE names (PHI, like everything a worker
holds while it serves); a user whose key is shredded is forgotten the next time a page or
export reads that user's row; until then the plaintext may sit in the cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from flask import current_app
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import AliasedClass

from portal.crypto.errors import CryptoError
from portal.crypto.keyring import Keyring
from portal.models import DataKey, User
from portal.services import keys

NAME_CACHE_SIZE = 10_000  # names per process (~6 MiB): the people auditors' pages show
USER_CACHE_SIZE = 10_000  # bounds memory of a long export; one entry per distinct user
SYSTEM_NAME = "system"
UNAVAILABLE_NAME = "(unavailable)"  # key shredded or its KEK missing: the name is gone
UNKNOWN_NAME = "(unknown)"  # an id no user row carries
_EXTENSION = "audit_name_cache"  # app.extensions: one cache per app (per process)

Person = tuple[str | None, str]  # (public id, display name)


class SealedName(NamedTuple):
    """What a user's name is opened from, as the database holds it now.

    Two are equal only when the name, its data key and the key's wrapping are unchanged
    (a tuple: made and compared in C, a page reads a hundred).
    """

    public_id: str
    data_key_id: int
    kek_version: int | None  # None: the data key row is missing
    wrapped: bytes | None  # None: the data key was destroyed (crypto-shredded)
    name_sealed: bytes


class NameCache:
    """A bounded, thread-safe LRU: user id -> (the SealedName it was opened from, the name)."""

    def __init__(self, size: int = NAME_CACHE_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[int, tuple[SealedName, str]] = OrderedDict()
        self._lock = threading.Lock()  # gthread workers share one process's cache
        self.opened = 0  # names opened into the cache since it was made (tests, benchmark)

    def get(self, user_id: int, sealed: SealedName) -> str | None:
        """Return the name cached for ``user_id`` if it was opened from ``sealed``, else None."""
        return self.get_many({user_id: sealed}).get(user_id)

    def get_many(self, wanted: Mapping[int, SealedName]) -> dict[int, str]:
        """Return {user id: name} for those of ``wanted`` cached from the same SealedName."""
        found: dict[int, str] = {}
        with self._lock:
            for user_id, sealed in wanted.items():
                entry = self._entries.get(user_id)
                if entry is not None and entry[0] == sealed:
                    self._entries.move_to_end(user_id)
                    found[user_id] = entry[1]
        return found

    def put(self, user_id: int, sealed: SealedName, name: str) -> None:
        """Remember ``name`` as opened from ``sealed``, dropping the least recently used."""
        self.put_many({user_id: (sealed, name)})

    def put_many(self, opened: Mapping[int, tuple[SealedName, str]]) -> None:
        """Remember each (SealedName, name), dropping the least recently used past the bound."""
        with self._lock:
            for user_id, entry in opened.items():
                self.opened += 1
                self._entries[user_id] = entry
                self._entries.move_to_end(user_id)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def forget(self, user_id: int) -> None:
        """Drop ``user_id``'s entry, if any."""
        with self._lock:
            self._entries.pop(user_id, None)

    def clear(self) -> None:
        """Drop every entry (the benchmark's cold figures)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def name_cache() -> NameCache:
    """Return the current app's name cache, made on first use (one per app and process)."""
    cache: NameCache | None = current_app.extensions.get(_EXTENSION)
    if cache is None:
        cache = current_app.extensions.setdefault(_EXTENSION, NameCache())
    return cache


def sealed_columns(
    user: type[User] | AliasedClass[User], key: type[DataKey] | AliasedClass[DataKey]
) -> tuple[Any, ...]:
    """Return the columns :func:`sealed_of` reads, for ``user`` outer-joined to its ``key``."""
    return (
        user.id,
        user.public_id,
        user.data_key_id,
        key.kek_version,
        key.wrapped,
        user.name_sealed,
    )


SEALED_WIDTH = 6  # len(sealed_columns(...))


def sealed_of(values: Sequence[Any]) -> SealedName | None:
    """Return the SealedName in :func:`sealed_columns` values, None when no user row matched."""
    if values[0] is None:  # the user id: no row
        return None
    return SealedName._make(values[1:])  # public_id, data_key_id, kek_version, wrapped, name


def open_names(sealed: Mapping[int, SealedName | None]) -> dict[int, Person]:
    """Return {user id: (public id, name)} for the users given (None: no such user).

    Cached names serve when what they were opened from is unchanged; the others are
    opened here, with the keyring loaded once. No query. A user without a row is
    ``(None, UNKNOWN_NAME)``; a shredded key, a missing KEK, an unreadable keyring or a
    sealed name that fails authentication give UNAVAILABLE_NAME. Raises nothing of ours.
    """
    out: dict[int, Person] = {}
    live: dict[int, SealedName] = {}
    cache = name_cache()
    for user_id, found in sealed.items():
        if found is None:
            out[user_id] = (None, UNKNOWN_NAME)
        elif found.wrapped is None or found.kek_version is None:
            cache.forget(user_id)  # shredded: its plaintext goes too
            out[user_id] = (found.public_id, UNAVAILABLE_NAME)
        else:
            live[user_id] = found
    if live:
        out.update(_open_live(cache, live))
    return out


def _open_live(cache: NameCache, live: Mapping[int, SealedName]) -> dict[int, Person]:
    ring = _keyring()
    versions = frozenset(ring.versions()) if ring is not None else frozenset()
    known = cache.get_many(live)
    opened: dict[int, tuple[SealedName, str]] = {}
    out: dict[int, Person] = {}
    for user_id, sealed in live.items():
        name = known.get(user_id)
        if ring is None or sealed.kek_version not in versions:
            name = UNAVAILABLE_NAME  # the KEK is gone: a cached name must not outlive it
        elif name is None:
            name = _open(ring, sealed)
            if name != UNAVAILABLE_NAME:
                opened[user_id] = (sealed, name)
        out[user_id] = (sealed.public_id, name)
    cache.put_many(opened)
    return out


def _keyring() -> Keyring | None:
    try:
        return keys.keyring()
    except CryptoError:  # unreadable keyring: every name is unavailable, as when opened alone
        return None


def _open(ring: Keyring, sealed: SealedName) -> str:
    """The name unsealed, or UNAVAILABLE_NAME when the key or the name fails to open."""
    if sealed.kek_version is None or sealed.wrapped is None:
        return UNAVAILABLE_NAME
    try:
        key = ring.unwrap(sealed.kek_version, sealed.wrapped, keys.WRAP_AAD)
        return keys.open_text(key, "users", "name", sealed.public_id, sealed.name_sealed)
    except CryptoError:  # tampered key or name: never cached, so it is checked every time
        return UNAVAILABLE_NAME


def load_names(session: Session, user_ids: Iterable[int]) -> dict[int, Person]:
    """Return {user id: (public id, name)} for ``user_ids`` with one query (users and keys).

    Names as :func:`open_names` gives them. Raises nothing of ours.
    """
    wanted = set(user_ids)
    if not wanted:
        return {}
    stmt = (
        select(*sealed_columns(User, DataKey))
        .outerjoin(DataKey, DataKey.id == User.data_key_id)
        .where(User.id.in_(wanted))
    )
    found: dict[int, SealedName | None] = dict.fromkeys(wanted)
    for row in session.execute(stmt):
        found[row[0]] = sealed_of(row)
    return open_names(found)


class Names:
    """Names for a stream of events (an export): loaded in batches, kept for the stream.

    Bounded (USER_CACHE_SIZE, oldest dropped first) so a long export's memory stays flat.
    """

    def __init__(self, session: Session, max_users: int = USER_CACHE_SIZE) -> None:
        self.session = session
        self.max_users = max_users
        self._users: dict[int, Person] = {}

    def user(self, user_id: int | None) -> Person:
        """Return (public id, display name) of ``user_id``; ``(None, "system")`` for None."""
        if user_id is None:
            return None, SYSTEM_NAME
        found = self._users.get(user_id)
        if found is None:
            self.prefetch([user_id])
            found = self._users[user_id]
        return found

    def prefetch(self, user_ids: Iterable[int | None]) -> None:
        """Load the users not held yet with one query (see :func:`load_names`)."""
        missing = {i for i in user_ids if i is not None and i not in self._users}
        for user_id, person in load_names(self.session, missing).items():
            self._users[user_id] = person
        while len(self._users) > self.max_users:
            del self._users[next(iter(self._users))]
