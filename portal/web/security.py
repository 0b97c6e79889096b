"""Request ids, request logging and the security headers on every response."""

from __future__ import annotations

import logging
import re
import secrets
import time

from flask import Flask, Response, abort, current_app, g, request

from portal.audit import RequestMeta

log = logging.getLogger("portal.request")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # never stored: NUL breaks PostgreSQL text, the rest logs
_MAX_AGENT = 256  # the audit column's width

# No inline script and no third-party origin (static files are self-hosted).
CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)


def init_app(app: Flask) -> None:
    """Register the before/after request hooks on ``app``."""
    app.before_request(_start)
    app.before_request(_refuse_nul)
    app.after_request(_headers)
    app.after_request(_log)


def _start() -> None:
    incoming = request.headers.get("X-Request-ID", "")
    g.request_id = incoming if _REQUEST_ID.fullmatch(incoming) else secrets.token_hex(12)
    g.started = time.perf_counter()


def _refuse_nul() -> None:
    # No text a user types may carry NUL: PostgreSQL text cannot hold it (a query with one
    # fails as a DataError, a 500) and nothing legitimate sends it. Checked once here for the
    # path, the query string and urlencoded forms (multipart bodies are parsed by their views).
    fields = [request.path, *request.args.keys(), *request.args.values()]
    if request.mimetype == "application/x-www-form-urlencoded":
        fields += [*request.form.keys(), *request.form.values()]
    if any("\x00" in field for field in fields):
        abort(400)


def request_meta() -> RequestMeta:
    """Return the current request's address, user agent and id for services and the audit trail."""
    agent = _CONTROL.sub("", request.user_agent.string or "")[:_MAX_AGENT]
    return RequestMeta(
        client_ip=request.remote_addr, user_agent=agent or None, request_id=g.get("request_id")
    )


def _headers(response: Response) -> Response:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CSP)
    headers["Referrer-Policy"] = "no-referrer"
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    headers["Permissions-Policy"] = "camera=(), microphone=(), geolocation=()"
    if "request_id" in g:
        headers["X-Request-ID"] = g.request_id
    if not request.path.startswith("/static/"):
        headers.setdefault("Cache-Control", "no-store")
    if current_app.config["BASE_URL"].startswith("https://"):
        headers["Strict-Transport-Security"] = "max-age=63072000; includeSubDomains"
    return response


def _log(response: Response) -> Response:
    rule = request.url_rule.rule if request.url_rule else "(no route)"
    elapsed = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
    log.info(
        "request",
        extra={
            "method": request.method,
            "rule": rule,
            "status": response.status_code,
            "ms": round(elapsed, 1),
        },
    )
    return response
