"""Error pages that show no stack trace and no request data."""

from __future__ import annotations

import logging
import traceback

from flask import Flask, render_template, request
from flask_login import current_user
from flask_wtf.csrf import CSRFError
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException, InternalServerError

from portal.audit import SYSTEM, Actor
from portal.crypto.errors import ContentTampered
from portal.extensions import db
from portal.services import content
from portal.web.security import request_meta

log = logging.getLogger("portal.error")

MESSAGES = {
    400: ("Bad request", "The request could not be understood. Go back and try again."),
    403: ("Not allowed", "You do not have permission to open this page."),
    404: ("Not found", "There is nothing here. Check the link, or sign in and look in your inbox."),
    405: ("Not allowed", "This page cannot be used that way."),
    413: ("File too large", "The upload is larger than this portal accepts."),
    429: ("Too many attempts", "Too many attempts. Wait a few minutes, then try again."),
    500: ("Something went wrong", "An error occurred on our side. It has been logged; "
          "please try again later."),
}
TAMPERED_MESSAGE = ("This content failed its integrity check, so none of it was shown. "
                    "The problem has been recorded and our team alerted. Please contact "
                    "the practice.")
CSRF_MESSAGE = ("This form has expired or was not sent from this site. "
                "Reload the page and try again.")


def init_app(app: Flask) -> None:
    """Register a handler for every HTTP error and for unexpected exceptions."""
    app.register_error_handler(CSRFError, _csrf)
    app.register_error_handler(ContentTampered, _tampered)
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
        content.record_tampered(db.session, actor=_actor(), meta=request_meta(), stage=stage,
                                message_public_id=_text(args.get("message_id") or (
                                    args.get("public_id") if request.blueprint == "staff"
                                    else None)),
                                attachment_public_id=_text(args.get("attachment_id")))
        db.session.commit()
    except SQLAlchemyError:
        db.session.rollback()
        log.critical("content failed its integrity check; audit event not written", extra={
            "event": "content_tampered", "stage": stage,
            "rule": request.url_rule.rule if request.url_rule else None})


def _actor() -> Actor:
    user = current_user
    return Actor(user.id, user.role) if user and user.is_authenticated else SYSTEM


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _csrf(_error: CSRFError) -> tuple[str, int]:
    return page(400, CSRF_MESSAGE)


def _http(error: HTTPException) -> tuple[str, int]:
    code = error.code or 500
    if code == 500 and isinstance(error, InternalServerError) and error.original_exception:
        return _unexpected(error.original_exception)
    return page(code)


def _unexpected(error: Exception) -> tuple[str, int]:
    if isinstance(error, HTTPException):
        return _http(error)
    # The type and the frames, never the message or locals: they can carry PHI.
    log.error("unhandled exception", extra={
        "rule": request.url_rule.rule if request.url_rule else None,
        "exception": type(error).__name__,
        "stack": [f"{f.filename}:{f.lineno} in {f.name}"
                  for f in traceback.extract_tb(error.__traceback__)],
    })
    return page(500)
