"""The auditor's queries: page through the trail (one statement a page), count, and verify.

Searches read newest first with keyset pagination on ``seq`` (``WHERE seq <
:before``): events appended while an auditor pages get higher numbers, so the
next page neither repeats nor skips anything. A page, the names of its people, its
messages' public ids and the bounded count of matches come back in one statement
(:mod:`portal.services.audit_page`). Names are unsealed for display only (never stored in the
trail), served by a per-process cache that checks what each was opened from
(:mod:`portal.services.audit_names`); a shredded user shows as ``(unavailable)``.
The filters and their parsing live in :mod:`portal.services.audit_filters`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from portal import audit
from portal.audit import Action, Actor, Outcome, RequestMeta, Verification
from portal.models import AuditEvent, Message
from portal.services import audit_page
from portal.services.audit_filters import (
    DAY_RANGE_HINT,
    EARLIEST_DAY,
    EVENT_COLUMNS,
    LATEST_DAY,
    MAX_SEQ,
    AuditFilter,
    conditions,
    filter_params,
    from_args,
    parse_seq,
    parse_time,
    select_events,
)
from portal.services.audit_names import (
    SEALED_WIDTH,
    SYSTEM_NAME,
    UNAVAILABLE_NAME,
    UNKNOWN_NAME,
    USER_CACHE_SIZE,
    Names,
    Person,
    SealedName,
    open_names,
    sealed_of,
)
from portal.services.audit_page import ACTOR_AT, COUNT_LIMIT, EVENT_AT, MESSAGE_AT, PATIENT_AT
from portal.services.errors import ServiceError

__all__ = [  # the filters and names, re-exported: callers import them from here
    "COUNT_LIMIT",
    "DAY_RANGE_HINT",
    "EARLIEST_DAY",
    "EVENT_COLUMNS",
    "LATEST_DAY",
    "MAX_SEQ",
    "SYSTEM_NAME",
    "UNAVAILABLE_NAME",
    "UNKNOWN_NAME",
    "USER_CACHE_SIZE",
    "AuditFilter",
    "EventRow",
    "Names",
    "Page",
    "bounded_count",
    "conditions",
    "count",
    "from_args",
    "parse_seq",
    "parse_time",
    "record_search",
    "search",
    "select_events",
    "to_rows",
    "verify_and_record",
    "verify_from_head",
]

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
_HEX64 = re.compile(r"[0-9a-f]{64}")


class EventRow(NamedTuple):
    """One event as an auditor reads it: stored fields plus unsealed names and public ids.

    A named tuple (immutable like a frozen dataclass, and several times cheaper to make: a
    page makes fifty). ``details`` parses the stored text when read; a page never shows it.
    """

    seq: int
    occurred_at: datetime
    actor_id: int | None
    actor_role: str | None
    actor_name: str
    action: str
    outcome: str
    target_type: str | None
    target_id: str | None
    patient_id: int | None
    patient_name: str | None
    message_id: int | None
    client_ip: str | None
    user_agent: str | None
    request_id: str | None
    details_text: str  # canonical JSON, as stored and hashed
    prev_hash: str
    hash: str
    actor_public_id: str | None = None
    patient_public_id: str | None = None
    message_public_id: str | None = None

    @property
    def details(self) -> dict[str, Any]:
        """The event's details, parsed from the stored text on each read."""
        parsed: dict[str, Any] = json.loads(self.details_text)
        return parsed


@dataclass(frozen=True)
class Page:
    """One page of results, newest first; ``next_before`` feeds the next call (None: last)."""

    rows: list[EventRow]
    next_before: int | None
    total: int
    more: bool = False  # True: more than ``total`` (COUNT_LIMIT) events match; counting stopped


def search(
    session: Session,
    flt: AuditFilter,
    *,
    before_seq: int | None = None,
    limit: int = DEFAULT_LIMIT,
    count_limit: int = COUNT_LIMIT,
) -> Page:
    """Return one page of events matching ``flt``, newest first (``seq`` below ``before_seq``).

    Keyset pagination: pass the page's ``next_before`` to get the next one. One
    statement (:mod:`portal.services.audit_page`) and no per-user query or unwrap for
    names the cache holds. ``total`` counts every match, whatever the page, up to
    ``count_limit``; past it ``total`` is ``count_limit`` and ``more`` is True (see
    :func:`bounded_count`). Raises ServiceError for a limit outside 1..MAX_LIMIT.
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise ServiceError(f"Show between 1 and {MAX_LIMIT} events per page.")
    stmt, params = audit_page.page_query(
        session, flt, before_seq=before_seq, limit=limit + 1, count_limit=count_limit
    )
    raw = session.connection().execute(stmt, params).all()
    found = [row for row in raw if row[EVENT_AT] is not None]
    rows = _page_rows(found[:limit])
    next_before = rows[-1].seq if len(found) > limit else None
    return Page(rows, next_before, *_total(int(raw[0][0]), flt, count_limit))


def _total(matched: int, flt: AuditFilter, count_limit: int) -> tuple[int, bool]:
    # Without a filter the count is exact (the trail's length), never capped.
    if matched > count_limit and filter_params(flt):
        return count_limit, True
    return matched, False


def _page_rows(raw: Sequence[Any]) -> list[EventRow]:
    """EventRows of page rows (audit_page.page_query): names opened in one pass, no query."""
    sealed: dict[int, SealedName | None] = {}
    for row in raw:
        for user_id, at in ((row[EVENT_AT + 2], ACTOR_AT), (row[EVENT_AT + 8], PATIENT_AT)):
            if user_id is not None and user_id not in sealed:
                sealed[user_id] = sealed_of(row[at : at + SEALED_WIDTH])
    people = open_names(sealed)
    messages = {row[EVENT_AT + 9]: row[MESSAGE_AT] for row in raw if row[MESSAGE_AT]}
    return [_event_row(row[EVENT_AT:ACTOR_AT], people, messages) for row in raw]


def bounded_count(session: Session, flt: AuditFilter, limit: int = COUNT_LIMIT) -> tuple[int, bool]:
    """Return ``(n, more)`` as a page counts: n events match ``flt`` (``more`` False), or
    more than ``limit`` do (``(limit, True)``). Reads at most ``limit + 1`` matches; without
    a filter, none (the trail's length is its highest ``seq``)."""
    stmt, params = audit_page.count_query(flt, limit)
    return _total(int(session.scalar(stmt, params) or 0), flt, limit)


def message_public_ids(session: Session, message_ids: Iterable[int | None]) -> dict[int, str]:
    """Return {message id: public id} for the ids given (one query)."""
    wanted = {i for i in message_ids if i is not None}
    if not wanted:
        return {}
    rows = session.execute(select(Message.id, Message.public_id).where(Message.id.in_(wanted)))
    return {int(mid): str(pid) for mid, pid in rows}


def to_rows(
    session: Session, raw: Sequence[Any], names: Names, *, public_ids: bool = True
) -> list[EventRow]:
    """Return EventRows for rows of :data:`EVENT_COLUMNS`, resolving names in batches.

    ``public_ids=False`` skips the message public id lookup (CSV and JSON exports).
    """
    names.prefetch(id_ for row in raw for id_ in (row[2], row[8]))
    people = {id_: names.user(id_) for row in raw for id_ in (row[2], row[8]) if id_ is not None}
    messages = message_public_ids(session, (row[9] for row in raw)) if public_ids else {}
    return [_event_row(row, people, messages) for row in raw]


def _person(people: Mapping[int, Person], user_id: int | None) -> Person:
    return (None, SYSTEM_NAME) if user_id is None else people[user_id]


def _event_row(row: Any, people: Mapping[int, Person], messages: Mapping[int, str]) -> EventRow:
    """The EventRow of one row of :data:`EVENT_COLUMNS` (seq ... hash, in that order)."""
    actor_id, patient_id, message_id = row[2], row[8], row[9]
    actor_public, actor_name = _person(people, actor_id)
    patient_public, patient_name = _person(people, patient_id) if patient_id else (None, None)
    message_public = messages.get(message_id) if message_id else None
    # In EventRow's field order, made in one step: a page makes fifty of these.
    return EventRow._make(
        (
            *row[:4],  # seq, occurred_at, actor_id, actor_role
            actor_name,
            *row[4:9],  # action, outcome, target_type, target_id, patient_id
            patient_name,
            *row[9:13],  # message_id, client_ip, user_agent, request_id
            row[13] or "{}",  # details_text
            row[14],  # prev_hash
            row[15],  # hash
            actor_public,
            patient_public,
            message_public,
        )
    )


def count(session: Session, flt: AuditFilter) -> int:
    """Return how many events match ``flt``, exactly: every match is read (pages use
    :func:`bounded_count`, which stops at a bound)."""
    stmt = select(func.count()).select_from(AuditEvent).where(*conditions(flt))
    return int(session.scalar(stmt) or 0)


def record_search(
    session: Session, flt: AuditFilter, actor: Actor, meta: RequestMeta
) -> AuditEvent:
    """Audit a search (the filters, never the results) in the caller's transaction; return it.

    The event carries the filtered patient's id, so "who looked at this
    patient's trail" is itself searchable.
    """
    return audit.record(
        session,
        Action.AUDIT_SEARCH,
        actor=actor,
        meta=meta,
        patient_id=flt.patient_id,
        details=flt.to_details(),
    )


def verify_from_head(session: Session, head_hash: str) -> Verification:
    """Verify the whole chain and that a previously noted head hash is still in it.

    A head noted earlier (printed by ``portal audit verify``, kept off the
    database host) pins all history before it: rewriting any earlier event
    changes that event's hash, or breaks the chain. Returns the chain's
    Verification, or one with ``ok`` False when the noted head is absent.
    Raises ServiceError when ``head_hash`` is not 64 hex characters.
    """
    noted = head_hash.strip().lower()
    if not _HEX64.fullmatch(noted):
        raise ServiceError("The noted head must be 64 hexadecimal characters (a SHA-256).")
    result = audit.verify(session)
    if not result.ok or noted == audit.GENESIS_HASH:  # the genesis pins nothing: always there
        return result
    found = session.scalar(select(AuditEvent.seq).where(AuditEvent.hash == noted).limit(1))
    if found is None:
        return Verification(
            False,
            result.count,
            result.head_hash,
            result.head_time,
            None,
            f"the noted head {noted[:12]} is not in the trail (history rewritten?)",
        )
    return result


def verify_and_record(
    session: Session, head_hash: str | None, actor: Actor, meta: RequestMeta
) -> Verification:
    """Verify the chain (against a noted head when given), audit the check (audit.verify,
    failure when the chain is broken) and return the Verification. Raises ServiceError,
    auditing nothing, when ``head_hash`` is malformed."""
    result = verify_from_head(session, head_hash) if head_hash else audit.verify(session)
    audit.record(
        session,
        Action.AUDIT_VERIFY,
        actor=actor,
        meta=meta,
        outcome=Outcome.SUCCESS if result.ok else Outcome.FAILURE,
        details={"count": result.count, "from_head": bool(head_hash)},
    )
    return result
