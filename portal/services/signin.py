"""Sign-in: the password factor with throttling, TOTP (single-use codes), recovery codes.

NIST SP 800-63B AAL2: a memorised secret plus a TOTP authenticator. Every
success, failure, lockout, enrolment and recovery-code use is audited without
the password, code or secret.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import NoReturn

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from portal import audit
from portal.audit import Action, Outcome, RequestMeta, actor_of
from portal.config import current_settings
from portal.database import rowcount, utcnow
from portal.models import RecoveryCode, User, WebSession
from portal.models.notifications import NoticeKind
from portal.security import otp, recovery
from portal.services import accounts, keys, notices
from portal.services.errors import ServiceError

# Throttling (ASVS 2.2.1): after FREE_FAILURES consecutive failures each further one
# pauses the account for an exponentially growing delay, capped; at MAX_FAILURES the
# account needs a reset (800-63B 5.2.2: no more than 100 consecutive failures).
FREE_FAILURES = 5
FIRST_DELAY_SECONDS = 30
MAX_DELAY_SECONDS = 15 * 60
MAX_FAILURES = 100
SIGNIN_FAILED = "The email or password is not right, or sign-in is paused after failed attempts."
CODE_FAILED = "That code is not right, or it was already used. Wait for a new code and try again."
NOT_CURRENT = "That is not your current password, or changes are paused after failed attempts."
ALREADY_ENROLLED = "Your authenticator app is already set up."


class SignInFailed(ServiceError):
    """A failed attempt. Its count and audit event are in the session: the caller commits."""


@dataclass(frozen=True)
class FirstFactor:
    """A user whose password was right; ``enrolled`` says whether TOTP is set up."""

    user: User
    enrolled: bool


def _verify_dummy(password: str) -> None:
    """Spend what a real password check costs, so the answer's timing does not tell whether
    the account exists or is paused (ASVS 2.2.x, 3.x). Raises nothing."""
    hasher = accounts.hasher()
    hasher.verify_password(hasher.dummy_hash, password)


def check_password(session: Session, email: str, password: str, meta: RequestMeta) -> FirstFactor:
    """Return the user when ``email`` and ``password`` match an active, unpaused account.

    Raises SignInFailed(SIGNIN_FAILED) otherwise, with the same message and a
    comparable amount of work whether or not the email exists. Rehashes the
    password when the hashing parameters changed.
    """
    user = accounts.find_by_email(session, email)
    if user is None or user.password_hash is None:
        _verify_dummy(password)
        audit.record(
            session,
            Action.AUTH_SIGNIN_FAILED,
            meta=meta,
            outcome=Outcome.FAILURE,
            details={"factor": "password", "known_account": False},
        )
        raise SignInFailed(SIGNIN_FAILED)
    if not _may_try(user):
        _verify_dummy(password)
        _failure(session, user, meta, "paused")
    if not accounts.hasher().verify_password(user.password_hash, password):
        _failure(session, user, meta, "password")
    if accounts.hasher().needs_rehash(user.password_hash):
        user.password_hash = accounts.hasher().hash_password(password)
    # ASVS 7.2.1: a right first factor is an authentication decision too, so it is audited.
    audit.record(
        session,
        Action.AUTH_PASSWORD_OK,
        actor=actor_of(user),
        meta=meta,
        target_type="user",
        target_id=user.public_id,
    )
    return FirstFactor(user, user.totp_enabled_at is not None)


def _may_try(user: User) -> bool:
    if user.disabled or user.must_reset:
        return False
    return user.locked_until is None or user.locked_until <= utcnow()


def _failure(
    session: Session,
    user: User,
    meta: RequestMeta,
    factor: str,
    message: str = SIGNIN_FAILED,
    action: Action = Action.AUTH_SIGNIN_FAILED,
) -> NoReturn:
    """Count a failed attempt, pause or lock the account as due, audit it as ``action``,
    and raise SignInFailed(message)."""
    if factor != "paused":
        user.failed_signins += 1
        excess = user.failed_signins - FREE_FAILURES
        if excess >= 0:
            delay = min(FIRST_DELAY_SECONDS * 2**excess, MAX_DELAY_SECONDS)
            user.locked_until = utcnow() + timedelta(seconds=delay)
        if user.failed_signins >= MAX_FAILURES and not user.must_reset:
            _lock(session, user, meta)
    audit.record(
        session,
        action,
        actor=actor_of(user),
        meta=meta,
        outcome=Outcome.FAILURE,
        target_type="user",
        target_id=user.public_id,
        details={"factor": factor, "failures": user.failed_signins},
    )
    raise SignInFailed(message)


def _lock(session: Session, user: User, meta: RequestMeta) -> None:
    """Lock the account (only an admin unlocks it), audit it, and tell its holder once.

    Called on the transition only: attempts on a locked account are "paused" and
    count no further, so each lock queues exactly one PHI-free notice (ASVS 2.2.3).
    """
    user.must_reset = True
    audit.record(
        session,
        Action.AUTH_LOCKOUT,
        actor=actor_of(user),
        meta=meta,
        outcome=Outcome.DENIED,
        target_type="user",
        target_id=user.public_id,
        details={"failures": user.failed_signins},
    )
    notices.enqueue(session, kind=NoticeKind.ACCOUNT_LOCKED, recipient=user, url=None)


def totp_secret(session: Session, user: User) -> str | None:
    """Return the user's TOTP secret (unsealed), or None when none is set."""
    if user.totp_secret_sealed is None:
        return None
    key = keys.unwrap(session, user.data_key_id)
    return keys.open_text(key, "users", "totp_secret", user.public_id, user.totp_secret_sealed)


class _Totp(Enum):
    """What a TOTP code turned out to be."""

    ACCEPTED = "accepted"
    WRONG = "wrong"
    REPLAYED = "replayed"  # right for its time step, but that step (or a later one) was used


def _claim_totp(session: Session, user: User, code: str) -> _Totp:
    secret = totp_secret(session, user)
    if secret is None or not otp.is_well_formed(code):
        return _Totp.WRONG
    step = otp.matching_step(
        secret, code, now=utcnow().timestamp(), drift_steps=current_settings().totp_drift
    )
    if step is None:
        return _Totp.WRONG
    claimed = session.execute(
        update(User)
        .where(User.id == user.id, or_(User.totp_last_step.is_(None), User.totp_last_step < step))
        .values(totp_last_step=step)
        .execution_options(synchronize_session=False)
    )
    if rowcount(claimed) != 1:
        return _Totp.REPLAYED
    session.refresh(user, ["totp_last_step"])
    return _Totp.ACCEPTED


def consume_totp(session: Session, user: User, code: str) -> bool:
    """Return True when ``code`` is valid now and newer than any code the user used before.

    The accepted time step is recorded by one conditional UPDATE, so a replay,
    an older step after a newer one, and two concurrent requests with one code
    all fail but one (RFC 6238 section 5.2). Only ASCII digits are accepted.
    """
    return _claim_totp(session, user, code) is _Totp.ACCEPTED


def _pepper() -> bytes:
    return keys.keyring().derive("recovery-codes")


def consume_recovery_code(session: Session, user: User, code: str, meta: RequestMeta) -> int | None:
    """Burn ``code`` if it is one of the user's unused recovery codes; return how many remain.

    Returns None when it matches none. Audited on use.
    """
    normalised = recovery.normalise_code(code)
    if len(normalised) != recovery.GROUPS * recovery.GROUP_LENGTH:
        return None
    digest = recovery.hash_code(normalised, _pepper())
    burned = session.execute(
        update(RecoveryCode)
        .where(
            RecoveryCode.user_id == user.id,
            RecoveryCode.code_hash == digest,
            RecoveryCode.used_at.is_(None),
        )
        .values(used_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if rowcount(burned) != 1:
        return None
    remaining = (
        session.scalar(
            select(func.count()).where(
                RecoveryCode.user_id == user.id, RecoveryCode.used_at.is_(None)
            )
        )
        or 0
    )
    audit.record(
        session,
        Action.AUTH_RECOVERY_USED,
        actor=actor_of(user),
        meta=meta,
        target_type="user",
        target_id=user.public_id,
        details={"remaining": remaining},
    )
    return int(remaining)


def second_factor(session: Session, user: User, code: str, meta: RequestMeta) -> int | None:
    """Complete sign-in with a TOTP code or a recovery code; return recovery codes left, if used.

    Resets the failure count and audits the sign-in. Raises SignInFailed
    (CODE_FAILED) for a wrong, replayed or malformed code, or a paused account.
    """
    remaining = _prove_code(session, user, code, meta, Action.AUTH_SIGNIN_FAILED)
    user.failed_signins, user.locked_until = 0, None
    audit.record(
        session,
        Action.AUTH_SIGNIN,
        actor=actor_of(user),
        meta=meta,
        target_type="user",
        target_id=user.public_id,
        details={"factor": "recovery" if remaining is not None else "totp"},
    )
    return remaining


def verify_code(
    session: Session, user: User, code: str, meta: RequestMeta, *, action: Action
) -> int | None:
    """Prove the second factor outside sign-in (re-authentication, password reset).

    The same pause, 100-failure lock and failure count as sign-in apply (ASVS 2.2.1,
    NIST SP 800-63B 5.2.2), so these forms are no side door for guessing codes. The
    outcome is audited as ``action`` (a replay as ``auth.code.replay``). The failure
    count is not reset: only a whole sign-in or a new password does that. Returns the
    recovery codes left when one was used, None for a TOTP code. Raises
    SignInFailed(CODE_FAILED) for a paused, locked or disabled account and for a wrong,
    replayed or malformed code; the caller commits the count either way.
    """
    remaining = _prove_code(session, user, code, meta, action)
    audit.record(
        session,
        action,
        actor=actor_of(user),
        meta=meta,
        target_type="user",
        target_id=user.public_id,
        details={"factor": "recovery" if remaining is not None else "totp"},
    )
    return remaining


def _prove_code(
    session: Session, user: User, code: str, meta: RequestMeta, failed: Action
) -> int | None:
    """Check a TOTP or recovery code for an unpaused, unlocked account; return recovery codes
    left (None for TOTP). Raises SignInFailed(CODE_FAILED), counted and audited as ``failed``."""
    if not _may_try(user):
        _failure(session, user, meta, "paused", CODE_FAILED, failed)
    totp = _claim_totp(session, user, code)
    if totp is _Totp.ACCEPTED:
        return None
    if totp is _Totp.REPLAYED:  # RFC 6238 5.2: a reused code is a signal, not a typo
        _failure(session, user, meta, "code", CODE_FAILED, Action.AUTH_CODE_REPLAY)
    remaining = consume_recovery_code(session, user, code, meta)
    if remaining is None:
        _failure(session, user, meta, "code", CODE_FAILED, failed)
    return remaining


def start_enrolment(session: Session, user: User, shown: str | None) -> tuple[str, str]:
    """Return a not yet enrolled user's inactive TOTP secret and its issue fingerprint.

    ``shown`` is the fingerprint this browser session was given before: when it
    still names the stored secret, that secret is shown again; otherwise a new
    one replaces it. So each enrolment session gets a secret of its own, and a
    second session (someone else holding only the password) never sees the
    secret the first one is about to turn on. The secret stays inactive until
    :func:`finish_enrolment` sees a correct code. Raises ServiceError
    (ALREADY_ENROLLED) for an enrolled user: an active factor is never replaced
    here, only by a proved change (portal.services.credentials), so a password
    alone can never enrol a factor for an enrolled account.
    """
    if user.totp_enabled_at is not None:
        raise ServiceError(ALREADY_ENROLLED)
    current = totp_secret(session, user)
    if (
        current is not None
        and shown is not None
        and hmac.compare_digest(shown, _issue_fingerprint(user))
    ):
        return current, shown
    secret = otp.new_secret()
    key = keys.unwrap(session, user.data_key_id)
    user.totp_secret_sealed = keys.seal_text(key, "users", "totp_secret", user.public_id, secret)
    user.totp_last_step = None
    session.flush()
    return secret, _issue_fingerprint(user)


def _issue_fingerprint(user: User) -> str:
    # Sealing is randomised, so the sealed bytes name one issue of a secret, not the secret.
    return hashlib.sha256(user.totp_secret_sealed or b"").hexdigest()


def finish_enrolment(
    session: Session, user: User, code: str, meta: RequestMeta, shown: str | None = None
) -> list[str]:
    """Activate the pending secret when ``code`` matches; return ten new recovery codes.

    ``shown`` must be the fingerprint :func:`start_enrolment` gave this session
    (another session's secret cannot be turned on from here). The enrolment
    code's time step is recorded, so it cannot be reused to sign in. Raises
    ServiceError when the code is wrong or the secret was replaced meanwhile.
    """
    if shown is None or not hmac.compare_digest(shown, _issue_fingerprint(user)):
        raise ServiceError(
            "This set-up was started again elsewhere. Scan the new QR code "
            "shown here and enter a code from it."
        )
    if user.totp_enabled_at is not None or not consume_totp(session, user, code):
        raise ServiceError(
            "That code is not right. Check the time on your phone, "
            "wait for the next code and enter it."
        )
    user.totp_enabled_at = utcnow()
    codes = new_recovery_codes(session, user)
    audit.record(
        session,
        Action.AUTH_MFA_ENROL,
        actor=actor_of(user),
        meta=meta,
        target_type="user",
        target_id=user.public_id,
    )
    return codes


def new_recovery_codes(session: Session, user: User) -> list[str]:
    """Replace the user's recovery codes with ten new ones; return them (shown once)."""
    session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
    codes = recovery.generate_codes()
    pepper = _pepper()
    session.add_all(
        RecoveryCode(user_id=user.id, code_hash=recovery.hash_code(c, pepper)) for c in codes
    )
    session.flush()
    return codes


def end_all_sessions(session: Session, user: User) -> None:
    """Delete every server-side session of ``user`` (disable, password change, MFA reset)."""
    session.execute(delete(WebSession).where(WebSession.user_id == user.id))


def purge_expired_sessions(session: Session, idle_seconds: int, lifetime_seconds: int) -> int:
    """Delete server-side sessions past their idle timeout or absolute lifetime; return how many.

    Every visitor with a form gets a row (the CSRF token lives in the session), mail
    scanners included, so ``portal retention run`` clears them out.
    """
    now = utcnow()
    result = session.execute(
        delete(WebSession).where(
            or_(
                WebSession.last_seen_at < now - timedelta(seconds=idle_seconds),
                WebSession.created_at < now - timedelta(seconds=lifetime_seconds),
            )
        )
    )
    return rowcount(result)


def set_password(
    session: Session,
    user: User,
    password: str,
    meta: RequestMeta,
    action: Action = Action.AUTH_PASSWORD_SET,
) -> None:
    """Set a new password after the policy check; end the user's other sessions. Audited
    as ``action``.

    Raises ServiceError with every reason the password is refused.
    """
    accounts.check_new_password(
        password, email=user.email, name=accounts.display_name(session, user)
    )
    user.password_hash = accounts.hasher().hash_password(password)
    user.failed_signins, user.locked_until, user.must_reset = 0, None, False
    end_all_sessions(session, user)
    audit.record(
        session,
        action,
        actor=actor_of(user),
        meta=meta,
        target_type="user",
        target_id=user.public_id,
    )


def check_current_password(session: Session, user: User, password: str, meta: RequestMeta) -> None:
    """Return when ``password`` is the signed-in user's current password.

    ASVS 2.1.6: changing a password needs the current one. A wrong one counts as a
    failed attempt (the same pause and lock as sign-in, ASVS 2.2.1), audited with
    factor ``current_password``; a paused account is refused whatever the password.
    Raises SignInFailed(NOT_CURRENT); the caller commits the count.
    """
    if not _may_try(user):
        _verify_dummy(password)
        _failure(session, user, meta, "paused", NOT_CURRENT)
    if user.password_hash is None or not accounts.hasher().verify_password(
        user.password_hash, password
    ):
        _failure(session, user, meta, "current_password", NOT_CURRENT)
