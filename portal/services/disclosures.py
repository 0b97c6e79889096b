"""Accounting of disclosures (HIPAA 45 CFR 164.528): who accessed or received a patient's
messages and records, when and how, for one patient and a period."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy.orm import Session

from portal import audit
from portal.audit import Action, Actor, RequestMeta
from portal.config import current_settings
from portal.models import AuditEvent, Role, User
from portal.services import accounts, pdf
from portal.services.audit_query import (
    DAY_RANGE_HINT,
    EARLIEST_DAY,
    LATEST_DAY,
    AuditFilter,
    EventRow,
    Names,
    select_events,
)
from portal.services.audit_query import to_rows as audit_rows
from portal.services.patient_lists import (
    OTHER_PATIENT,
    STAFF_READS,
    conversation_team_names,
    is_other_patient,
    staff_read_text,
    team_names,
)

# What counts as an access to or a disclosure of the patient's messages and records. A
# conversation's assignment, "done" and reopening disclose nothing: the history shows them,
# this record does not (as for a look-up or a new link).
HOW = {
    Action.MESSAGE_SEND: "sent to the patient (secure message)",
    Action.NOTICE_SENT: "email notice (no health information) delivered",
    Action.MESSAGE_VIEW: "viewed in the portal",
    Action.CONVERSATION_READ: "conversation opened in the portal",
    Action.REPLY_READ: "viewed in the portal",
    Action.MESSAGE_PDF: "saved as PDF from the portal",
    Action.ATTACHMENT_DOWNLOAD: "record downloaded from the portal",
    Action.ATTACHMENT_VIEW: "record viewed in the portal",
    Action.MESSAGE_REPLY: "reply written in the portal",
    Action.MESSAGE_REVOKE: "access revoked",
    Action.MESSAGE_SHRED: "content destroyed",
    Action.ACCESS_DENIED: "access attempt denied",
    Action.AUDIT_EXPORT: "audit trail exported",
    Action.AUDIT_REPORT: "accounting of disclosures produced",
}
ITEMS = {
    "message": "Message",
    "attachment": "Record (PDF)",
    "link": "Pickup link",
    "notification": "Email notice",
    "conversation": "Conversation",
}


def period(since: date, until: date) -> tuple[datetime, datetime]:
    """Return [since 00:00, until+1 00:00) in UTC; ValueError when until is before since
    or either day lies outside EARLIEST_DAY..LATEST_DAY (forms check that first)."""
    if until < since:
        raise ValueError("The end of the period is before its start.")
    if since < EARLIEST_DAY or until > LATEST_DAY:
        raise ValueError(f"The period must lie {DAY_RANGE_HINT}.")
    start = datetime.combine(since, time.min, UTC)
    return start, datetime.combine(until + timedelta(days=1), time.min, UTC)


def rows(session: Session, patient: User, since: date, until: date) -> list[dict[str, object]]:
    """Return the accesses to ``patient``'s messages and records in the period, oldest first."""
    start, end = period(since, until)
    stmt = (
        select_events(AuditFilter(patient_id=patient.id, since=start, until=end))
        .where(AuditEvent.action.in_([a.value for a in HOW]))
        .order_by(AuditEvent.seq)
    )
    events = audit_rows(session, session.execute(stmt).all(), Names(session))
    teams = team_names(session, {e.message_id for e in events if e.message_id is not None})
    threads = conversation_team_names(
        session, {e.target_id for e in events if e.target_type == "conversation" and e.target_id}
    )
    return [_row(e, patient, teams, threads) for e in events]


def _row(
    event: EventRow, patient: User, teams: dict[int, str], threads: dict[str, str]
) -> dict[str, object]:
    """One line of the record: another patient is never named nor located; a read by
    staff names their care team (the message's; for a conversation opened, its team's)."""
    other = is_other_patient(patient, event.actor_id, event.actor_role)
    how = HOW[Action(event.action)]
    team = teams.get(event.message_id or 0)
    if team and event.actor_role == Role.STAFF and event.action in STAFF_READS:
        how = staff_read_text(team, event.actor_name)
    thread_team = (
        threads.get(event.target_id or "") if event.target_type == "conversation" else None
    )
    if thread_team and event.action == Action.CONVERSATION_READ:
        how = f"conversation with the {thread_team} opened in the portal"
    who = (
        "the patient"
        if event.actor_id == patient.id
        else OTHER_PATIENT
        if other
        else event.actor_name
    )
    return {
        "when": event.occurred_at,
        "who": who,
        "role": "" if other else event.actor_role or "",
        "action": how,
        "item": f"{ITEMS.get(event.target_type or '', 'Account')} {(event.target_id or '')[:8]}",
        "how": "portal" if event.client_ip else "system",
        "from_address": "-" if other else event.client_ip or "-",
    }


def report_pdf(
    session: Session, patient: User, since: date, until: date, *, actor: Actor, meta: RequestMeta
) -> bytes:
    """Render the accounting of disclosures as a PDF and audit it (in the caller's
    transaction). Raises ValueError for a reversed period."""
    listed = rows(session, patient, since, until)
    audit.record(
        session,
        Action.AUDIT_REPORT,
        actor=actor,
        meta=meta,
        target_type="user",
        target_id=patient.public_id,
        patient_id=patient.id,
        details={"since": since.isoformat(), "until": until.isoformat(), "rows": len(listed)},
    )
    return pdf.render_disclosures_pdf(
        org_name=current_settings().org_name,
        org_address=current_settings().org_address,
        patient_name=accounts.display_name(session, patient),
        period_start=since,
        period_end=until,
        rows=listed,
    )
