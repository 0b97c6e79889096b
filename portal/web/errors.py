"""Error pages that show no stack trace and no request data."""

from __future__ import annotations

import logging
import traceback

from flask import Flask, render_template, request
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException, InternalServerError

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
CSRF_MESSAGE = ("This form has expired or was not sent from this site. "
                "Reload the page and try again.")


def init_app(app: Flask) -> None:
    """Register a handler for every HTTP error and for unexpected exceptions."""
    app.register_error_handler(CSRFError, _csrf)
    app.register_error_handler(HTTPException, _http)
    app.register_error_handler(Exception, _unexpected)


def page(code: int, detail: str | None = None) -> tuple[str, int]:
    """Return the rendered error page for ``code`` with a fixed, data-free message."""
    title, text = MESSAGES.get(code, MESSAGES[500] if code >= 500 else MESSAGES[400])
    return render_template("error.html", code=code, title=title, text=detail or text), code


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
