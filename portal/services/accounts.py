"""Accounts: create users of every role, with their sealed name and verification data."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import date

from email_validator import EmailNotValidError, validate_email
from flask import current_app
from sqlalchemy import select
from sqlalchemy.orm import Session

from portal import audit
from portal.audit import Action, Actor, RequestMeta
from portal.config import current_settings
from portal.models import PatientProfile, Role, User
from portal.models.types import new_public_id
from portal.security import passwords
from portal.services import keys
from portal.services.errors import ServiceError

MAX_NAME = 200
ACCESS_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I/L
ACCESS_CODE_GROUPS = 3


@dataclass(frozen=True)
class NewUser:
    """A created user and, when one was issued, the access code to hand over once."""

    user: User
    access_code: str | None


def normalise_email(raw: str) -> str:
    """Return the normalised, lower-cased address; ServiceError when it is not an address."""
    try:
        return validate_email(raw.strip(), check_deliverability=False).normalized.lower()
    except EmailNotValidError:
        raise ServiceError("Enter a valid email address, like name@example.org.") from None


def _check_name(name: str) -> str:
    name = " ".join(name.split())
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise ServiceError(f"Enter the person's full name (1 to {MAX_NAME} characters).")
    return name


def _check_dob(dob: date | None) -> None:
    if dob is not None and not date(1900, 1, 1) <= dob <= date.today():
        raise ServiceError("Enter a date of birth between 1900 and today.")


def new_access_code() -> str:
    """Return a random access code such as ``KX7P-M2QD-9TRH`` (about 59 bits)."""
    groups = (
        "".join(secrets.choice(ACCESS_CODE_ALPHABET) for _ in range(4))
        for _ in range(ACCESS_CODE_GROUPS)
    )
    return "-".join(groups)


def normalise_access_code(code: str) -> str:
    """Return ``code`` upper-cased without spaces or dashes, as it is hashed and compared."""
    return "".join(ch for ch in code.upper() if ch.isalnum())


def blocklist() -> passwords.Blocklist | None:
    """Return the deployment's breached-password list (PORTAL_PASSWORD_BLOCKLIST), if set."""
    path = current_settings().password_blocklist
    if not path:
        return None
    cached = current_app.extensions.get("password_blocklist")
    if cached is None:
        cached = current_app.extensions["password_blocklist"] = passwords.Blocklist.from_file(path)
    return cached


def hasher() -> passwords.PasswordHasher:
    """Return the app's argon2id hasher (portal.config.password_hasher); the production
    one outside an app built by create_app. Raises nothing."""
    found = current_app.extensions.get("password_hasher")
    return found if isinstance(found, passwords.PasswordHasher) else passwords.default_hasher()


def check_new_password(password: str, *, email: str, name: str) -> None:
    """Raise ServiceError with every reason ``password`` is refused (NIST SP 800-63B 5.1.1.2).

    Context-specific words refused include the product's and the organisation's names.
    """
    problems = passwords.check_password(
        password,
        email=email,
        name=name,
        organisation=current_settings().org_name,
        blocklist=blocklist(),
    )
    if problems:
        raise ServiceError(*problems)


def create_user(
    session: Session,
    *,
    role: str,
    email: str,
    name: str,
    actor: Actor,
    meta: RequestMeta,
    dob: date | None = None,
    issue_access_code: bool = False,
    password: str | None = None,
) -> NewUser:
    """Create a user (flushed, audited) and return it with any access code issued.

    Patients need a date of birth or an access code to prove identity at first
    pickup. Raises ServiceError for a bad or duplicate email, name, date of
    birth, role or password.
    """
    if role not in set(Role):
        raise ServiceError("Choose a role: patient, staff, auditor or admin.")
    email, name = normalise_email(email), _check_name(name)
    _check_dob(dob)
    if role == Role.PATIENT and dob is None and not issue_access_code:
        raise ServiceError("Give the patient's date of birth or issue an access code.")
    if session.scalar(select(User.id).where(User.email == email)) is not None:
        raise ServiceError("An account with this email address already exists.")
    if password is not None:
        check_new_password(password, email=email, name=name)
    user = _insert_user(session, role, email, name, actor, password)
    code = _patient_profile(session, user, dob, issue_access_code) if role == Role.PATIENT else None
    audit.record(
        session,
        Action.USER_CREATE,
        actor=actor,
        meta=meta,
        target_type="user",
        target_id=user.public_id,
        patient_id=user.id if role == Role.PATIENT else None,
        details={"role": role, "access_code": code is not None},
    )
    return NewUser(user, code)


def _insert_user(
    session: Session, role: str, email: str, name: str, actor: Actor, password: str | None
) -> User:
    key_row, key = keys.create(session, "user")
    public_id = new_public_id()
    user = User(
        public_id=public_id,
        role=role,
        email=email,
        data_key_id=key_row.id,
        name_sealed=keys.seal_text(key, "users", "name", public_id, name),
        password_hash=hasher().hash_password(password) if password else None,
        created_by_id=actor.id,
    )
    session.add(user)
    session.flush()
    return user


def _patient_profile(
    session: Session, user: User, dob: date | None, issue_access_code: bool
) -> str | None:
    key = keys.unwrap(session, user.data_key_id)
    code = new_access_code() if issue_access_code else None
    profile = PatientProfile(
        user_id=user.id,
        dob_sealed=(
            keys.seal_text(key, "patient_profiles", "dob", user.public_id, dob.isoformat())
            if dob
            else None
        ),
        access_code_hash=hasher().hash_password(normalise_access_code(code)) if code else None,
    )
    session.add(profile)
    session.flush()
    return code


def display_name(session: Session, user: User) -> str:
    """Return the user's name, unsealed; raises ContentDestroyed if their key was shredded."""
    key = keys.unwrap(session, user.data_key_id)
    return keys.open_text(key, "users", "name", user.public_id, user.name_sealed)


def find_by_email(session: Session, email: str) -> User | None:
    """Return the user with this address (normalised), or None; never raises for bad input."""
    try:
        address = normalise_email(email)
    except ServiceError:
        return None
    return session.scalar(select(User).where(User.email == address))


def find_by_public_id(
    session: Session, public_id: str | None, role: Role | None = None
) -> User | None:
    """Return the account with this opaque public id (and ``role`` when given), or None."""
    stmt = select(User).where(User.public_id == (public_id or "").strip())
    if role is not None:
        stmt = stmt.where(User.role == role)
    return session.scalar(stmt)
