"""Who may use a view. Every view states its roles; MFA is implied by being signed in.

A user is only ever logged in (flask-login) after both factors; someone
half-way (password right, code pending) or still enrolling is not, so they
reach nothing but the sign-in and enrolment pages.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeGuard, TypeVar
from urllib.parse import urlsplit

from flask import abort, redirect, request, session, url_for
from flask_login import current_user

from portal.database import utcnow
from portal.models import Role

F = TypeVar("F", bound=Callable[..., Any])
REAUTH_SECONDS = 5 * 60  # sensitive actions need a password or code this recent


def is_internal_path(target: str | None) -> TypeGuard[str]:
    """Return True for a same-site path such as ``/inbox?page=2`` (no scheme, host or ``//``)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return False
    parts = urlsplit(target)
    return not parts.scheme and not parts.netloc and all(c.isprintable() for c in target)


# Each role's landing page; blueprints that are not installed yet fall back to the account.
HOMES: dict[Role, str] = {
    Role.ADMIN: "admin.users",
    Role.STAFF: "staff.index",
    Role.AUDITOR: "auditor.search",
    Role.PATIENT: "pickup.inbox",
}


def home_for(role: str) -> str:
    """Return the landing page of ``role``."""
    return HOMES.get(Role(role), "auth.account")


def roles(*allowed: Role) -> Callable[[F], F]:
    """Let signed-in users with one of ``allowed`` roles through; others get 403.

    Anonymous visitors are sent to sign in and come back afterwards.
    """

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not current_user.is_authenticated:
                return redirect(url_for("auth.signin", next=request.full_path.rstrip("?")))
            if current_user.role not in allowed:
                abort(403)
            return view(*args, **kwargs)

        # mypy: functools.wraps keeps the view's signature at run time but not its ParamSpec for
        #   mypy.
        return wrapper  # type: ignore[return-value]

    return decorate


def signed_in(view: F) -> F:
    """Any signed-in user (both factors passed), whatever the role."""
    return roles(*Role)(view)


def mark_reauthenticated() -> None:
    """Record that the user just proved a factor (sign-in or re-authentication)."""
    session["reauth_at"] = utcnow().timestamp()


def recently_authenticated() -> bool:
    """Return True when the user proved a factor within the last five minutes."""
    return utcnow().timestamp() - float(session.get("reauth_at", 0)) < REAUTH_SECONDS


def fresh_auth(view: F) -> F:
    """Sensitive actions (revoke, export, rotate keys, change MFA): re-authenticate first."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not recently_authenticated():
            back = (
                request.full_path.rstrip("?")
                if request.method == "GET"
                else request.form.get("back")
            )
            target = back if is_internal_path(back) else None
            return redirect(url_for("auth.reauth", next=target))
        return view(*args, **kwargs)

    # mypy: functools.wraps keeps the view's signature at run time but not its ParamSpec for
    #   mypy.
    return wrapper  # type: ignore[return-value]


# Navigation per role: (endpoint, label). Blueprints add theirs when they register.
NAV: dict[Role, list[tuple[str, str]]] = {
    Role.ADMIN: [
        ("admin.users", "Accounts"),
        ("admin.teams_page", "Care teams"),
        ("admin.keys", "Keys"),
    ],
    Role.STAFF: [
        ("staff.inbox", "Team inbox"),
        ("staff.index", "Sent messages"),
        ("staff.patients", "Patients"),
    ],
    Role.AUDITOR: [
        ("auditor.search", "Audit trail"),
        ("auditor.disclosures_report", "Disclosures"),
        ("auditor.verify", "Verify"),
    ],
    Role.PATIENT: [
        ("pickup.inbox", "Messages"),
        ("pickup.conversations", "Conversations"),
        ("pickup.history", "Access history"),
    ],
}


def nav_links(role: str) -> list[tuple[str, str]]:
    """Return the navigation links for ``role``."""
    return NAV.get(Role(role), [])
