"""Sending: one transaction stores the encrypted message, its pickup link, its notice and
its audit event; revoke and resend; the status staff see.

A failure anywhere raises before the caller commits, so none of them lands
(and the blobs already written are deleted with the rollback).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from portal import audit
from portal.audit import SYSTEM, Action, Actor, Outcome, RequestMeta
from portal.config import current_settings
from portal.database import utcnow
from portal.models import (
    AuditEvent,
    CareTeam,
    Conversation,
    Message,
    Notification,
    PickupLink,
    Role,
    User,
)
from portal.models.notifications import NoticeKind, NoticeStatus
from portal.models.teams import StartedBy
from portal.security import tokens
from portal.services import content, delivery, messages, notices, teams, upload_scans
from portal.services.errors import NotFound, ServiceError
from portal.services.messages import Upload
from portal.services.uploads import InspectorFactory, Staging, UploadPolicy

# portal.services.accounts (argon2, zxcvbn, email_validator) and pdfcheck (pypdf) are
# imported by the functions that use them: the notifier imports this module for remind()
# and starts faster without them (README "Notifier throughput": start-up).


@dataclass(frozen=True)
class Sent:
    """A message just sent, and the pickup URL its notice carries (never logged)."""

    message: Message
    url: str


def attachment_inspectors() -> list[InspectorFactory]:
    """Return the inspectors every file a member of staff attaches goes through, in order.

    Each is called with the file's ``UploadView`` when its first byte arrives, fed the
    plaintext as it streams, and finishes once the file is stored encrypted
    (``portal.services.uploads``); any may refuse the file with UploadRejected.
    With ``PORTAL_SCAN_UPLOADS=required`` the malware scan comes first: its
    connection is opened on the file's first byte (a clamd out of reach refuses
    it before anything is kept) and its verdict decides before any content check.
    """
    from portal.services.pdfcheck import AttachmentInspector

    return upload_scans.scanned(current_settings(), [AttachmentInspector])


# Attachments: readable PDFs and JPEG, PNG or HEIC photos (re-encoded before they are
# stored) of at most PORTAL_MAX_UPLOAD bytes each.
ATTACHMENTS = UploadPolicy(
    "attachment",
    inspectors=attachment_inspectors,
    max_bytes=lambda: current_settings().max_upload,
)


def expiry(expires_in: timedelta | None) -> datetime:
    """Return when a message sent now expires; ServiceError past PORTAL_LINK_MAX_TTL."""
    settings = current_settings()
    seconds = settings.link_ttl if expires_in is None else expires_in.total_seconds()
    if not 3600 <= seconds <= settings.link_max_ttl:
        days = settings.link_max_ttl // 86400
        raise ServiceError(f"Choose an expiry between 1 hour and {days} days.")
    return utcnow() + timedelta(seconds=seconds)


def recipient_for(session: Session, email: str) -> User:
    """Return the active patient with this address; NotFound otherwise."""
    from portal.services.accounts import find_by_email

    user = find_by_email(session, email)
    if user is None or user.role != Role.PATIENT or user.disabled:
        raise NotFound("No active patient has that email address. Register the patient first.")
    return user


def lookup_patient(session: Session, email: str, *, actor: Actor, meta: RequestMeta) -> User | None:
    """Return the patient with this address (disabled ones too), or None. Audited either way.

    A staff lookup shows the patient's name: a read of PHI (patient.lookup). The
    address searched for is never recorded, only whether a patient was found.
    """
    from portal.services.accounts import find_by_email

    user = find_by_email(session, email)
    found = user if user is not None and user.role == Role.PATIENT else None
    audit.record(
        session,
        Action.PATIENT_LOOKUP,
        actor=actor,
        meta=meta,
        target_type="user" if found else None,
        target_id=found.public_id if found else None,
        patient_id=found.id if found else None,
        details={"found": found is not None},
    )
    return found


def send(
    session: Session,
    *,
    sender: User,
    recipient: User,
    subject: str,
    body: str,
    body_format: str = "text",
    uploads: list[Upload] | None = None,
    staged: Staging | None = None,
    expires_in: timedelta | None = None,
    team: CareTeam | None = None,
    conversation: Conversation | None = None,
    meta: RequestMeta,
) -> Sent:
    """Store and send a message (flushed, not committed); return it with its pickup URL.

    The message joins ``conversation`` (an answer in a thread), or starts one of
    ``team`` (default: the sender's only team). Attachments: the files of ``staged``
    (uploaded under :data:`ATTACHMENTS`), then ``uploads`` (streams, staged here the
    same way). Raises ServiceError for a sender who is not staff, a recipient who is
    not an active patient, a team or conversation that is not the sender's
    (teams.NoTeam for a sender in no team), a bad expiry, subject or body, and for
    any upload that is not a readable, unencrypted PDF within PORTAL_MAX_UPLOAD
    (UploadTooLarge, UploadRefused). Raises ValueError for files staged under
    another policy.
    """
    if staged is not None and staged.policy is not ATTACHMENTS:
        raise ValueError("attachments must be staged under messaging.ATTACHMENTS")
    if sender.role != Role.STAFF or sender.disabled:
        raise ServiceError("Only staff can send messages.")
    if recipient.role != Role.PATIENT or recipient.disabled:
        raise ServiceError("Messages go to active patients only.")
    thread = conversation_for(session, sender, recipient, team, conversation)
    staging = staged or ATTACHMENTS.start(content.blob_store())
    try:
        message = messages.create(
            session,
            sender=sender,
            recipient=recipient,
            subject=subject,
            body=body,
            body_format=body_format,
            expires_at=expiry(expires_in),
            uploads=uploads or [],
            staged=staging,
        )
    finally:
        if staged is None:
            staging.discard()  # what was staged here and not committed
    teams.file_message(session, message, thread)
    url = issue_link(session, message, NoticeKind.PICKUP)
    audit.record(
        session,
        Action.MESSAGE_SEND,
        actor=audit.actor_of(sender),
        meta=meta,
        target_type="message",
        target_id=message.public_id,
        patient_id=recipient.id,
        message_id=message.id,
        details={"attachments": len(message.attachments), "format": body_format},
    )
    return Sent(message, url)


def conversation_for(
    session: Session,
    sender: User,
    recipient: User,
    team: CareTeam | None,
    conversation: Conversation | None,
) -> Conversation:
    """Return the conversation a message from ``sender`` to ``recipient`` joins: the one
    given, or a new one of ``team`` (default: the sender's only team), flushed.

    Raises ServiceError when the conversation is with another patient or the sender is
    not a member of its team or of ``team``; teams.NoTeam for a sender in no team.
    """
    if conversation is not None:
        if conversation.patient_id != recipient.id:
            raise ServiceError("This conversation is with another patient.")
        if not teams.is_member(session, sender, conversation.team_id):
            raise ServiceError("Only members of its care team can answer in this conversation.")
        return conversation
    if team is None:
        team = teams.sending_team(session, sender, None)
    elif not teams.is_member(session, sender, team.id):
        raise ServiceError("Choose one of your care teams.")
    return teams.start_conversation(session, team, recipient, StartedBy.STAFF)


def issue_link(session: Session, message: Message, kind: NoticeKind) -> str:
    """Create a pickup link (256-bit token, only its SHA-256 kept) and queue its notice.

    Returns the URL. The link expires with the message and is bound to it and
    to its recipient.
    """
    return _issue(session, message, kind, None)[1]


def remind(session: Session, message: Message, now: datetime) -> Notification:
    """Give an unopened ``message`` a fresh link and queue its reminder, due at ``now``.

    Only token hashes are stored, so a reminder cannot resend the first link's
    URL; the first link stays valid. Audited (link.reissue), flushed. Returns the
    notice; raises ContentDestroyed when the recipient's data key was shredded.
    """
    link, _url, notice = _issue(session, message, NoticeKind.REMINDER, now)
    audit.record(
        session,
        Action.LINK_REISSUE,
        actor=SYSTEM,
        target_type="pickup_link",
        target_id=link.public_id,
        patient_id=message.recipient_id,
        message_id=message.id,
        details={"reason": "reminder"},
    )
    return notice


def relink(session: Session, notice: Notification, message: Message, now: datetime) -> None:
    """Give ``notice`` a fresh link for another attempt after a soft bounce (flushed).

    Its URL was erased when the mail server accepted it, and only token hashes
    are stored, so the retry carries a new link, as a reminder does; the link it
    carried is revoked (it sits in a mail system that could not deliver it).
    Audited (link.reissue, reason bounce). Raises ServiceError when the message
    is revoked, destroyed or no longer available; ContentDestroyed when the
    recipient's data key was shredded.
    """
    if message.revoked_at or message.destroyed_at or message.expires_at <= now:
        raise ServiceError("This message is no longer available.")
    token = tokens.new_token()
    notices.reseal(session, notice, _pickup_url(token))  # first: a shredded key changes nothing
    revoke_notice_link(session, notice, now)
    link = _add_link(session, message, token)
    notice.link_id = link.id
    audit.record(
        session,
        Action.LINK_REISSUE,
        actor=SYSTEM,
        target_type="pickup_link",
        target_id=link.public_id,
        patient_id=message.recipient_id,
        message_id=message.id,
        details={"reason": "bounce"},
    )


def revoke_notice_link(session: Session, notice: Notification, now: datetime) -> None:
    """Revoke the pickup link ``notice`` carried, if any and not revoked yet (flushed).

    For a notice that bounced: a copy of it, link included, sits in a bounce
    mailbox. The caller audits (notice.bounced). Returns None.
    """
    if notice.link_id is not None:
        session.execute(
            update(PickupLink)
            .where(PickupLink.id == notice.link_id, PickupLink.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        session.flush()


def _new_link(session: Session, message: Message) -> tuple[PickupLink, str]:
    """A new pickup link to ``message`` (flushed) and its URL."""
    token = tokens.new_token()
    return _add_link(session, message, token), _pickup_url(token)


def _add_link(session: Session, message: Message, token: str) -> PickupLink:
    link = PickupLink(
        message_id=message.id,
        recipient_id=message.recipient_id,
        token_hash=tokens.token_hash(token),
        expires_at=message.expires_at,
    )
    session.add(link)
    session.flush()
    return link


def _pickup_url(token: str) -> str:
    return f"{current_settings().base_url}/p/{token}"


def _issue(
    session: Session, message: Message, kind: NoticeKind, due: datetime | None
) -> tuple[PickupLink, str, Notification]:
    link, url = _new_link(session, message)
    recipient = session.get(User, message.recipient_id)
    assert recipient is not None  # a foreign key guarantees it
    notice = notices.enqueue(
        session, kind=kind, recipient=recipient, url=url, message=message, link_id=link.id, due=due
    )
    return link, url, notice


def _revoke_links(session: Session, message: Message) -> None:
    session.execute(
        update(PickupLink)
        .where(PickupLink.message_id == message.id, PickupLink.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )


def revoke(session: Session, message: Message, *, actor: Actor, meta: RequestMeta) -> None:
    """Stop the message and every link to it at once; cancel notices not yet sent. Audited.

    Raises ServiceError when it is already revoked.
    """
    if message.revoked_at is not None:
        raise ServiceError("This message is already revoked.")
    message.revoked_at = utcnow()
    _revoke_links(session, message)
    notices.cancel_for_message(session, message.id)
    audit.record(
        session,
        Action.MESSAGE_REVOKE,
        actor=actor,
        meta=meta,
        target_type="message",
        target_id=message.public_id,
        patient_id=message.recipient_id,
        message_id=message.id,
    )


def resend(
    session: Session, message: Message, *, actor: Actor, meta: RequestMeta, extend: bool = True
) -> str:
    """Send a fresh link (the old ones are revoked). Returns the new URL. Audited.

    ``extend`` (staff resending, their own choice): an expired message gets the
    default lifetime again. Without it (a patient's renewal) the availability
    staff chose stays as it is, and the link expires with it. Raises
    ServiceError for a revoked or destroyed message, and, without ``extend``,
    for one whose availability has ended.
    """
    if message.revoked_at is not None or message.destroyed_at is not None:
        raise ServiceError("A revoked message cannot be sent again. Send a new message.")
    if not extend and message.expires_at <= utcnow():
        raise ServiceError("This message is no longer available. Contact the practice.")
    _revoke_links(session, message)
    notices.cancel_for_message(session, message.id)
    if extend:
        message.expires_at = max(message.expires_at, expiry(None))
    url = issue_link(session, message, NoticeKind.PICKUP)
    audit.record(
        session,
        Action.MESSAGE_RESEND,
        actor=actor,
        meta=meta,
        target_type="message",
        target_id=message.public_id,
        patient_id=message.recipient_id,
        message_id=message.id,
    )
    return url


def check_staff_access(
    session: Session, message: Message, staff: User, *, meta: RequestMeta
) -> None:
    """Let the members of the message's care team act on it; return None.

    Object-level access for every per-message staff route (ASVS V4.2.1): team
    membership is how a colleague covers for another. Anyone else is audited
    (access.denied, reason not_in_team) and gets NotFound, so the refusal does not
    confirm that the message exists.
    """
    teams.require_member(
        session,
        staff,
        message.team_id,
        meta=meta,
        target_type="message",
        target_id=message.public_id,
        patient_id=message.recipient_id,
        message_id=message.id,
    )


@dataclass(frozen=True)
class StatusEntry:
    """One line of a message's history as staff see it (no PHI beyond what staff sent)."""

    when: datetime
    what: str
    detail: str = ""
    alert: str = ""  # what staff should do about it, shown at the top of the page


STATUS_ACTIONS = {
    Action.LINK_OPEN: "Link opened (not yet signed in)",
    Action.MESSAGE_VIEW: "Opened by the patient",
    Action.ATTACHMENT_DOWNLOAD: "Attachment downloaded",
    Action.ATTACHMENT_VIEW: "Attachment viewed",
    Action.MESSAGE_PDF: "Saved as PDF",
    Action.MESSAGE_REVOKE: "Revoked",
    Action.MESSAGE_RESEND: "New link sent",
    Action.AUTH_IDENTITY_VERIFY: "Identity check",
    Action.ACCESS_DENIED: "Access denied",
    Action.MESSAGE_COVER: "A colleague covered for the sender",  # before care teams (0005)
}


def status(session: Session, message: Message) -> list[StatusEntry]:
    """Return the message's history: notices (queued, sent, failed with reason) and accesses."""
    entries = [StatusEntry(message.created_at, "Sent")]
    delayed = delivery.delayed(session)  # the notifier cannot use the mail relay right now
    for notice in session.scalars(
        select(Notification).where(Notification.message_id == message.id).order_by(Notification.id)
    ):
        entries.append(_notice_entry(notice, delayed))
    for event in session.scalars(
        select(AuditEvent)
        .where(
            AuditEvent.message_id == message.id,
            AuditEvent.action.in_([a.value for a in STATUS_ACTIONS]),
        )
        .order_by(AuditEvent.seq)
    ):
        label = STATUS_ACTIONS[Action(event.action)]
        if event.action == Action.MESSAGE_VIEW and event.actor_id != message.recipient_id:
            label = "Viewed by staff"
        if event.action == Action.ATTACHMENT_DOWNLOAD and event.actor_id != message.recipient_id:
            label = "Attachment downloaded by staff"  # from the conversation page
        if event.action == Action.ATTACHMENT_VIEW and event.actor_id != message.recipient_id:
            label = "Attachment viewed by staff"  # a photo shown on the conversation page
        detail = "" if event.outcome == Outcome.SUCCESS else event.outcome
        entries.append(StatusEntry(event.occurred_at, label, detail))
    return sorted(entries, key=lambda e: e.when)


def _notice_entry(notice: Notification, delayed: bool = False) -> StatusEntry:
    kind = "Reminder email" if notice.kind == NoticeKind.REMINDER else "Email notice"
    if notice.status == NoticeStatus.SENT and notice.sent_at:
        return StatusEntry(notice.sent_at, f"{kind} delivered to the mail server")
    if notice.status == NoticeStatus.FAILED:
        return StatusEntry(notice.created_at, f"{kind} failed", notice.failure_reason or "")
    if notice.status == NoticeStatus.CANCELLED:
        return StatusEntry(notice.created_at, f"{kind} cancelled")
    if notice.status == NoticeStatus.BOUNCED:
        return StatusEntry(
            notice.sent_at or notice.created_at,
            f"{kind} bounced: check the patient's address",
            notice.failure_reason or "",
            alert="Email bounced: check the patient's address",
        )
    if delayed:  # queued or being sent, with its link, until the relay is usable again
        return StatusEntry(
            notice.created_at,
            f"{kind} queued: delivery delayed",
            "the notifier cannot use the mail server; it is sent once that is fixed",
            alert="Email delivery delayed: the mail server is not usable right now",
        )
    return StatusEntry(
        notice.created_at,
        f"{kind} queued",
        f"attempt {notice.attempts + 1}" if notice.attempts else "",
    )


def record_sent_list(session: Session, staff: User, rows: int, meta: RequestMeta) -> None:
    """Audit that ``staff`` read their sent list (message.list: names and subjects are PHI)."""
    audit.record(
        session,
        Action.MESSAGE_LIST,
        actor=audit.actor_of(staff),
        meta=meta,
        details={"page": "staff_index", "count": rows},
    )


def record_patient_view(session: Session, patient: User, actor: Actor, meta: RequestMeta) -> None:
    """Audit a page naming ``patient`` to staff (patient.view), here the compose page."""
    audit.record(
        session,
        Action.PATIENT_VIEW,
        actor=actor,
        meta=meta,
        target_type="user",
        target_id=patient.public_id,
        patient_id=patient.id,
        details={"page": "staff_compose"},
    )


def record_status_view(session: Session, message: Message, actor: Actor, meta: RequestMeta) -> None:
    """Audit staff reading ``message``'s status page (message.view: subject and name)."""
    audit.record(
        session,
        Action.MESSAGE_VIEW,
        actor=actor,
        meta=meta,
        target_type="message",
        target_id=message.public_id,
        patient_id=message.recipient_id,
        message_id=message.id,
        details={"page": "staff_status"},
    )


def locked_at(session: Session, message: Message) -> datetime | None:
    """Return when a link of ``message`` was locked by failed identity checks, or None."""
    return session.scalar(
        select(PickupLink.locked_at)
        .where(PickupLink.message_id == message.id, PickupLink.locked_at.is_not(None))
        .limit(1)
    )


def find_by_public_id(session: Session, public_id: str | None) -> Message | None:
    """Return the message (a sent one or a reply) with this opaque public id, or None."""
    return session.scalar(select(Message).where(Message.public_id == (public_id or "").strip()))
