"""The notifier's health endpoint: ``notifier run --health-port N`` (127.0.0.1 by default).

``GET /health`` (or ``/``) answers the report ``notifier status --json`` prints,
judged for this worker: 200 when its heartbeat is fresh and its last transport
error (if any) is no longer current, else 503, as it is when the database is
unreachable. Standard library only (http.server in a daemon thread), imported
only when the endpoint is asked for. It is the notifier's: the portal's
``/readyz`` stays the portal's.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from flask import Flask

from notifier import health
from portal.database import utcnow

log = logging.getLogger(__name__)

PATHS = frozenset({"/", "/health"})


def answer(app: Flask, worker_id: str) -> tuple[int, bytes]:
    """Return (HTTP status, JSON body) of the health check of ``worker_id`` now."""
    body = health.read(app, utcnow()).as_dict(worker_id)
    status = HTTPStatus.OK if body["healthy"] else HTTPStatus.SERVICE_UNAVAILABLE
    return status, json.dumps(body, sort_keys=True).encode() + b"\n"


class HealthServer(ThreadingHTTPServer):
    """The HTTP server, knowing the app and worker id its handler reports on."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: Flask, worker_id: str) -> None:
        super().__init__(address, _Handler)
        self.app, self.worker_id = app, worker_id


class _Handler(BaseHTTPRequestHandler):
    server: HealthServer

    def do_GET(self) -> None:  # the name http.server dispatches GET to
        if self.path.split("?", 1)[0] not in PATHS:
            self._send(HTTPStatus.NOT_FOUND, b'{"error": "not found"}\n')
            return
        self._send(*answer(self.server.app, self.server.worker_id))

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: a probe every few seconds is not worth a log line."""


def start(app: Flask, worker_id: str, host: str, port: int) -> HealthServer:
    """Listen on ``host:port`` (0: any free port, see ``server_address``) in a daemon thread.

    Raises OSError when the address cannot be bound (in use, not local, no permission).
    """
    server = HealthServer((host, port), app, worker_id)
    threading.Thread(target=server.serve_forever, name="notifier-health", daemon=True).start()
    log.info("health endpoint listening on %s:%d", host, server.server_address[1])
    return server
