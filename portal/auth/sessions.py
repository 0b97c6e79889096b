"""Server-side sessions (OWASP ASVS V3): revocable, renewed at sign-in, idle and absolute expiry.

Flask's default session is a signed cookie that stays valid after sign-out.
Here the cookie carries a random 256-bit token; the server keeps only its
SHA-256 and the session's data (ids and flags, never PHI or secrets). Deleting
the row ends the session everywhere: sign-out, account disabled, password
changed.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import datetime, timedelta
from typing import Any

from flask import Flask, Request, Response, g
from flask.sessions import SessionInterface, SessionMixin
from sqlalchemy import bindparam, delete, insert, select, update
from werkzeug.datastructures import CallbackDict

from portal.database import utcnow
from portal.extensions import db
from portal.models import User, WebSession
from portal.web.outage import DATABASE_DOWN, is_outage

TOUCH_EVERY = timedelta(seconds=30)  # last_seen_at is written at most this often
# Health probes (portal.web.health) use no session: their answer never depends on who asks,
# and /readyz checks the database on a connection of its own, which the request's (holding
# the session's row) would make a second one at once (tests/web/test_pool_size.py).
PROBES = frozenset({"/healthz", "/readyz"})


class ServerSession(CallbackDict[str, Any], SessionMixin):
    """Session data plus what the store needs to know about the row behind it."""

    def __init__(
        self,
        initial: dict[str, Any] | None = None,
        *,
        row_id: int | None = None,
        created_at: datetime | None = None,
        last_seen_at: datetime | None = None,
        expired: bool = False,
        user: User | None = None,
    ) -> None:
        def on_update(_self: Any) -> None:
            self.modified = True

        super().__init__(initial or {}, on_update)
        self.row_id = row_id
        self.created_at = created_at or utcnow()
        self.last_seen_at = last_seen_at
        self.expired = expired
        self.user = user  # the row's user, loaded with it: not session data, never stored
        self.renew = False
        self.modified = False
        self.ended = False

    def regenerate(self) -> None:
        """Issue a new token at the end of this request (sign-in, privilege change)."""
        self.renew = True
        self.modified = True

    def end(self) -> None:
        """Delete this session on the server (sign-out)."""
        self.clear()
        self.ended = True


# Built once: the session's row and its user, whose row lands in the request's identity map.
_LOAD = (
    select(WebSession.__table__, User)
    .outerjoin(User, User.id == WebSession.user_id)
    .where(WebSession.token_hash == bindparam("token_hash"))
)


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class DatabaseSessionInterface(SessionInterface):
    """Stores sessions in the ``web_sessions`` table: read in the request's own transaction
    (with the signed-in user), written through short transactions of their own."""

    def open_session(self, app: Flask, request: Request) -> ServerSession:
        token = request.cookies.get(self.get_cookie_name(app), "")
        if not token or len(token) > 100 or request.path in PROBES:
            return ServerSession()
        try:
            return self._load(app, token)
        except DATABASE_DOWN as error:
            if not is_outage(error):
                raise
            # Raised again by a before_request hook (portal.web.errors), so the outage gets
            # the 503 page there instead of Flask's bare 500 from outside the request.
            g.session_error = error
            return ServerSession()

    def _load(self, app: Flask, token: str) -> ServerSession:
        # One statement, in the request's own transaction: the row, and its signed-in user
        # (the user loader finds it in the identity map, portal.auth.views.load_user), not
        # a checkout and a transaction of its own plus the user's query (README "Inbox").
        row = db.session.execute(_LOAD, {"token_hash": _hash(token)}).first()
        if row is None:
            return ServerSession(expired=True)
        now = utcnow()
        idle = timedelta(seconds=app.config["SESSION_IDLE"])
        lifetime = timedelta(seconds=app.config["SESSION_LIFETIME"])
        if row.last_seen_at + idle < now or row.created_at + lifetime < now:
            self._delete(row.id)
            return ServerSession(expired=True)
        return ServerSession(
            json.loads(row.data),
            row_id=row.id,
            created_at=row.created_at,
            last_seen_at=row.last_seen_at,
            user=row.User,
        )

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        if g.get("database_down") or not isinstance(session, ServerSession):
            return  # the request met a database outage (portal.web.errors): keep the row as is
        try:
            self._save(app, session, response)
        except DATABASE_DOWN as error:
            if not is_outage(error):
                raise
            from portal.web.errors import database_down_response

            # Drop the cookie too, so a sign-out (whose row could not be deleted) still signs
            # out here; say "saved" only when the request's work was in fact committed.
            database_down_response(response, error, committed=bool(g.get("committed")))
            response.delete_cookie(
                self.get_cookie_name(app),
                path=self.get_cookie_path(app),
                domain=self.get_cookie_domain(app),
            )

    def _save(self, app: Flask, session: ServerSession, response: Response) -> None:
        name, domain, path = (
            self.get_cookie_name(app),
            self.get_cookie_domain(app),
            self.get_cookie_path(app),
        )
        if session.ended or (not session and session.row_id is not None):
            self._delete(session.row_id)
            response.delete_cookie(name, domain=domain, path=path)
            return
        if not session:
            if session.expired:
                response.delete_cookie(name, domain=domain, path=path)
            return
        if session.row_id is None or session.renew:
            self._delete(session.row_id)
            self._insert(app, session, response)
        elif session.modified or self._stale(session):
            self._update(session)

    @staticmethod
    def _stale(session: ServerSession) -> bool:
        return session.last_seen_at is None or session.last_seen_at + TOUCH_EVERY < utcnow()

    def _insert(self, app: Flask, session: ServerSession, response: Response) -> None:
        token = secrets.token_urlsafe(32)
        now = utcnow()
        created = now if session.renew or session.row_id is None else session.created_at
        with db.engine.begin() as connection:
            connection.execute(
                insert(WebSession).values(
                    token_hash=_hash(token),
                    user_id=session.get("uid"),
                    data=json.dumps(dict(session)),
                    created_at=created,
                    last_seen_at=now,
                )
            )
        response.set_cookie(
            self.get_cookie_name(app),
            token,
            httponly=True,
            secure=self.get_cookie_secure(app),
            samesite=self.get_cookie_samesite(app),
            domain=self.get_cookie_domain(app),
            path=self.get_cookie_path(app),
        )  # no expiry: gone when the browser closes

    @staticmethod
    def _update(session: ServerSession) -> None:
        with db.engine.begin() as connection:
            connection.execute(
                update(WebSession)
                .where(WebSession.id == session.row_id)
                .values(
                    data=json.dumps(dict(session)),
                    user_id=session.get("uid"),
                    last_seen_at=utcnow(),
                )
            )

    @staticmethod
    def _delete(row_id: int | None) -> None:
        if row_id is not None:
            with db.engine.begin() as connection:
                connection.execute(delete(WebSession).where(WebSession.id == row_id))
