"""A signed-in user changes their credentials: the authenticator app, or the password.

The enrolled factor stays in force until its replacement is proved (NIST SP
800-63B 6.1.2.1: binding a new authenticator needs authentication at the AAL
in force): the new secret waits in ``totp_pending_sealed`` and is swapped in
only on a correct code from it. Each completed change is audited, ends the
user's other sessions and queues a PHI-free notice (ASVS 2.2.3, 3.3.3).
Services flush; the caller commits.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from portal import audit
from portal.audit import Action, RequestMeta, actor_of
from portal.config import current_settings
from portal.database import rowcount, utcnow
from portal.models import RecoveryCode, User
from portal.models.notifications import NoticeKind
from portal.security import otp
from portal.services import keys, notices, signin
from portal.services.errors import ServiceError

MFA_CHANGE_SECONDS = 10 * 60  # a started change of authenticator app must finish within this
PENDING_FIELD = ("users", "totp_pending")
ACTIVE_FIELD = ("users", "totp_secret")
NOT_ENROLLED = "There is no authenticator app to change yet."
CHANGE_EXPIRED = "The change of authenticator app timed out. Please start again."
WRONG_NEW_CODE = (
    "That code is not right. Check that it comes from the new entry in your "
    "app, wait for the next code and enter it."
)


class ChangeExpired(ServiceError):
    """No change of authenticator app is pending, or it took too long."""


def start_mfa_change(session: Session, user: User, meta: RequestMeta) -> str:
    """Seal a fresh pending TOTP secret beside the active one and return it (flushed, audited).

    The active secret, its last used step and the recovery codes stay as they
    are, so abandoning the change leaves the account exactly as before. A
    second start replaces the first pending secret. Raises ServiceError
    (NOT_ENROLLED) when the user has no enrolled authenticator.
    """
    if user.totp_enabled_at is None or user.totp_secret_sealed is None:
        raise ServiceError(NOT_ENROLLED)
    secret = otp.new_secret()
    key = keys.unwrap(session, user.data_key_id)
    user.totp_pending_sealed = keys.seal_text(key, *PENDING_FIELD, user.public_id, secret)
    user.totp_pending_at = utcnow()
    audit.record(
        session,
        Action.AUTH_MFA_CHANGE_START,
        actor=actor_of(user),
        meta=meta,
        target_type="user",
        target_id=user.public_id,
    )
    session.flush()
    return secret


def pending_mfa_secret(session: Session, user: User) -> str | None:
    """Return the pending TOTP secret (unsealed) while the change is fresh, else None."""
    started = user.totp_pending_at
    if user.totp_pending_sealed is None or started is None:
        return None
    if started + timedelta(seconds=MFA_CHANGE_SECONDS) <= utcnow():
        return None
    key = keys.unwrap(session, user.data_key_id)
    return keys.open_text(key, *PENDING_FIELD, user.public_id, user.totp_pending_sealed)


def finish_mfa_change(session: Session, user: User, code: str, meta: RequestMeta) -> list[str]:
    """Swap the pending secret in when ``code`` comes from it; return ten new recovery codes.

    The swap is one conditional UPDATE on the pending ciphertext, so of two
    concurrent requests only one completes; the code's step is recorded, so it
    cannot sign in again. Ends every session of the user (the caller gives the
    current one a new id), audits, and queues the "sign-in settings changed"
    notice. Raises ChangeExpired when no fresh change is pending, ServiceError
    (WRONG_NEW_CODE) for a wrong or malformed code; either way nothing changes.
    """
    secret = pending_mfa_secret(session, user)
    if secret is None:
        raise ChangeExpired(CHANGE_EXPIRED)
    step = None
    if otp.is_well_formed(code):
        step = otp.matching_step(
            secret, code, now=utcnow().timestamp(), drift_steps=current_settings().totp_drift
        )
    if step is None or not _swap_in(session, user, secret, step):
        raise ServiceError(WRONG_NEW_CODE)
    codes = signin.new_recovery_codes(session, user)
    signin.end_all_sessions(session, user)
    audit.record(
        session,
        Action.AUTH_MFA_CHANGE,
        actor=actor_of(user),
        meta=meta,
        target_type="user",
        target_id=user.public_id,
    )
    notices.enqueue(session, kind=NoticeKind.MFA_CHANGED, recipient=user, url=None)
    return codes


def _swap_in(session: Session, user: User, secret: str, step: int) -> bool:
    """Make ``secret`` the active one if the pending row is still the one read; True if so."""
    key = keys.unwrap(session, user.data_key_id)
    sealed = keys.seal_text(key, *ACTIVE_FIELD, user.public_id, secret)
    swapped = session.execute(
        update(User)
        .where(User.id == user.id, User.totp_pending_sealed == user.totp_pending_sealed)
        .values(
            totp_secret_sealed=sealed,
            totp_enabled_at=utcnow(),
            totp_last_step=step,
            totp_pending_sealed=None,
            totp_pending_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    if rowcount(swapped) != 1:
        return False
    session.refresh(user)
    return True


def change_password(
    session: Session, user: User, current: str, new: str, meta: RequestMeta
) -> None:
    """Set ``new`` once ``current`` is proved; end the other sessions, audit, notify (flushed).

    Raises SignInFailed (counted as a failed attempt, which may pause the
    account; the caller commits the count) when ``current`` is wrong or the
    account is paused; ServiceError with every reason ``new`` is refused.
    """
    signin.check_current_password(session, user, current, meta)
    signin.set_password(session, user, new, meta, action=Action.AUTH_PASSWORD_CHANGE)
    notices.enqueue(session, kind=NoticeKind.PASSWORD_CHANGED, recipient=user, url=None)


def regenerate_recovery_codes(session: Session, user: User, meta: RequestMeta) -> list[str]:
    """Replace ``user``'s recovery codes with ten new ones and audit it; return them (shown
    once, only their hashes are kept: NIST SP 800-63B 5.1.2). Flushed; raises nothing of ours."""
    codes = signin.new_recovery_codes(session, user)
    audit.record(
        session,
        Action.AUTH_RECOVERY_REGENERATED,
        actor=actor_of(user),
        meta=meta,
        target_type="user",
        target_id=user.public_id,
    )
    return codes


def recovery_codes_left(session: Session, user: User) -> int:
    """Return how many of ``user``'s recovery codes are still unused."""
    return int(
        session.scalar(
            select(func.count()).where(
                RecoveryCode.user_id == user.id, RecoveryCode.used_at.is_(None)
            )
        )
        or 0
    )


def record_signout(session: Session, user: User, meta: RequestMeta) -> None:
    """Audit ``user`` signing out (auth.signout); the caller ends the session. Flushed."""
    audit.record(
        session,
        Action.AUTH_SIGNOUT,
        actor=actor_of(user),
        meta=meta,
        target_type="user",
        target_id=user.public_id,
    )
