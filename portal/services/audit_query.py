"""The auditor's queries: filter and page through the trail, and verify it against a noted head.

Searches read newest first with keyset pagination on ``seq`` (``WHERE seq <
:before``): events appended while an auditor pages get higher numbers, so the
next page neither repeats nor skips anything. Names are unsealed for display
only (never stored in the trail); a shredded user shows as ``(unavailable)``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any

from sqlalchemy import ColumnElement, Select, func, select
from sqlalchemy.orm import Session

from portal import audit
from portal.audit import Action, Actor, Outcome, RequestMeta, Verification
from portal.crypto.errors import CryptoError
from portal.models import AuditEvent, DataKey, Message, User
from portal.services import accounts
from portal.services.errors import ServiceError

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
SYSTEM_NAME = "system"
UNAVAILABLE_NAME = "(unavailable)"  # key shredded or its KEK missing: the name is gone
UNKNOWN_NAME = "(unknown)"  # an id no user row carries
USER_CACHE_SIZE = 10_000  # bounds memory of a long export; one entry per distinct user
_ACTION_FILTER = re.compile(r"[a-z][a-z_]*(\.[a-z_]+)*\.?")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DIGITS = re.compile(r"[0-9]{1,19}")  # ASCII only: int() would also take "١٢" and "1_0"
# Dates an auditor or a patient may type. The trail cannot hold events outside them, and
# the bounds keep day arithmetic (until + 1 day) and the database far from their limits.
EARLIEST_DAY = date(2000, 1, 1)
LATEST_DAY = date(2100, 12, 31)
DAY_RANGE_HINT = f"between {EARLIEST_DAY.isoformat()} and {LATEST_DAY.isoformat()}"
MAX_SEQ = 2**63 - 1  # BIGINT: a larger number would be a database error, not "no events"

EVENT_COLUMNS = (
    AuditEvent.seq,
    AuditEvent.occurred_at,
    AuditEvent.actor_id,
    AuditEvent.actor_role,
    AuditEvent.action,
    AuditEvent.outcome,
    AuditEvent.target_type,
    AuditEvent.target_id,
    AuditEvent.patient_id,
    AuditEvent.message_id,
    AuditEvent.client_ip,
    AuditEvent.user_agent,
    AuditEvent.request_id,
    AuditEvent.details,
    AuditEvent.prev_hash,
    AuditEvent.hash,
)


@dataclass(frozen=True)
class AuditFilter:
    """What an auditor searches for; ``None`` means any. Times are UTC, ``[since, until)``.

    ``action`` matches exactly, or as a prefix when it ends with ``.`` (``"auth."``).
    """

    patient_id: int | None = None
    actor_id: int | None = None
    action: str | None = None
    outcome: str | None = None
    message_id: int | None = None
    client_ip: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def to_details(self) -> dict[str, object]:
        """Return the filters that are set as short scalars, fit for audit event details."""
        out: dict[str, object] = {}
        for name in ("patient_id", "actor_id", "action", "outcome", "message_id", "client_ip"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        for name in ("since", "until"):
            moment = getattr(self, name)
            if moment is not None:
                out[name] = _short_time(moment)
        return out


def _short_time(moment: datetime) -> str:
    moment = moment.astimezone(UTC)
    if moment.time() == time(0):
        return moment.date().isoformat()
    return moment.isoformat().replace("+00:00", "Z")


def parse_time(raw: str, label: str) -> datetime:
    """Return ``raw`` (``YYYY-MM-DD`` = midnight UTC, or ISO 8601) as aware UTC.

    A time without an offset is taken as UTC. Raises ServiceError naming
    ``label`` when it does not parse or lies outside EARLIEST_DAY..LATEST_DAY.
    """
    refused = ServiceError(f"{label}: enter a date as YYYY-MM-DD, {DAY_RANGE_HINT}.")
    try:
        if not raw.isascii():
            raise ValueError(raw)
        if len(raw) == 10:
            moment = datetime.combine(date.fromisoformat(raw), time(0), UTC)
        else:
            moment = datetime.fromisoformat(raw)
        if not EARLIEST_DAY <= moment.date() <= LATEST_DAY:
            raise ValueError(raw)
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise refused from None


def parse_seq(raw: str | None, label: str) -> int | None:
    """Return ``raw`` (ASCII digits, 1..MAX_SEQ) as an event number, None when blank.

    Raises ServiceError naming ``label`` for anything else (signs, other digits, too large).
    """
    if raw is None or raw == "":
        return None
    if not _DIGITS.fullmatch(raw) or not 1 <= int(raw) <= MAX_SEQ:
        raise ServiceError(f"{label}: enter a whole number from 1 to {MAX_SEQ}.")
    return int(raw)


def _opt_int(raw: int | str | None, label: str, problems: list[str]) -> int | None:
    if raw is None or raw == "":
        return None
    value = int(raw) if isinstance(raw, int) else (int(raw) if _DIGITS.fullmatch(raw) else 0)
    if not 1 <= value <= MAX_SEQ:
        problems.append(f"{label}: enter a positive whole number.")
        return None
    return value


def _opt_text(raw: str | None) -> str | None:
    return (raw.strip() or None) if raw is not None else None


def from_args(
    *,
    patient_id: int | str | None = None,
    actor_id: int | str | None = None,
    action: str | None = None,
    outcome: str | None = None,
    message_id: int | str | None = None,
    client_ip: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> AuditFilter:
    """Return an AuditFilter from form or command-line strings (blank means any).

    The caller resolves emails and public ids to user and message ids first.
    Raises ServiceError listing every field that does not parse.
    """
    problems: list[str] = []
    flt = AuditFilter(
        patient_id=_opt_int(patient_id, "Patient", problems),
        actor_id=_opt_int(actor_id, "Actor", problems),
        action=_check_action(_opt_text(action), problems),
        outcome=_check_outcome(_opt_text(outcome), problems),
        message_id=_opt_int(message_id, "Message", problems),
        client_ip=_check_ip(_opt_text(client_ip), problems),
        since=_opt_time(_opt_text(since), "Since", problems),
        until=_opt_time(_opt_text(until), "Until", problems),
    )
    if flt.since and flt.until and flt.since >= flt.until:
        problems.append("Until must be later than since.")
    if problems:
        raise ServiceError(*problems)
    return flt


def _check_action(action: str | None, problems: list[str]) -> str | None:
    if action is None:
        return None
    action = action.lower()
    known = action in set(Action) or (
        action.endswith(".") and any(a.startswith(action) for a in Action)
    )
    if not _ACTION_FILTER.fullmatch(action) or not known:
        problems.append("Action: choose one from the list, or a prefix such as auth.")
        return None
    return action


def _check_outcome(outcome: str | None, problems: list[str]) -> str | None:
    if outcome is not None and outcome.lower() not in set(Outcome):
        problems.append("Outcome: choose success, failure or denied.")
        return None
    return outcome.lower() if outcome else None


def _check_ip(raw: str | None, problems: list[str]) -> str | None:
    if raw is None:
        return None
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        problems.append("Client address: enter an IPv4 or IPv6 address.")
        return None


def _opt_time(raw: str | None, label: str, problems: list[str]) -> datetime | None:
    if raw is None:
        return None
    try:
        return parse_time(raw, label)
    except ServiceError as error:
        problems.extend(error.messages)
        return None


def conditions(flt: AuditFilter) -> list[ColumnElement[bool]]:
    """Return the SQL conditions of ``flt`` (each served by an index on PostgreSQL)."""
    out: list[ColumnElement[bool]] = []
    for name in ("patient_id", "actor_id", "outcome", "message_id", "client_ip"):
        value = getattr(flt, name)
        if value is not None:
            out.append(getattr(AuditEvent, name) == value)
    if flt.action is not None:
        out.append(
            AuditEvent.action.startswith(flt.action, autoescape=True)
            if flt.action.endswith(".")
            else AuditEvent.action == flt.action
        )
    if flt.since is not None:
        out.append(AuditEvent.occurred_at >= flt.since)
    if flt.until is not None:
        out.append(AuditEvent.occurred_at < flt.until)
    return out


def select_events(flt: AuditFilter) -> Select[*tuple[Any, ...]]:
    """Return the SELECT of :data:`EVENT_COLUMNS` matching ``flt``, unordered."""
    return select(*EVENT_COLUMNS).where(*conditions(flt))


@dataclass(frozen=True)
class EventRow:
    """One event as an auditor reads it: stored fields plus unsealed names and public ids."""

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
    details: dict[str, Any]
    prev_hash: str
    hash: str
    actor_public_id: str | None = None
    patient_public_id: str | None = None
    message_public_id: str | None = None


@dataclass(frozen=True)
class Page:
    """One page of results, newest first; ``next_before`` feeds the next call (None: last)."""

    rows: list[EventRow]
    next_before: int | None
    total: int


class Names:
    """Unsealed user names and public ids, looked up in batches and cached (bounded, FIFO)."""

    def __init__(self, session: Session, max_users: int = USER_CACHE_SIZE) -> None:
        self.session = session
        self.max_users = max_users
        self._users: dict[int, tuple[str | None, str]] = {}

    def user(self, user_id: int | None) -> tuple[str | None, str]:
        """Return (public id, display name) of ``user_id``; ``(None, "system")`` for None."""
        if user_id is None:
            return None, SYSTEM_NAME
        found = self._users.get(user_id)
        if found is None:
            self.prefetch([user_id])
            found = self._users[user_id]
        return found

    def prefetch(self, user_ids: Iterable[int | None]) -> None:
        """Load the users not cached yet with two queries (users, then their data keys)."""
        missing = {i for i in user_ids if i is not None and i not in self._users}
        if not missing:
            return
        users = self.session.scalars(select(User).where(User.id.in_(missing))).all()
        # Loaded into the identity map, so accounts.display_name's key lookups hit memory.
        keys_held = self.session.scalars(
            select(DataKey).where(DataKey.id.in_({u.data_key_id for u in users}))
        ).all()
        for user in users:
            self._remember(user.id, (user.public_id, self._name(user)))
        for user_id in missing - {u.id for u in users}:
            self._remember(user_id, (None, UNKNOWN_NAME))
        del keys_held

    def _name(self, user: User) -> str:
        try:
            return accounts.display_name(self.session, user)
        except CryptoError:  # shredded (ContentDestroyed), KEK missing, or tampered
            return UNAVAILABLE_NAME

    def _remember(self, user_id: int, value: tuple[str | None, str]) -> None:
        self._users[user_id] = value
        while len(self._users) > self.max_users:
            del self._users[next(iter(self._users))]


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
    messages = message_public_ids(session, (row[9] for row in raw)) if public_ids else {}
    return [_event_row(row, names, messages) for row in raw]


def _event_row(row: Any, names: Names, messages: dict[int, str]) -> EventRow:
    (
        seq,
        occurred_at,
        actor_id,
        actor_role,
        action,
        outcome,
        target_type,
        target_id,
        patient_id,
        message_id,
        client_ip,
        user_agent,
        request_id,
        details,
        prev_hash,
        hash_,
    ) = row
    actor_public, actor_name = names.user(actor_id)
    patient_public, patient_name = names.user(patient_id) if patient_id else (None, None)
    return EventRow(
        seq=seq,
        occurred_at=occurred_at,
        actor_id=actor_id,
        actor_role=actor_role,
        actor_name=actor_name,
        action=action,
        outcome=outcome,
        target_type=target_type,
        target_id=target_id,
        patient_id=patient_id,
        patient_name=patient_name,
        message_id=message_id,
        client_ip=client_ip,
        user_agent=user_agent,
        request_id=request_id,
        details=json.loads(details or "{}"),
        prev_hash=prev_hash,
        hash=hash_,
        actor_public_id=actor_public,
        patient_public_id=patient_public,
        message_public_id=messages.get(message_id) if message_id else None,
    )


def search(
    session: Session, flt: AuditFilter, *, before_seq: int | None = None, limit: int = DEFAULT_LIMIT
) -> Page:
    """Return one page of events matching ``flt``, newest first (``seq`` below ``before_seq``).

    Keyset pagination: pass the page's ``next_before`` to get the next one.
    ``total`` counts every match, whatever the page. Raises ServiceError for a
    limit outside 1..MAX_LIMIT.
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise ServiceError(f"Show between 1 and {MAX_LIMIT} events per page.")
    stmt = select_events(flt).order_by(AuditEvent.seq.desc()).limit(limit + 1)
    if before_seq is not None:
        stmt = stmt.where(AuditEvent.seq < before_seq)
    raw = session.execute(stmt).all()
    rows = to_rows(session, raw[:limit], Names(session))
    next_before = rows[-1].seq if len(raw) > limit else None
    return Page(rows, next_before, count(session, flt))


def count(session: Session, flt: AuditFilter) -> int:
    """Return how many events match ``flt``."""
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
