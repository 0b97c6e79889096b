"""Issue 13 item 2: slow clients must not starve the portal (real gunicorn, real sockets).

As many downloads as the worker has threads, read through small receive buffers at the
pace of a slow link: only SERVE_SLOTS of them stream, the others get 503 with Retry-After
at once, and /healthz, /readyz and the inbox still answer. The old server (every thread free
for downloads) let such readers take all its threads: these requests then waited for a
download to end. Every download that started completes byte for byte.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.support.deploy import Pickup, Portal
from tests.support.serving import SERVE_SLOTS, SERVE_THREADS, HttpPatient, SlowReader

pytestmark = pytest.mark.slow  # a real gunicorn per database, 16 MiB downloads
PROMPT = 30.0  # seconds: a generous bound on an answer, not a speed assertion
RETRY_AFTER = "30"


def test_pages_and_health_answer_while_every_download_slot_is_held(
    served: Portal, pickup: Pickup, patient: HttpPatient
) -> None:
    fast = threading.Event()
    readers = []
    for _ in range(SERVE_THREADS):  # one download per thread of the worker
        reader = SlowReader(served.port, pickup.download_path, patient.cookie_header(), fast)
        readers.append(reader.start())
        assert reader.answered.wait(PROMPT), "a download got no answer"
    try:
        streaming, refused = readers[:SERVE_SLOTS], readers[SERVE_SLOTS:]
        assert [r.status for r in readers] == [200] * SERVE_SLOTS + [503] * len(refused)
        assert all(r.headers.get("Retry-After") == RETRY_AFTER for r in refused)
        # Every slot is held by a reader far from the end of its file: the server is
        # blocked sending to each of them.
        assert all(r.size < pickup.size // 2 for r in streaming)
        for path in ("/healthz", "/readyz"):
            status, _, _ = patient.request("GET", path)
            assert status == 200, path
        status, _, inbox = patient.request("GET", "/inbox")
        assert status == 200
        assert b"Letter" in inbox
    finally:
        fast.set()
    for reader in streaming:
        reader.join(PROMPT * 4)
        assert reader.error is None
        assert (reader.size, reader.sha256) == (pickup.size, pickup.sha256)


def test_slots_come_back_when_their_clients_leave(
    served: Portal, pickup: Pickup, patient: HttpPatient
) -> None:
    leaving = [
        SlowReader(served.port, pickup.download_path, patient.cookie_header(), threading.Event())
        for _ in range(SERVE_SLOTS)
    ]
    for reader in leaving:
        reader.start()
        assert reader.answered.wait(PROMPT)
        assert reader.status == 200
    for reader in leaving:
        reader.hang_up()
    # Each slot comes back when the server's next send fails on the closed socket, which
    # may be a moment after the hang-up: try again (bounded) until every slot streams.
    deadline = time.monotonic() + PROMPT
    while True:
        released = threading.Event()
        released.set()  # full speed
        again = [
            SlowReader(served.port, pickup.download_path, patient.cookie_header(), released)
            for _ in range(SERVE_SLOTS)
        ]
        for reader in again:  # at once: every slot must be free
            reader.start()
        for reader in again:
            reader.join(PROMPT * 4)
        if all(r.status == 200 for r in again) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [(r.status, r.size, r.sha256) for r in again] == [
        (200, pickup.size, pickup.sha256)
    ] * SERVE_SLOTS
