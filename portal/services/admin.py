"""Account administration: invite, disable, enable, unlock, reset MFA. Each is audited."""

from __future__ import annotations

from sqlalchemy import ColumnElement, delete, select
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from portal import audit
from portal.audit import Action, Actor, RequestMeta
from portal.models import RecoveryCode, Role, User
from portal.services import account_links, accounts, names, paging, signin
from portal.services.errors import ServiceError
from portal.services.paging import Listing, Page, PageRequest


def invite(
    session: Session, *, role: str, email: str, name: str, actor: Actor, meta: RequestMeta
) -> User:
    """Create a staff, auditor or admin account and email it a one-time invite (72 h).

    Raises ServiceError for patients (they arrive by pickup link) and bad input.
    """
    if role == Role.PATIENT:
        raise ServiceError("Patients are registered by staff when a message is sent.")
    user = accounts.create_user(
        session, role=role, email=email, name=name, actor=actor, meta=meta
    ).user
    account_links.send_link(session, user, "invite")
    return user


def set_disabled(
    session: Session, user: User, disabled: bool, *, actor: Actor, meta: RequestMeta
) -> None:
    """Disable (ending every session at once) or re-enable an account. Audited.

    Raises ServiceError when an admin tries to disable themself.
    """
    if user.id == actor.id and disabled:
        raise ServiceError("You cannot disable your own account.")
    user.disabled = disabled
    if disabled:
        signin.end_all_sessions(session, user)
    audit.record(
        session,
        Action.USER_DISABLE if disabled else Action.USER_ENABLE,
        actor=actor,
        meta=meta,
        target_type="user",
        target_id=user.public_id,
    )


def reset_mfa(session: Session, user: User, *, actor: Actor, meta: RequestMeta) -> None:
    """For someone who lost both phone and recovery codes: clear TOTP and password, end
    their sessions, and email a fresh invite so the next sign-in enrols again. Audited.
    """
    user.totp_secret_sealed = None
    user.totp_enabled_at = None
    user.totp_pending_sealed, user.totp_pending_at = None, None  # a half-made change goes too
    user.password_hash = None
    user.failed_signins, user.locked_until, user.must_reset = 0, None, False
    session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
    signin.end_all_sessions(session, user)
    account_links.send_link(session, user, "invite")
    audit.record(
        session,
        Action.USER_MFA_RESET,
        actor=actor,
        meta=meta,
        target_type="user",
        target_id=user.public_id,
    )


def staff_accounts(session: Session, want: PageRequest | None = None) -> Page[tuple[User, str]]:
    """Return one page of the accounts that are not a patient's, oldest first, with names.

    Three queries at most whatever the number of accounts (the cursor's row, the page,
    their data keys). Raises PageError for a cursor that is not one of these accounts.
    """
    return _accounts(session, User.role != Role.PATIENT, want)


def locked_accounts(session: Session, want: PageRequest | None = None) -> Page[tuple[User, str]]:
    """Return one page of the accounts of any role locked after MAX_FAILURES failed attempts,
    oldest first, with names (patients included: nobody but an admin can unlock them).

    Three queries at most; raises PageError for a cursor that is not a locked account.
    """
    return _accounts(session, User.must_reset.is_(True), want)


def _accounts(
    session: Session, where: ColumnElement[bool], want: PageRequest | None
) -> Page[tuple[User, str]]:
    listing = Listing(
        where=(where,), order=(User.created_at, User.id), cursor=User.public_id, descending=False
    )
    page = paging.fetch(session, listing, select(User), want or PageRequest(), _public_id)
    named = names.names_of(session, [row[0] for row in page.rows])
    return page.map(lambda row: (row[0], named[row[0].id]))


def _public_id(row: Row[User]) -> str:
    return row[0].public_id


def unlock(session: Session, user: User, actor: Actor, meta: RequestMeta) -> None:
    """Lift the 100-failure lock (and any pause), keeping password and authenticator. Audited.

    NIST SP 800-63B 5.2.2 lets a locked account be unlocked by other means than
    the locked factors: here an admin, after checking who asks. A self-service
    reset cannot do it. Raises ServiceError (changing nothing) when the account
    is not locked.
    """
    if not user.must_reset:
        raise ServiceError("This account is not locked.")
    failures = user.failed_signins
    user.failed_signins, user.locked_until, user.must_reset = 0, None, False
    audit.record(
        session,
        Action.USER_UNLOCK,
        actor=actor,
        meta=meta,
        target_type="user",
        target_id=user.public_id,
        details={"failures": failures},
    )
