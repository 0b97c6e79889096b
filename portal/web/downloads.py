"""Download slots: how many of a worker's threads may stream an attachment at once.

A gthread worker serves each request on one of its threads for as long as the response
takes to send, and a download to a slow phone (2 MB/s: 100 s for 200 MiB) holds its thread
all that time. Unbounded, eight such downloads took every thread of the old 2 x 4 server,
and pages and health checks queued behind them for over a minute (issue 13). So each worker
lets at most ``DOWNLOAD_SLOTS`` responses stream at once and keeps the rest of its
``WEB_THREADS`` for everything else; a download over the limit is refused at once (503 with
Retry-After) instead of waiting for a thread with no answer.

A slot is taken before anything is decrypted or audited, and given back when the server
closes the response body: sent, failed, or the client gone. A body dropped unclosed (an
error page replacing it after the view) gives it back when it is collected.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import cast

from flask import Flask, Response, current_app, make_response
from flask.typing import ResponseReturnValue

from portal.web.errors import page

log = logging.getLogger(__name__)
# The Content-Security-Policy of an attachment a browser may show: a photo is pixels only,
# never framed. Staff and patient responses send the same one.
IMAGE_CSP = "sandbox; default-src 'none'; frame-ancestors 'none'"
RETRY_AFTER_SECONDS = 30  # a slot frees whenever any of the downloads ends
BUSY = (
    "Many downloads are in progress right now, so this one did not start. "
    "Please try again in a minute."
)
_EXTENSION = "download_slots"


class DownloadSlots:
    """At most ``count`` downloads streaming at once in this process; taking never waits."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._busy = 0
        # Reentrant: a body collected unclosed gives its slot back from __del__, which the
        # garbage collector may run on a thread that is inside try_take already.
        self._lock = threading.RLock()

    @property
    def busy(self) -> int:
        """Return how many slots are taken now."""
        return self._busy

    def try_take(self) -> bool:
        """Take a slot and return True, or return False at once when all are taken."""
        with self._lock:
            if self._busy >= self.count:
                return False
            self._busy += 1
            return True

    def give_back(self) -> None:
        """Give a taken slot back. Raises RuntimeError when none is taken (a double release)."""
        with self._lock:
            if self._busy <= 0:
                raise RuntimeError("download slot given back twice")
            self._busy -= 1


class _SlotBody(Iterable[bytes]):
    """A streamed response body that gives its slot back once: when the server closes it,
    or when it is collected without having been closed."""

    def __init__(self, body: Iterable[bytes], slots: DownloadSlots) -> None:
        self._body = body
        self._slots: DownloadSlots | None = slots

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._give_back()

    def _give_back(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None:
            slots.give_back()

    __del__ = _give_back


def init_app(app: Flask) -> None:
    """Give ``app`` its own slots (``DOWNLOAD_SLOTS``): one set per gunicorn worker, since
    each worker builds its app after the fork."""
    app.extensions[_EXTENSION] = DownloadSlots(int(app.config["DOWNLOAD_SLOTS"]))


def slots_of(app: Flask) -> DownloadSlots:
    """Return ``app``'s download slots."""
    slots: DownloadSlots = app.extensions[_EXTENSION]
    return slots


def in_slot(make: Callable[[], ResponseReturnValue]) -> Response:
    """Return ``make()``'s response, holding a download slot until its body is closed; the
    busy page (503, Retry-After) without calling ``make`` when every slot is taken.

    A response that is not streamed (an error page) gives its slot back at once.
    """
    slots = slots_of(current_app)
    if not slots.try_take():
        return _busy(slots)
    try:
        response = make_response(make())
    except BaseException:
        slots.give_back()
        raise
    if response.is_streamed:
        # Werkzeug types a body as str or bytes chunks; a file download's are bytes.
        response.response = _SlotBody(cast("Iterable[bytes]", response.response), slots)
    else:
        slots.give_back()
    return response


def _busy(slots: DownloadSlots) -> Response:
    log.warning(
        "download refused: every download slot of this worker is busy",
        extra={"event": "download_slots_full", "slots": slots.count},
    )
    response = make_response(page(503, BUSY))
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    response.headers["Cache-Control"] = "no-store"
    return response
