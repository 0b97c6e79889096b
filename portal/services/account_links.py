"""One-time emailed links for invites (72 h) and password resets (1 h); only hashes stored."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from portal import audit
from portal.audit import Action, Actor, RequestMeta
from portal.config import current_settings
from portal.database import rowcount, utcnow
from portal.models import AccountToken, User
from portal.models.notifications import NoticeKind
from portal.security import tokens
from portal.services import notices

INVITE_TTL = timedelta(hours=72)
RESET_TTL = timedelta(hours=1)
PURPOSES = {
    "invite": (INVITE_TTL, NoticeKind.INVITE, "/invite/"),
    "reset": (RESET_TTL, NoticeKind.RESET, "/reset/"),
}


def send_link(session: Session, user: User, purpose: str) -> AccountToken:
    """Create a one-time link for ``user`` and queue its PHI-free notice; return the token row.

    Earlier unused links of the same purpose stop working.
    """
    ttl, kind, path = PURPOSES[purpose]
    session.execute(
        update(AccountToken)
        .where(
            AccountToken.user_id == user.id,
            AccountToken.purpose == purpose,
            AccountToken.used_at.is_(None),
        )
        .values(used_at=utcnow())
    )
    token = tokens.new_token()
    row = AccountToken(
        user_id=user.id,
        purpose=purpose,
        token_hash=tokens.token_hash(token),
        expires_at=utcnow() + ttl,
    )
    session.add(row)
    session.flush()
    url = f"{current_settings().base_url}{path}{token}"
    notices.enqueue(session, kind=kind, recipient=user, url=url)
    return row


def find(session: Session, token: str, purpose: str) -> AccountToken | None:
    """Return the unused, unexpired link row for ``token``, or None (never says why)."""
    if not tokens.is_well_formed_token(token):
        return None
    return session.scalar(
        select(AccountToken).where(
            AccountToken.token_hash == tokens.token_hash(token),
            AccountToken.purpose == purpose,
            AccountToken.used_at.is_(None),
            AccountToken.expires_at > utcnow(),
        )
    )


def valid_by_id(session: Session, token_id: int | None, purpose: str) -> AccountToken | None:
    """Return the link row ``token_id`` if still unused and unexpired, else None."""
    if token_id is None:
        return None
    row = session.get(AccountToken, token_id)
    ok = (
        row is not None
        and row.purpose == purpose
        and row.used_at is None
        and row.expires_at > utcnow()
    )
    return row if ok else None


def consume(session: Session, row: AccountToken) -> bool:
    """Mark the link used; return False when another request used it first (single use)."""
    done = session.execute(
        update(AccountToken)
        .where(AccountToken.id == row.id, AccountToken.used_at.is_(None))
        .values(used_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return rowcount(done) == 1


def record_invite_accepted(session: Session, user: User, meta: RequestMeta) -> None:
    """Audit ``user`` accepting their invite (auth.invite.accept), once its link is consumed."""
    audit.record(
        session,
        Action.AUTH_INVITE_ACCEPT,
        actor=audit.actor_of(user),
        meta=meta,
        target_type="user",
        target_id=user.public_id,
    )


def request_reset(session: Session, email: str, meta: RequestMeta) -> None:
    """Queue a reset link when ``email`` belongs to an active, enrolled account; else nothing.

    The caller answers the same either way (no account enumeration). Audited.
    """
    from portal.services import accounts

    user = accounts.find_by_email(session, email)
    known = user is not None and not user.disabled and user.totp_enabled_at is not None
    if known and user is not None:
        send_link(session, user, "reset")
    audit.record(
        session,
        Action.AUTH_RESET_REQUEST,
        actor=Actor(user.id if user else None, user.role if user else "anonymous"),
        meta=meta,
        target_type="user" if user else None,
        target_id=user.public_id if user else None,
        details={"sent": known},
    )
