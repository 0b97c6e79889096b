"""Error pages that show no stack trace and no request data."""

from __future__ import annotations

import contextlib
import logging
import traceback

from flask import Flask, Response, g, render_template, request
from flask_login import current_user
from flask_wtf.csrf import CSRFError
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException, InternalServerError

from portal.audit import SYSTEM, Actor, actor_of
from portal.crypto.errors import ContentTampered
from portal.extensions import db
from portal.services import content
from portal.storage import StorageUnavailable
from portal.web import outage
from portal.web.security import request_meta
from portal.web.transaction import commit_now

log = logging.getLogger("portal.error")

MESSAGES = {
    400: ("Bad request", "The request could not be understood. Go back and try again."),
    403: ("Not allowed", "You do not have permission to open this page."),
    404: ("Not found", "There is nothing here. Check the link, or sign in and look in your inbox."),
    405: ("Not allowed", "This page cannot be used that way."),
    413: ("File too large", "The upload is larger than this portal accepts."),
    429: ("Too many attempts", "Too many attempts. Wait a few minutes, then try again."),
    500: (
        "Something went wrong",
        "An error occurred on our side. It has been logged; please try again later.",
    ),
    503: (
        "Temporarily unavailable",
        "The portal cannot reach its database right now, so "
        "nothing was saved. Please try again in a few minutes.",
    ),
    507: (
        "Cannot store files right now",
        "The server cannot store files right now, so "
        "nothing was sent or saved. Please try again later.",
    ),
}
# After the request's work was committed (the session could not be saved): never say
# "nothing was saved", or staff resend and a patient gets the message twice.
SAVED_BUT_UNAVAILABLE = (
    "Your last action was saved, but the portal lost its database before it could finish "
    "this page, and you may need to sign in again. Check the result before you try again."
)
TAMPERED_MESSAGE = (
    "This content failed its integrity check, so none of it was shown. "
    "The problem has been recorded and our team alerted. Please contact "
    "the practice."
)
CSRF_MESSAGE = (
    "This form has expired or was not sent from this site. Reload the page and try again."
)


def init_app(app: Flask) -> None:
    """Register a handler for every HTTP error and for unexpected exceptions."""
    app.register_error_handler(CSRFError, _csrf)
    app.register_error_handler(ContentTampered, _tampered)
    app.register_error_handler(StorageUnavailable, _storage_unavailable)
    for kind in outage.DATABASE_DOWN:
        app.register_error_handler(kind, _database_error)
    # First of all hooks: CSRF and rate limits must not judge a request whose session is lost.
    app.before_request_funcs.setdefault(None, []).insert(0, _session_store_down)
    app.register_error_handler(HTTPException, _http)
    app.register_error_handler(Exception, _unexpected)


def page(code: int, detail: str | None = None) -> tuple[str, int]:
    """Return the rendered error page for ``code`` with a fixed, data-free message."""
    title, text = MESSAGES.get(code, MESSAGES[500] if code >= 500 else MESSAGES[400])
    return render_template("error.html", code=code, title=title, text=detail or text), code


def _tampered(_error: ContentTampered) -> tuple[str, int]:
    report_tampered("before_response")
    return page(500, TAMPERED_MESSAGE)


def report_tampered(stage: str) -> None:
    """Audit tampered content of the current request (content.tampered) in a transaction of
    its own, committed although the request fails; the request's own work is rolled back.

    The ids come from the route's ``message_id``/``attachment_id`` (staff routes name
    the message ``public_id``). If even this event
    cannot be written, the CRITICAL log line is the alert. Returns None, raises nothing.
    """
    db.session.rollback()
    args = request.view_args or {}
    try:
        content.record_tampered(
            db.session,
            actor=_actor(),
            meta=request_meta(),
            stage=stage,
            message_public_id=_text(
                args.get("message_id")
                or (args.get("public_id") if request.blueprint == "staff" else None)
            ),
            attachment_public_id=_text(args.get("attachment_id")),
        )
        commit_now()  # the request failed (rolled back at its boundary); this event must not
    except SQLAlchemyError:
        db.session.rollback()
        log.critical(
            "content failed its integrity check; audit event not written",
            extra={
                "event": "content_tampered",
                "stage": stage,
                "rule": request.url_rule.rule if request.url_rule else None,
            },
        )


def _actor() -> Actor:
    user = current_user
    return actor_of(user) if user and user.is_authenticated else SYSTEM


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _csrf(_error: CSRFError) -> tuple[str, int]:
    return page(400, CSRF_MESSAGE)


def _http(error: HTTPException) -> tuple[str, int] | tuple[str, int, dict[str, str]]:
    code = error.code or 500
    if code == 500 and isinstance(error, InternalServerError) and error.original_exception:
        return _unexpected(error.original_exception)
    return page(code)


def _database_error(error: Exception) -> tuple[str, int] | tuple[str, int, dict[str, str]]:
    # The classes outages arrive as also carry bugs (a missing table, a deadlock, a statement
    # timeout): only a real outage gets the quiet 503, anything else its logged 500.
    return database_down(error) if outage.is_outage(error) else _unexpected(error)


def database_down(
    error: BaseException, *, committed: bool = False
) -> tuple[str, int, dict[str, str]]:
    """Return the 503 retry page for a database outage; log only an outage's first request.

    The request's work is rolled back (``committed``: it was already committed and the
    page says so); its session is not saved (``g.database_down``).
    """
    g.database_down = True
    with contextlib.suppress(*outage.DATABASE_DOWN, SQLAlchemyError):
        db.session.rollback()
    outage.database.failed(error)
    body, code = page(503, SAVED_BUT_UNAVAILABLE if committed else None)
    return body, code, {"Retry-After": str(outage.RETRY_AFTER_SECONDS)}


def database_down_response(
    response: Response, error: BaseException, *, committed: bool = False
) -> None:
    """Turn ``response`` into the 503 retry page: for an outage met after the view returned
    (``committed``: saving the session, after the request's work was committed). Returns None."""
    body, code, headers = database_down(error, committed=committed)
    response.set_data(body)
    response.status_code = code
    response.mimetype = "text/html"
    response.headers.update(headers)


def _session_store_down() -> None:
    # The session could not be loaded (portal.auth.sessions): answer as for any outage,
    # from inside the request so the usual handlers and headers apply.
    if "session_error" in g:
        raise g.session_error


def _storage_unavailable(error: StorageUnavailable) -> tuple[str, int]:
    db.session.rollback()  # deletes the request's blobs written so far (services.content)
    log.warning(
        "blob store cannot store files",
        extra={
            "event": "blob_store_unavailable",
            "errno": error.errno,
            "rule": request.url_rule.rule if request.url_rule else None,
        },
    )
    return page(507)


def _unexpected(error: BaseException) -> tuple[str, int] | tuple[str, int, dict[str, str]]:
    if isinstance(error, HTTPException):
        return _http(error)
    if isinstance(error, outage.DATABASE_DOWN) and outage.is_outage(error):
        return database_down(error)
    # The page renders with the signed-in user; on PostgreSQL a failed statement leaves the
    # transaction aborted, so end it first (the boundary rolls back the request anyway).
    with contextlib.suppress(*outage.DATABASE_DOWN, SQLAlchemyError):
        db.session.rollback()
    # The type and the frames, never the message or locals: they can carry PHI.
    log.error(
        "unhandled exception",
        extra={
            "rule": request.url_rule.rule if request.url_rule else None,
            "exception": type(error).__name__,
            "stack": [
                f"{f.filename}:{f.lineno} in {f.name}"
                for f in traceback.extract_tb(error.__traceback__)
            ],
        },
    )
    return page(500)
