"""Pickup: link lookup, identity checks, access checks and the patient's audited reads.

A link's GET only looks (``link_opened``); nothing counts as a pickup until the
recipient is signed in with both factors. Every read of content, every refusal
and every identity check writes an audit event in the caller's transaction
(services flush, the view commits once).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import partial

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from portal import audit
from portal.audit import SYSTEM, Action, Outcome, RequestMeta, actor_of
from portal.config import current_settings
from portal.crypto.errors import ContentDestroyed
from portal.database import utcnow
from portal.models import (
    Attachment,
    CareTeam,
    Conversation,
    Message,
    PatientProfile,
    PickupLink,
    Role,
    User,
)
from portal.models.messages import LinkState, MessageState
from portal.models.notifications import NoticeKind
from portal.security import tokens
from portal.services import (
    accounts,
    content,
    conversations,
    keys,
    messages,
    messaging,
    names,
    notices,
    pdf,
    teams,
)
from portal.services.errors import NotFound, ServiceError

MAX_VERIFY_FAILURES = 5  # then the link locks; staff see it and send a new one
MAX_REPLY = 10_000
_DMY = re.compile(r"(\d{1,2})[/.\-](\d{1,2})[/.\-](\d{4})")
_ISO = re.compile(r"(\d{4})-(\d{2})-(\d{2})")


class LinkLocked(ServiceError):
    """Too many failed identity checks on this link: only a new link from staff helps."""


class Unavailable(ServiceError):
    """The recipient's message was revoked, has expired or was deleted (``reason`` says which)."""

    def __init__(self, reason: MessageState) -> None:
        super().__init__("This message is no longer available.")
        self.reason = reason


# --- Links -------------------------------------------------------------------------------------


def find_link(session: Session, token: str) -> PickupLink | None:
    """Return the link whose token is ``token`` (any state), or None; never raises."""
    if not tokens.is_well_formed_token(token):
        return None
    return session.scalar(
        select(PickupLink).where(PickupLink.token_hash == tokens.token_hash(token))
    )


def message_state(message: Message, now: datetime | None = None) -> MessageState:
    """Return whether ``message`` is available, revoked, deleted or expired."""
    return state_at(message.destroyed_at, message.revoked_at, message.expires_at, now)


def state_at(
    destroyed_at: datetime | None,
    revoked_at: datetime | None,
    expires_at: datetime,
    now: datetime | None = None,
) -> MessageState:
    """Return the state of a message with these timestamps (lists read columns, not rows)."""
    if destroyed_at is not None:
        return MessageState.DELETED
    if revoked_at is not None:
        return MessageState.REVOKED
    if expires_at <= (now or utcnow()):
        return MessageState.EXPIRED
    return MessageState.AVAILABLE


def link_state(session: Session, link: PickupLink) -> LinkState:
    """Return USABLE, REVOKED or EXPIRED (a message no longer available counts too)."""
    message = session.get(Message, link.message_id)
    recipient = session.get(User, link.recipient_id)
    if link.revoked_at is not None or message is None or recipient is None or recipient.disabled:
        return LinkState.REVOKED
    state = message_state(message)
    if state in (MessageState.REVOKED, MessageState.DELETED):
        return LinkState.REVOKED
    if state == MessageState.EXPIRED or link.expires_at <= utcnow():
        return LinkState.EXPIRED
    return LinkState.USABLE


def link_opened(session: Session, token: str, meta: RequestMeta) -> PickupLink | None:
    """Audit a link's landing page (never with the token); return the link if it is usable."""
    link = find_link(session, token)
    state = link_state(session, link) if link is not None else LinkState.UNKNOWN
    ok = state == LinkState.USABLE
    _audit_link(
        session, Action.LINK_OPEN, link, state, Outcome.SUCCESS if ok else Outcome.FAILURE, meta
    )
    return link if ok else None


def _audit_link(
    session: Session,
    action: Action,
    link: PickupLink | None,
    state: LinkState,
    outcome: Outcome,
    meta: RequestMeta,
) -> None:
    """Audit ``action`` on ``link`` (None: an unknown token, never named) with its state."""
    audit.record(
        session,
        action,
        meta=meta,
        outcome=outcome,
        target_type="link",
        target_id=link.public_id if link else None,
        patient_id=link.recipient_id if link else None,
        message_id=link.message_id if link else None,
        details={"state": state},
    )


def usable_link(session: Session, link_id: object) -> PickupLink | None:
    """Return the link with id ``link_id`` (from the server-side session) if still usable."""
    link = session.get(PickupLink, link_id) if isinstance(link_id, int) else None
    return link if link is not None and link_state(session, link) == LinkState.USABLE else None


def renew(session: Session, token: str, meta: RequestMeta) -> bool:
    """Send a fresh link to the address on file when ``token`` is a real, expired link.

    Returns whether one was sent; the caller answers the same either way. The
    old links stop (messaging.resend revokes them). A renewal never extends
    the message's availability past what staff chose when sending (itself at
    most PORTAL_LINK_MAX_TTL): once the message has expired nothing is sent
    (state "unavailable") and only staff can send it again. Audited as
    link.reissue (and message.resend).
    """
    link = find_link(session, token)
    state = link_state(session, link) if link is not None else LinkState.UNKNOWN
    message = session.get(Message, link.message_id) if link is not None else None
    if (
        state == LinkState.EXPIRED
        and message is not None
        and message_state(message) == MessageState.EXPIRED
    ):
        state = LinkState.UNAVAILABLE
    if link is not None and message is not None and state == LinkState.EXPIRED:
        messaging.resend(session, message, actor=SYSTEM, meta=meta, extend=False)
        link.reissued_at = utcnow()
    sent = state == LinkState.EXPIRED
    _audit_link(
        session, Action.LINK_REISSUE, link, state, Outcome.SUCCESS if sent else Outcome.DENIED, meta
    )
    return sent


# --- Identity (first pickup) -------------------------------------------------------------------


def is_enrolled(user: User) -> bool:
    """Return True when ``user`` has a password and an active authenticator (signs in)."""
    return user.password_hash is not None and user.totp_enabled_at is not None


def identity_method(session: Session, user: User) -> str | None:
    """Return "access_code", "dob" or None (nothing to check against: staff must help)."""
    profile = session.get(PatientProfile, user.id)
    if profile is None:
        return None
    if profile.access_code_hash:
        return "access_code"
    return "dob" if profile.dob_sealed else None


def parse_dob(text: str) -> str | None:
    """Return ``text`` (YYYY-MM-DD, or DD/MM/YYYY as typed) as an ISO date, or None."""
    text = text.strip()
    if found := _ISO.fullmatch(text):
        year, month, day = found.groups()
    elif found := _DMY.fullmatch(text):
        day, month, year = found.groups()
    else:
        return None
    try:
        return date(int(year), int(month), int(day)).isoformat()
    except ValueError:
        return None


def _matches(session: Session, user: User, method: str, answer: str) -> bool:
    profile = session.get(PatientProfile, user.id)
    assert profile is not None
    if method == "access_code":
        hasher = accounts.hasher()
        stored = profile.access_code_hash or hasher.dummy_hash
        return hasher.verify_password(stored, accounts.normalise_access_code(answer))
    assert profile.dob_sealed is not None
    key = keys.unwrap(session, user.data_key_id)
    iso = keys.open_text(key, "patient_profiles", "dob", user.public_id, profile.dob_sealed)
    return hmac.compare_digest(iso.encode(), answer.encode())


def verify_identity(
    session: Session, link: PickupLink, user: User, method: str, answer: str, meta: RequestMeta
) -> bool:
    """Check a first-time recipient's date of birth (ISO) or access code; audited either way.

    Returns whether it matched. The MAX_VERIFY_FAILURES-th failure locks the
    link. Raises LinkLocked, without checking, when the link is already locked.
    """
    record = partial(
        audit.record,
        session,
        Action.AUTH_IDENTITY_VERIFY,
        target_type="link",
        target_id=link.public_id,
        patient_id=user.id,
        message_id=link.message_id,
        meta=meta,
        actor=actor_of(user),
    )
    if link.locked_at is not None:
        record(outcome=Outcome.DENIED, details={"method": method, "locked": True})
        raise LinkLocked("This link is locked after too many attempts.")
    if _matches(session, user, method, answer):
        profile = session.get(PatientProfile, user.id)
        assert profile is not None
        profile.verified_at = utcnow()
        record(details={"method": method})
        return True
    # One UPDATE counts the failure, so concurrent guesses cannot slip past the limit.
    session.execute(
        update(PickupLink)
        .where(PickupLink.id == link.id)
        .values(verify_failures=PickupLink.verify_failures + 1)
        .execution_options(synchronize_session=False)
    )
    session.refresh(link, ["verify_failures"])
    if link.verify_failures >= MAX_VERIFY_FAILURES:
        link.locked_at = utcnow()
    record(
        outcome=Outcome.FAILURE,
        details={
            "method": method,
            "failures": link.verify_failures,
            "locked": link.locked_at is not None,
        },
    )
    session.flush()
    return False


# --- Access ------------------------------------------------------------------------------------


def find_message(session: Session, public_id: str) -> Message | None:
    """Return the message with this public id, or None (also for malformed ids)."""
    if len(public_id) != 32 or not public_id.isalnum():
        return None
    return session.scalar(select(Message).where(Message.public_id == public_id))


def deny(session: Session, message: Message, user: User, meta: RequestMeta, reason: str) -> None:
    """Audit a refused access to ``message`` by ``user`` (access.denied)."""
    audit.record(
        session,
        Action.ACCESS_DENIED,
        actor=actor_of(user),
        meta=meta,
        outcome=Outcome.DENIED,
        target_type="message",
        target_id=message.public_id,
        patient_id=content.patient_of(session, message),  # a patient's reply: its sender
        message_id=message.id,
        details={"reason": reason},
    )


def check_access(session: Session, message: Message, user: User, meta: RequestMeta) -> None:
    """Let only the recipient at a message that is still available. Refusals are audited.

    Raises NotFound for anyone but the recipient (say 404), Unavailable when
    the message was revoked, expired or deleted. Checked on every request.
    """
    if message.recipient_id != user.id or user.role != Role.PATIENT:
        deny(session, message, user, meta, "not_recipient")
        raise NotFound("There is nothing here.")
    state = message_state(message)
    if state != MessageState.AVAILABLE:
        deny(session, message, user, meta, state)
        raise Unavailable(state)


def find_attachment(message: Message, public_id: str) -> Attachment | None:
    """Return ``message``'s attachment with this public id, or None."""
    return next((a for a in message.attachments if a.public_id == public_id), None)


def read_or_unavailable(session: Session, message: Message) -> messages.Readable:
    """Return the message unsealed; Unavailable(DELETED) when it was shredded."""
    try:
        return messages.read(session, message)
    except ContentDestroyed:
        raise Unavailable(MessageState.DELETED) from None


# --- Audited reads -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Shown:
    """A message as its recipient sees it, with the replies they sent."""

    message: Message
    readable: messages.Readable
    sender_name: str
    replies: list[tuple[Message, str]]


def display_name_of(session: Session, user_id: int) -> str:
    """Return a user's name for a page, or a placeholder when unknown or shredded
    (services.names: unsealed once per transaction)."""
    return names.display_name(session, user_id)


def view_message(session: Session, message: Message, user: User, meta: RequestMeta) -> Shown:
    """Return the message for its recipient; audits message.view, marks first opening.

    Raises Unavailable(DELETED) when the content was shredded.
    """
    readable = read_or_unavailable(session, message)
    if message.first_opened_at is None:
        message.first_opened_at = utcnow()
    audit.record(
        session,
        Action.MESSAGE_VIEW,
        actor=actor_of(user),
        meta=meta,
        target_type="message",
        target_id=message.public_id,
        patient_id=user.id,
        message_id=message.id,
    )
    replies = []
    for reply in session.scalars(
        select(Message)
        .where(Message.in_reply_to_id == message.id, Message.sender_id == user.id)
        .order_by(Message.created_at)
    ):
        replies.append(
            (reply, "(deleted)" if reply.destroyed_at else messages.read(session, reply).body)
        )
    return Shown(message, readable, display_name_of(session, message.sender_id), replies)


def open_attachment(
    session: Session, attachment: Attachment, user: User, meta: RequestMeta, *, inline: bool
) -> tuple[str, Iterator[bytes]]:
    """Open the attachment's verified plaintext, then audit the download or view.

    Returns its file name and segment iterator (whose ``close`` closes the
    blob). If the audit event cannot be written the blob is closed and the
    error propagates, so nothing is served unaudited. Raises
    Unavailable(DELETED) when shredded, ContentTampered for a damaged blob.
    """
    try:
        key = keys.unwrap(session, attachment.message.data_key_id)
        name = keys.open_text(
            key, "attachments", "filename", attachment.public_id, attachment.filename_sealed
        )
        chunks = content.open_attachment(session, attachment)
    except ContentDestroyed:
        raise Unavailable(MessageState.DELETED) from None
    try:
        audit.record(
            session,
            Action.ATTACHMENT_VIEW if inline else Action.ATTACHMENT_DOWNLOAD,
            actor=actor_of(user),
            meta=meta,
            target_type="attachment",
            target_id=attachment.public_id,
            patient_id=user.id,
            message_id=attachment.message_id,
            details={"size": attachment.size},
        )
    except BaseException:
        # mypy: chunks is typed Iterator; the generator behind it has close(), which releases the
        #   blob file.
        chunks.close()  # type: ignore[attr-defined]
        raise
    return name, chunks


def message_pdf(session: Session, message: Message, user: User, meta: RequestMeta) -> bytes:
    """Return the message rendered as a PDF letter for its recipient; audits message.pdf."""
    readable = read_or_unavailable(session, message)
    settings = current_settings()
    document = pdf.render_message_pdf(
        org_name=settings.org_name,
        org_address=settings.org_address,
        sender_name=display_name_of(session, message.sender_id),
        sent_at=message.created_at,
        subject=readable.subject,
        body=readable.body,
        body_format=readable.body_format,
        attachments=[(readable.filenames[a.id], a.size, a.sha256) for a in message.attachments],
        recipient_name=display_name_of(session, user.id),
    )
    audit.record(
        session,
        Action.MESSAGE_PDF,
        actor=actor_of(user),
        meta=meta,
        target_type="message",
        target_id=message.public_id,
        patient_id=user.id,
        message_id=message.id,
    )
    return document


def reply(
    session: Session, original: Message, patient: User, text: str, meta: RequestMeta
) -> Message:
    """Store the patient's reply encrypted, audit it and queue a PHI-free notice to the team.

    The reply joins the message's conversation; the notice, linking to the conversation's
    staff page, goes to its assignee, else the sender while still in the team, else every
    member (conversations.notify_team). Raises ServiceError for an empty or over-long
    reply, and when nobody is left in the team to read it.
    """
    if not text.strip() or len(text) > MAX_REPLY:
        raise ServiceError(f"Write a reply of 1 to {MAX_REPLY:,} characters.")
    thread = session.get(Conversation, original.conversation_id or 0)
    addressee = _reply_recipient(session, original, thread)
    subject = ("Re: " + read_or_unavailable(session, original).subject)[: messages.MAX_SUBJECT]
    lifetime = timedelta(seconds=current_settings().link_max_ttl)
    answer = messages.create(
        session,
        sender=patient,
        recipient=addressee,
        subject=subject,
        body=text,
        expires_at=utcnow() + lifetime,
        in_reply_to=original,
    )
    if thread is not None:  # the reply joins its message's conversation and team
        teams.file_message(session, answer, thread)
    audit.record(
        session,
        Action.MESSAGE_REPLY,
        actor=actor_of(patient),
        meta=meta,
        target_type="message",
        target_id=answer.public_id,
        patient_id=patient.id,
        message_id=original.id,
    )
    if thread is None:  # a message older than care teams that no migration filed
        notices.enqueue(
            session,
            kind=NoticeKind.REPLY,
            recipient=addressee,
            url=f"{current_settings().base_url}/",
            message=answer,
        )
    else:
        conversations.notify_team(
            session,
            thread,
            answer,
            NoticeKind.REPLY,
            addressed_to=original_sender(session, original),
        )
    return answer


def original_sender(session: Session, message: Message) -> User | None:
    """Return the active member of staff who sent ``message``, or None."""
    sender = session.get(User, message.sender_id)
    return sender if sender is not None and not sender.disabled else None


def _reply_recipient(session: Session, original: Message, thread: Conversation | None) -> User:
    """Whom a reply is addressed to (``recipient_id``): the message's sender while they are
    in its team, else the member longest in the team (the team reads it, whoever that is).
    Raises ServiceError when nobody is left to read it."""
    sender = original_sender(session, original)
    if thread is None:
        if sender is None:
            raise ServiceError("The sender can no longer receive replies. Contact the practice.")
        return sender
    if sender is not None and teams.is_member(session, sender, thread.team_id):
        return sender
    team = session.get(CareTeam, thread.team_id)
    assert team is not None  # a foreign key guarantees it
    return conversations.patient_message_recipient(session, team)


# --- Lists -------------------------------------------------------------------------------------
