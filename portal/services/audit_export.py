"""Streaming exports of the audit trail: CSV, JSON Lines and a FHIR R4 Bundle of AuditEvents.

Each exporter is a pure generator of ``str`` chunks, oldest event first (chain
order), reading through a server-side cursor in batches, so a million events
never sit in memory; a Flask ``Response(stream_with_context(...))`` or the CLI
writes the chunks as they come. The caller audits the export with
:func:`record_export` (and, on the web, commits before streaming: the append
locks the chain's head row until commit).

CSV and JSON Lines carry every hashed field as stored, so the chain can be
recomputed from a JSON Lines export with ``portal.audit``'s encoding. CSV cells
that a spreadsheet would run as a formula are neutralised (OWASP "CSV
Injection"), so CSV is for reading, JSON Lines for machine checks.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from portal import audit
from portal.audit import Action, Actor, Outcome, RequestMeta
from portal.models import AuditEvent, Role
from portal.services.audit_query import AuditFilter, EventRow, Names, select_events, to_rows

FORMATS = ("csv", "json", "fhir")
BATCH_ROWS = 1000  # rows per server-side fetch and per name lookup
FLUSH_ROWS = 500  # rows per yielded chunk
FIELDS = (
    "seq",
    "occurred_at",
    "actor_id",
    "actor_role",
    "actor_name",
    "action",
    "outcome",
    "target_type",
    "target_id",
    "patient_id",
    "patient_name",
    "message_id",
    "client_ip",
    "user_agent",
    "request_id",
    "details",
    "prev_hash",
    "hash",
)
# A cell starting with one of these runs as a formula in spreadsheet software;
# a leading apostrophe makes it text (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

ACTION_SYSTEM = "https://pickup-portal.example/audit-action"
CHAIN_EXTENSION = "https://pickup-portal.example/fhir/StructureDefinition/audit-chain"
ROLE_SYSTEM = "https://pickup-portal.example/user-role"
IDENTIFIER_SYSTEM = "https://pickup-portal.example/"
EVENT_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-event-type"
DICOM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
SOURCE_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/security-source-type"
ENTITY_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/object-role"
OBSERVER = "Pickup Portal"

# AuditEvent.action (R4 value set audit-event-action): C create, R read, U
# update, D delete, E execute. Reads of PHI and of the trail are R; sign-in
# and other procedures are E.
_FHIR_ACTION: dict[Action, str] = {
    Action.MESSAGE_VIEW: "R",
    Action.MESSAGE_LIST: "R",
    Action.MESSAGE_PDF: "R",
    Action.ATTACHMENT_DOWNLOAD: "R",
    Action.PATIENT_HISTORY_VIEW: "R",
    Action.PATIENT_LOOKUP: "R",
    Action.PATIENT_VIEW: "R",
    Action.ATTACHMENT_VIEW: "R",
    Action.LINK_OPEN: "R",
    Action.AUDIT_SEARCH: "R",
    Action.AUDIT_EXPORT: "R",
    Action.AUDIT_REPORT: "R",
    Action.AUDIT_VERIFY: "R",
    Action.MESSAGE_SEND: "C",
    Action.MESSAGE_REPLY: "C",
    Action.MESSAGE_RESEND: "C",
    Action.USER_CREATE: "C",
    Action.LINK_REISSUE: "C",
    Action.MESSAGE_REVOKE: "U",
    Action.KEY_ROTATE: "U",
    Action.USER_DISABLE: "U",
    Action.USER_ENABLE: "U",
    Action.USER_MFA_RESET: "U",
    Action.USER_UNLOCK: "U",
    Action.MESSAGE_SHRED: "D",
    Action.TEAM_CREATED: "C",
    Action.TEAM_MEMBER_ADDED: "C",
    Action.TEAM_UPDATED: "U",
    Action.TEAM_ARCHIVED: "U",
    Action.TEAM_MEMBER_REMOVED: "D",
    Action.CONVERSATION_READ: "R",
    Action.REPLY_READ: "R",
    Action.CONVERSATION_START: "C",
    Action.CONVERSATION_ASSIGN: "U",
    Action.CONVERSATION_DONE: "U",
    Action.CONVERSATION_REOPEN: "U",
}
# AuditEvent.outcome (R4 value set audit-event-outcome): a refused access is a
# serious failure (8), anything else that failed a minor one (4).
_FHIR_OUTCOME: dict[str, str] = {Outcome.SUCCESS: "0", Outcome.FAILURE: "4", Outcome.DENIED: "8"}
_APPLICATION_ACTIONS = {Action.KEY_ROTATE, Action.KEY_REWRAP_FAILED, Action.RETENTION_RUN}


def fhir_action(action: str) -> str:
    """Return the FHIR AuditEvent.action code (C, R, U, D or E) of one of our actions."""
    try:
        return _FHIR_ACTION.get(Action(action), "E")
    except ValueError:
        return "E"


def fhir_type(action: str) -> dict[str, str]:
    """Return the AuditEvent.type Coding of ``action``.

    Sign-in and other ``auth.*`` events are DICOM 110114 "User Authentication";
    key rotation and retention are DICOM 110100 "Application Activity"; every
    other event is an access through the portal's web or API, "rest".
    """
    if action.startswith("auth."):
        return {"system": DICOM_SYSTEM, "code": "110114", "display": "User Authentication"}
    if action in _APPLICATION_ACTIONS:
        return {"system": DICOM_SYSTEM, "code": "110100", "display": "Application Activity"}
    return {"system": EVENT_TYPE_SYSTEM, "code": "rest", "display": "RESTful Operation"}


def _batches(session: Session, flt: AuditFilter) -> Iterator[Sequence[Any]]:
    # Core rows through a server-side cursor, in the session's transaction.
    stmt = (
        select_events(flt)
        .order_by(AuditEvent.seq)
        .execution_options(yield_per=BATCH_ROWS, stream_results=True)
    )
    yield from session.connection().execute(stmt).partitions()


def stream_rows(
    session: Session, flt: AuditFilter, *, public_ids: bool = False
) -> Iterator[EventRow]:
    """Yield every event matching ``flt`` in ``seq`` order, fetched in batches (flat memory)."""
    names = Names(session)
    for batch in _batches(session, flt):
        yield from to_rows(session, batch, names, public_ids=public_ids)


def _records(session: Session, flt: AuditFilter) -> Iterator[list[Any]]:
    """Yield each event as the values of :data:`FIELDS`, details as stored (canonical) text.

    The CSV and JSON Lines hot path: no EventRow, no JSON round trip of details.
    """
    names = Names(session)
    for batch in _batches(session, flt):
        names.prefetch(id_ for row in batch for id_ in (row[2], row[8]))
        for (
            seq,
            occurred_at,
            actor_id,
            role,
            action,
            outcome,
            target_type,
            target_id,
            patient_id,
            message_id,
            ip,
            agent,
            request_id,
            details,
            prev,
            hash_,
        ) in batch:
            patient_name = names.user(patient_id)[1] if patient_id else None
            yield [
                seq,
                _timestamp(occurred_at),
                actor_id,
                role,
                names.user(actor_id)[1],
                action,
                outcome,
                target_type,
                target_id,
                patient_id,
                patient_name,
                message_id,
                ip,
                agent,
                request_id,
                details or "{}",
                prev,
                hash_,
            ]


def _timestamp(moment: datetime) -> str:
    # portal.audit's encoding of occurred_at (the hashed text), without strftime's cost.
    if moment.utcoffset():
        moment = moment.astimezone(UTC)
    return moment.isoformat(timespec="microseconds")[:26] + "Z"


def _canonical(details: dict[str, Any]) -> str:
    # The stored text's encoding (portal.audit), so the hash can be recomputed.
    return json.dumps(details, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def flat(row: EventRow) -> dict[str, Any]:
    """Return the exported fields of ``row`` (:data:`FIELDS`), times as ISO 8601 UTC text."""
    return {
        "seq": row.seq,
        "occurred_at": _timestamp(row.occurred_at),
        "actor_id": row.actor_id,
        "actor_role": row.actor_role,
        "actor_name": row.actor_name,
        "action": row.action,
        "outcome": row.outcome,
        "target_type": row.target_type,
        "target_id": row.target_id,
        "patient_id": row.patient_id,
        "patient_name": row.patient_name,
        "message_id": row.message_id,
        "client_ip": row.client_ip,
        "user_agent": row.user_agent,
        "request_id": row.request_id,
        "details": row.details,
        "prev_hash": row.prev_hash,
        "hash": row.hash,
    }


def neutralise(cell: object) -> object:
    """Return ``cell`` with a leading ``'`` when it is text a spreadsheet would run as a formula."""
    if isinstance(cell, str) and cell.startswith(FORMULA_STARTS):
        return "'" + cell
    return cell


def export_csv(session: Session, flt: AuditFilter) -> Iterator[str]:
    """Yield a CSV file (RFC 4180, header first) of the events matching ``flt``, in chunks."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(FIELDS)
    starts = FORMULA_STARTS
    for n, record in enumerate(_records(session, flt), start=1):
        writer.writerow(
            [
                ("'" + cell) if cell.__class__ is str and cell.startswith(starts) else cell
                for cell in record
            ]
        )  # neutralise(), inlined: hot loop
        if n % FLUSH_ROWS == 0:
            yield _drain(buffer)
    yield _drain(buffer)


def _drain(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text


def export_jsonl(session: Session, flt: AuditFilter) -> Iterator[str]:
    """Yield JSON Lines, one object per event (:data:`FIELDS`, details as an object), in chunks."""
    lines: list[str] = []
    details_at = FIELDS.index("details")
    for record in _records(session, flt):
        record[details_at] = json.loads(record[details_at])
        lines.append(json.dumps(dict(zip(FIELDS, record, strict=True)), ensure_ascii=False) + "\n")
        if len(lines) >= FLUSH_ROWS:
            yield "".join(lines)
            lines.clear()
    if lines:
        yield "".join(lines)


def export_fhir(session: Session, flt: AuditFilter) -> Iterator[str]:
    """Yield a FHIR R4 Bundle (type collection) of one AuditEvent per event, as JSON text."""
    stamp = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    yield f'{{"resourceType":"Bundle","type":"collection","timestamp":"{stamp}","entry":['
    parts: list[str] = []
    first = True
    for row in stream_rows(session, flt, public_ids=True):
        entry = json.dumps(
            {"resource": fhir_audit_event(row)}, ensure_ascii=False, separators=(",", ":")
        )
        parts.append(entry if first else "," + entry)
        first = False
        if len(parts) >= FLUSH_ROWS:
            yield "".join(parts)
            parts.clear()
    parts.append("]}")
    yield "".join(parts)


def fhir_audit_event(row: EventRow) -> dict[str, Any]:
    """Return ``row`` as a FHIR R4 AuditEvent resource (a dict ready for JSON).

    Patients appear as references to their public id, never by name. The chain
    fields (seq, prev_hash, hash) travel in an extension, so the sequence can be
    checked against a noted head from the export alone.
    """
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"audit-{row.seq}",
        "extension": [_chain_extension(row)],
        "type": fhir_type(row.action),
        "subtype": [{"system": ACTION_SYSTEM, "code": row.action}],
        "action": fhir_action(row.action),
        "recorded": _timestamp(row.occurred_at),
        "outcome": _FHIR_OUTCOME.get(row.outcome, "4"),
        "agent": [_agent(row)],
        "source": {
            "observer": {"display": OBSERVER},
            "type": [{"system": SOURCE_TYPE_SYSTEM, "code": "4", "display": "Application Server"}],
        },
    }
    if row.outcome != Outcome.SUCCESS:
        resource["outcomeDesc"] = row.outcome
    entities = _entities(row)
    if entities:
        resource["entity"] = entities
    return resource


def _chain_extension(row: EventRow) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [
        {"url": "seq", "valueInteger": row.seq},  # 32-bit in R4: 2 billion events of room
        {"url": "prev-hash", "valueString": row.prev_hash},
        {"url": "hash", "valueString": row.hash},
    ]
    if row.details:
        parts.append({"url": "details", "valueString": _canonical(row.details)})
    if row.request_id:
        parts.append({"url": "request-id", "valueString": row.request_id})
    if row.user_agent:
        parts.append({"url": "user-agent", "valueString": row.user_agent})
    return {"url": CHAIN_EXTENSION, "extension": parts}


def _agent(row: EventRow) -> dict[str, Any]:
    agent: dict[str, Any] = {"who": _who(row), "requestor": True}
    if row.actor_role:
        agent["role"] = [{"coding": [{"system": ROLE_SYSTEM, "code": row.actor_role}]}]
    if row.client_ip:
        agent["network"] = {"address": row.client_ip, "type": "2"}  # 2 = IP address
    return agent


def _who(row: EventRow) -> dict[str, Any]:
    """A patient acting is only ``Patient/<public id>``, never a name (HIPAA minimum
    necessary); staff and the system carry their identifier and display name."""
    who = row.actor_public_id or ("system" if row.actor_id is None else f"id-{row.actor_id}")
    if row.actor_role == Role.PATIENT:
        return {"reference": f"Patient/{who}"}
    return {
        "identifier": {"system": IDENTIFIER_SYSTEM + "user", "value": who},
        "display": row.actor_name,
    }


def _entity(
    what: dict[str, Any], type_code: str, type_display: str, role: str, role_display: str
) -> dict[str, Any]:
    return {
        "what": what,
        "type": {"system": ENTITY_TYPE_SYSTEM, "code": type_code, "display": type_display},
        "role": {"system": OBJECT_ROLE_SYSTEM, "code": role, "display": role_display},
    }


def _entities(row: EventRow) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if row.patient_id is not None:
        ref = row.patient_public_id or f"id-{row.patient_id}"
        out.append(_entity({"reference": f"Patient/{ref}"}, "1", "Person", "1", "Patient"))
    if row.message_id is not None:
        ref = row.message_public_id or f"id-{row.message_id}"
        out.append(
            _entity(
                {"reference": f"Communication/{ref}"}, "2", "System Object", "4", "Domain Resource"
            )
        )
    if row.target_id and row.target_id not in (row.message_public_id, row.patient_public_id):
        what = {
            "identifier": {
                "system": IDENTIFIER_SYSTEM + (row.target_type or "object"),
                "value": row.target_id,
            }
        }
        out.append(_entity(what, "2", "System Object", "4", "Domain Resource"))
    return out


EXPORTERS = {"csv": export_csv, "json": export_jsonl, "fhir": export_fhir}


def export(session: Session, flt: AuditFilter, fmt: str) -> Iterator[str]:
    """Return the chunk generator for ``fmt`` (csv, json = JSON Lines, fhir); KeyError otherwise."""
    return EXPORTERS[fmt](session, flt)


def record_export(
    session: Session, flt: AuditFilter, fmt: str, actor: Actor, meta: RequestMeta
) -> AuditEvent:
    """Audit an export (format and filters) in the caller's transaction and return the event."""
    return audit.record(
        session,
        Action.AUDIT_EXPORT,
        actor=actor,
        meta=meta,
        patient_id=flt.patient_id,
        details={"format": fmt, **flt.to_details()},
    )
