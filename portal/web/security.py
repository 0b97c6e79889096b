"""Request ids, request logging and the security headers on every response."""

from __future__ import annotations

import logging
import re
import secrets
import time

from flask import Flask, Response, current_app, g, request

from portal.audit import RequestMeta

log = logging.getLogger("portal.request")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")

# No inline script and no third-party origin (DESIGN.md: self-hosted static).
CSP = "; ".join((
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "font-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))


def init_app(app: Flask) -> None:
    """Register the before/after request hooks on ``app``."""
    app.before_request(_start)
    app.after_request(_headers)
    app.after_request(_log)


def _start() -> None:
    incoming = request.headers.get("X-Request-ID", "")
    g.request_id = incoming if _REQUEST_ID.fullmatch(incoming) else secrets.token_hex(12)
    g.started = time.perf_counter()


def request_meta() -> RequestMeta:
    """Return the current request's address, user agent and id for services and the audit trail."""
    return RequestMeta(client_ip=request.remote_addr,
                       user_agent=(request.user_agent.string or None),
                       request_id=g.get("request_id"))


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
    log.info("request", extra={"method": request.method, "rule": rule,
                               "status": response.status_code, "ms": round(elapsed, 1)})
    return response
