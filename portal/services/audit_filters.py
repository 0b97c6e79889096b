"""What an auditor searches the trail for: the filter, its parsing from form and command-line
strings (every problem named), and its SQL conditions.

Shared by the auditor's search, the exports, the accounting of disclosures and ``portal
audit export``; :mod:`portal.services.audit_query` re-exports these names.
"""

from __future__ import annotations

import ipaddress
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any

from sqlalchemy import ColumnElement, Select, bindparam, select

from portal.audit import Action, Outcome
from portal.models import AuditEvent
from portal.services.errors import ServiceError

_ACTION_FILTER = re.compile(r"[a-z][a-z_]*(\.[a-z_]+)*\.?")
_DIGITS = re.compile(r"[0-9]{1,19}")  # ASCII only: int() would also take "١٢" and "1_0"
# Dates an auditor or a patient may type. The trail cannot hold events outside them, and
# the bounds keep day arithmetic (until + 1 day) and the database far from their limits.
EARLIEST_DAY = date(2000, 1, 1)
LATEST_DAY = date(2100, 12, 31)
DAY_RANGE_HINT = f"between {EARLIEST_DAY.isoformat()} and {LATEST_DAY.isoformat()}"
MAX_SEQ = 2**63 - 1  # BIGINT: a larger number would be a database error, not "no events"

_EQUALS = ("patient_id", "actor_id", "outcome", "message_id", "client_ip")
_LIKE_ESCAPE = "/"
_COMPARISONS: dict[str, tuple[Any, Callable[[Any, Any], ColumnElement[bool]]]] = {
    "patient_id": (AuditEvent.patient_id, operator.eq),
    "actor_id": (AuditEvent.actor_id, operator.eq),
    "outcome": (AuditEvent.outcome, operator.eq),
    "message_id": (AuditEvent.message_id, operator.eq),
    "client_ip": (AuditEvent.client_ip, operator.eq),
    "action": (AuditEvent.action, operator.eq),
    "action_prefix": (AuditEvent.action, lambda column, p: column.like(p, escape=_LIKE_ESCAPE)),
    "since": (AuditEvent.occurred_at, operator.ge),
    "until": (AuditEvent.occurred_at, operator.lt),
}
# Given at execution but written into the SQL text. A statement run often is prepared
# (psycopg) and PostgreSQL then plans it once for any parameters; blind to a time range's
# width it guesses 0.5% of the trail and ANDs the patient's index with a scan of the whole
# time index: 100+ ms for what the patient's index alone answers in one.
_WRITTEN_IN = frozenset({"since", "until"})

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


def filter_params(flt: AuditFilter) -> dict[str, Any]:
    """Return the fields of ``flt`` that are set, as the parameters :func:`shaped_conditions`
    names (an action prefix as ``action_prefix``, a LIKE pattern), in a fixed order."""
    params = {name: getattr(flt, name) for name in _EQUALS if getattr(flt, name) is not None}
    if flt.action is not None and flt.action.endswith("."):
        params["action_prefix"] = _like_prefix(flt.action)
    elif flt.action is not None:
        params["action"] = flt.action
    for name in ("since", "until"):
        if getattr(flt, name) is not None:
            params[name] = getattr(flt, name)
    return params


def _like_prefix(prefix: str) -> str:
    escaped = "".join(_LIKE_ESCAPE + c if c in "%_" + _LIKE_ESCAPE else c for c in prefix)
    return escaped + "%"  # "message_" must not match "messageX" (LIKE's _ is a wildcard)


def shaped_conditions(
    names: Iterable[str], values: Mapping[str, Any] | None = None
) -> list[ColumnElement[bool]]:
    """Return the SQL conditions for the parameters ``names`` (keys of :func:`filter_params`),
    each a bound parameter of that name: carrying ``values[name]``, or, without ``values``,
    to be given at execution. So one statement serves every filter of the same shape.
    Times are written into the SQL text at execution (see _WRITTEN_IN)."""
    out: list[ColumnElement[bool]] = []
    for name in names:
        column, compare = _COMPARISONS[name]
        written_in = name in _WRITTEN_IN
        param = (
            bindparam(name, type_=column.type, literal_execute=written_in)
            if values is None
            else bindparam(name, values[name], type_=column.type, literal_execute=written_in)
        )
        out.append(compare(column, param))
    return out


def conditions(flt: AuditFilter) -> list[ColumnElement[bool]]:
    """Return the SQL conditions of ``flt`` (each served by an index on PostgreSQL)."""
    params = filter_params(flt)
    return shaped_conditions(params, params)


def select_events(flt: AuditFilter) -> Select[*tuple[Any, ...]]:
    """Return the SELECT of :data:`EVENT_COLUMNS` matching ``flt``, unordered."""
    return select(*EVENT_COLUMNS).where(*conditions(flt))
