"""Issue 13 item 2: the database pool follows the threads (one connection per thread, never
more), and a request needs only one connection at a time, so no thread ever waits for one."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import TimeoutError as PoolTimeout

from portal.database import make_engine, pool_for_threads
from portal.extensions import db
from portal.models import Message
from tests.support.databases import Template
from tests.support.pickup import PATIENT_EMAIL, enrolled_patient, send, signed_in


@pytest.mark.parametrize("threads", [3, 7, 48])
def test_the_apps_pool_holds_one_connection_per_thread(
    make_app: Callable[..., Flask], threads: int
) -> None:
    app = make_app(WEB_THREADS=threads)
    pool = app.extensions["engine"].pool
    assert pool.size() == threads


def test_a_thread_more_than_the_pool_holds_waits_and_times_out(
    template: Template, tmp_path: Path
) -> None:
    url = template.fresh(tmp_path)
    engine = make_engine(url, **pool_for_threads(url, 3), pool_timeout=0.2)
    held = [engine.connect() for _ in range(3)]  # every thread's connection checked out
    try:
        for connection in held:
            assert connection.execute(text("SELECT 1")).scalar() == 1
        with pytest.raises(PoolTimeout):
            engine.connect()  # no overflow: a fourth connection is never opened
    finally:
        for connection in held:
            connection.close()
        engine.dispose()


def test_in_memory_sqlite_keeps_its_own_pool() -> None:
    assert pool_for_threads("sqlite://", 16) == {}
    assert pool_for_threads("sqlite:///:memory:", 16) == {}


class CheckoutPeak:
    """The most connections one engine had checked out at once (per thread)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.peak = 0
        self._out: dict[int, int] = {}
        self._lock = threading.Lock()

    def _checkout(self, *_: Any) -> None:
        with self._lock:
            ident = threading.get_ident()
            self._out[ident] = self._out.get(ident, 0) + 1
            self.peak = max(self.peak, self._out[ident])

    def _checkin(self, *_: Any) -> None:
        with self._lock:
            ident = threading.get_ident()
            self._out[ident] = self._out.get(ident, 0) - 1

    def __enter__(self) -> CheckoutPeak:
        event.listen(self.engine, "checkout", self._checkout)
        event.listen(self.engine, "checkin", self._checkin)
        return self

    def __exit__(self, *_: object) -> None:
        event.remove(self.engine, "checkout", self._checkout)
        event.remove(self.engine, "checkin", self._checkin)


@pytest.fixture
def peak(app: Flask) -> Iterator[CheckoutPeak]:
    """Counts the app's connections checked out at once by one thread."""
    with CheckoutPeak(app.extensions["engine"]) as counter:
        yield counter


def test_a_request_holds_one_connection_at_a_time(app: Flask, peak: CheckoutPeak) -> None:
    from tests.browser_client import enrolled_user

    enrolled_user(app, role="staff", email="sam@example.org")
    _, secret = enrolled_patient(app)
    sent = send(app)
    with app.app_context():
        message = db.session.scalar(select(Message).where(Message.public_id == sent.public_id))
        assert message is not None
        attachment = message.attachments[0].public_id
    browser = signed_in(app, PATIENT_EMAIL, secret)  # sign-in: password, then TOTP
    base = f"/messages/{sent.public_id}"
    pages = ["/inbox", base, f"{base}/attachments/{attachment}/download", "/history"]
    for path in [*pages, "/healthz", "/readyz", sent.path]:
        assert browser.get(path).status_code in (200, 302), path
    assert peak.peak == 1
