"""A test client that fills forms the way a browser does: GET the page, send its CSRF token."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from werkzeug.test import TestResponse

from portal.database import utcnow
from portal.extensions import db
from portal.models import Notification, User
from portal.security import otp
from portal.services import notices, signin
from tests.support.teams import TEST_TEAM, put_in_team

_CSRF = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')


class Browser:
    """Wraps a Flask test client; ``submit`` posts a form with the page's CSRF token."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.client: FlaskClient = app.test_client()

    def get(self, url: str, **kwargs: Any) -> TestResponse:
        return self.client.get(url, **kwargs)

    def token(self, url: str) -> str:
        page = self.client.get(url)
        match = _CSRF.search(page.get_data(as_text=True))
        assert match, f"no form on {url} ({page.status_code})"
        return match.group(1)

    def submit(
        self,
        url: str,
        data: dict[str, str] | None = None,
        *,
        form_page: str | None = None,
        **kwargs: Any,
    ) -> TestResponse:
        """POST ``data`` to ``url`` with the CSRF token from ``form_page`` (default ``url``)."""
        fields = {"csrf_token": self.token(form_page or url), **(data or {})}
        return self.client.post(url, data=fields, **kwargs)

    def cookie(self) -> str | None:
        found = self.client.get_cookie("session")
        return found.value if found else None

    def sign_in(
        self,
        email: str,
        password: str,
        secret: str | None = None,
        code: str | None = None,
        next_url: str = "",
    ) -> TestResponse:
        """Both factors; returns the response to the code step (or the password step)."""
        url = "/signin" + (f"?next={next_url}" if next_url else "")
        first = self.submit(url, {"email": email, "password": password})
        if first.status_code != 302 or not first.location.endswith("/signin/code"):
            return first
        return self.submit("/signin/code", {"code": code or current_code(secret or "")})


def current_code(secret: str, offset_steps: int = 0) -> str:
    """The TOTP code for ``secret`` at the portal's (movable) clock."""
    step = int(utcnow().timestamp() // otp.STEP_SECONDS) + offset_steps
    return otp.code_at(secret, step)


def next_code(secret: str) -> str:
    """A code one step ahead (within the accepted drift), so it is new after a used one."""
    return current_code(secret, 1)


def enrolled_user(
    app: Flask,
    role: str = "staff",
    email: str = "sam@example.org",
    password: str = "Correct horse battery staple 42",
    name: str = "Sam Staffer",
    team: str | None = TEST_TEAM,
) -> tuple[User, str, list[str]]:
    """Create a user with a password and an enrolled authenticator; return (user, secret, codes).

    The enrolment code used an older time step, so current codes still work. Staff join
    the care team ``team`` (None: no team).
    """
    from portal.audit import NO_REQUEST, SYSTEM
    from portal.services import accounts

    with app.app_context():
        kwargs = {"dob": utcnow().date() - timedelta(days=365 * 30)} if role == "patient" else {}
        user = accounts.create_user(
            db.session,
            role=role,
            email=email,
            name=name,
            password=password,
            actor=SYSTEM,
            meta=NO_REQUEST,
            **kwargs,
        ).user
        if role == "staff" and team is not None:
            put_in_team(db.session, user, team)
        secret, shown = signin.start_enrolment(db.session, user, None)
        codes = _finish_enrolment(db.session, user, secret, shown)
        db.session.commit()
        return user, secret, codes


def _finish_enrolment(session: Any, user: User, secret: str, shown: str) -> list[str]:
    """Enrol with the code of the step before the current one (so current codes stay new).

    That code is one step old when it is made; if a step boundary passes before the portal
    checks it (a loaded machine), it is two steps old and rightly refused: make it again.
    """
    from portal.audit import NO_REQUEST
    from portal.services.errors import ServiceError

    for _ in range(3):
        step = int(utcnow().timestamp() // otp.STEP_SECONDS)
        try:
            return signin.finish_enrolment(
                session, user, otp.code_at(secret, step - 1), NO_REQUEST, shown
            )
        except ServiceError:
            if int(utcnow().timestamp() // otp.STEP_SECONDS) == step:
                raise
    raise AssertionError("the clock crossed a TOTP step on each of three tries")


def outbox_url(app: Flask, kind: str) -> str:
    """The URL in the newest queued notice of ``kind`` (as the notifier would send it)."""
    with app.app_context():
        row = db.session.scalars(
            select(Notification).where(Notification.kind == kind).order_by(Notification.id.desc())
        ).first()
        assert row is not None, f"no {kind} notice queued"
        url = notices.open_payload(db.session, row)
        assert url
        return "/" + url.split("://", 1)[1].split("/", 1)[1]
