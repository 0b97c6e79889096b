"""``portal.wsgi:app`` for any WSGI server. A wrong setting exits with one line.

Each process that loads it first sweeps the partial uploads of killed processes
(``portal serve`` workers included); live uploads hold a lock and are left alone. It
logs one WARNING when uploads are not malware-scanned (``PORTAL_SCAN_UPLOADS=off``, the
default without ``PORTAL_CLAMD_SOCKET``), so an unscanned deployment says so at start.
"""

from __future__ import annotations

import logging
import sys

from flask import Flask

from portal import create_app
from portal.config import ConfigError, settings_of
from portal.services import upload_scans

log = logging.getLogger("portal.startup")


def sweep_partial_uploads(flask_app: Flask) -> int:
    """Delete partial uploads left by killed processes; return how many (0 if unreadable)."""
    from portal.services import content

    with flask_app.app_context():
        try:
            removed = content.sweep_partial_uploads()
        except OSError as error:
            log.warning(
                "could not sweep partial uploads",
                extra={"event": "partial_upload_sweep_failed", "errno": error.errno},
            )
            return 0
    if removed:
        log.info(
            "removed partial uploads of killed processes",
            extra={"event": "partial_uploads_removed", "count": removed},
        )
    return removed


try:
    app = create_app()
except ConfigError as error:
    print(f"portal: configuration error: {error}", file=sys.stderr)  # noqa: T201
    sys.exit(2)
sweep_partial_uploads(app)
upload_scans.warn_if_unscanned(settings_of(app))
