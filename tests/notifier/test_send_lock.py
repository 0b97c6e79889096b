"""On SQLite one worker sends at a time (notifier.lease.send_lock); the others stand by.

SQLite keeps no row lock over a send, and a send's outcome may wait on its write
lock past the lease, when another worker could send the row again. So a worker
holds an exclusive ``flock`` beside the database file for the claim-and-send part
of each pass; a second worker finds it held, claims nothing and reports itself a
standby (not a fault). PostgreSQL fences sends with row locks: no lock file, every
worker sends.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import select
from sqlalchemy.engine import make_url

from notifier import health, lease, worker
from notifier.sink import MailSink
from portal.extensions import db
from portal.models import NotifierWorker
from portal.services import delivery
from tests.notifier.test_worker import app_for, fixed, seed


@pytest.fixture
def t0() -> datetime:
    """The moment the worker runs at: just after the test seeded its rows."""
    return datetime.now(UTC) + timedelta(seconds=30)


def _lock_path(app: Flask) -> Path | None:
    with app.app_context():
        return lease.send_lock_path(db.engine.url)


@contextmanager
def _held_elsewhere(app: Flask) -> Iterator[None]:
    """Hold the send lock as another worker would, on a file description of our own."""
    with app.app_context():
        url = db.engine.url
    with lease.send_lock(url) as got:
        assert got
        yield


def lock_is_free(path: Path) -> bool:
    """Whether nobody holds the send lock at ``path`` (tried without blocking)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_the_lock_file_sits_beside_a_sqlite_database_only(
    make_app: Callable[..., Flask], sink: MailSink, backend: str
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    path = _lock_path(app)
    with app.app_context():
        database = db.engine.url.database
    if backend == "sqlite":
        assert database is not None
        assert path == Path(database + ".notifier.lock")
    else:
        assert path is None  # row locks fence PostgreSQL's sends
    assert lease.send_lock_path(make_url("sqlite://")) is None
    assert lease.send_lock_path(make_url("sqlite:///:memory:")) is None


def test_a_second_worker_sends_nothing_and_stands_by_while_the_lock_is_held(
    make_app: Callable[..., Flask], sink: MailSink, backend: str, t0: datetime
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    seed(app, notices_count=3)

    with _held_elsewhere(app):
        stats = worker.drain(app, "B", clock=fixed(t0))
        found = health.read(app, t0)

    if backend == "sqlite":
        assert (stats.processed, stats.standby, sink.handler.stored) == (0, True, 0)
        [state] = found.workers
        assert state.standby
        assert found.problems() == []  # a standby is not a fault
        assert found.as_dict()["workers"][0]["standby"] is True
        assert found.as_dict()["workers"][0]["last_pass"]["delayed"] == 0
        assert "standby since" in health.render_text(found)
        assert found.queue is not None
        assert found.queue.due == 3  # nothing claimed
        again = worker.drain(app, "B", clock=fixed(t0))  # the lock is free now: B sends
        assert (again.sent, again.standby) == (3, False)
        assert not health.read(app, t0).workers[0].standby
    else:  # no send lock on PostgreSQL: every worker sends
        assert (stats.sent, stats.standby) == (3, False)
    assert sink.handler.stored == 3


def test_the_lock_is_released_after_the_pass(
    make_app: Callable[..., Flask], sink: MailSink, backend: str, t0: datetime
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    seed(app, notices_count=2)
    path = _lock_path(app)
    held_during_send: list[bool] = []
    real_send = worker.SmtpTransport.send

    def send(self: worker.SmtpTransport, msg: object) -> str:
        if path is not None:
            held_during_send.append(not lock_is_free(path))
        return real_send(self, msg)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(worker.SmtpTransport, "send", send)
        assert worker.drain(app, "A", clock=fixed(t0)).sent == 2

    if backend == "sqlite":
        assert path is not None
        assert held_during_send == [True, True]
        assert lock_is_free(path)
    else:
        assert (path, held_during_send) == (None, [])
    after = worker.drain(app, "B", clock=fixed(t0))
    assert (after.processed, after.standby) == (0, False)  # B got the lock: nothing left held


def test_run_forever_logs_standing_by_once_and_is_healthy(
    make_app: Callable[..., Flask],
    sink: MailSink,
    backend: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    seed(app, notices_count=1)
    stop = threading.Event()
    passes = 0
    real_drain = worker.drain

    def counted(*args: object, **kwargs: object) -> worker.RunStats:
        nonlocal passes
        found = real_drain(*args, **kwargs)  # type: ignore[arg-type]
        passes += 1
        if passes == 3:
            stop.set()
        return found

    with (
        pytest.MonkeyPatch.context() as patch,
        caplog.at_level(logging.INFO, logger="notifier.worker"),
        _held_elsewhere(app),
    ):
        patch.setattr(worker, "drain", counted)
        thread = threading.Thread(target=worker.run_forever, args=(app, "S", 0.01, stop))
        thread.start()
        thread.join(timeout=60)
    assert not thread.is_alive()

    standing = [r for r in caplog.records if "standing by" in r.getMessage()]
    if backend == "sqlite":
        assert [r.levelname for r in standing] == ["INFO"]  # once, for three passes
        assert sink.handler.stored == 0
    else:
        assert (standing, sink.handler.stored) == ([], 1)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def _closed_port() -> int:
    """A local port nothing listens on: the relay is down."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.sqlite_only
def test_a_standby_pass_does_not_clear_a_relay_fault_it_never_saw_fixed(
    make_app: Callable[..., Flask], sink: MailSink, t0: datetime
) -> None:
    """Regression (issue 12 review): a pass as a standby wrote "relay ok", so the staff
    pages and the health endpoint turned green while the relay was still down."""
    app = app_for(make_app, _closed_port(), sink.cert_file)
    seed(app, notices_count=1)
    assert worker.drain(app, "A", clock=fixed(t0)).transport_error is not None
    with app.app_context():
        assert delivery.delayed(db.session, t0)

    later = t0 + timedelta(seconds=20)
    with _held_elsewhere(app):
        assert worker.drain(app, "A", clock=fixed(later)).standby
        assert worker.drain(app, "B", clock=fixed(later)).standby
    with app.app_context():
        [row] = [w for w in db.session.scalars(select(NotifierWorker)) if w.worker_id == "A"]
        assert row.transport_ok_at is None  # the standby pass recorded no use of the relay
    # The standbys' own errors are not theirs to report; nobody sends yet, but the notice
    # has waited only seconds: not yet a fault of its own.
    assert health.read(app, later).problems() == []

    third = worker.drain(app, "A", clock=fixed(later))  # A sends again: the relay is down
    assert third.transport_error is not None
    with app.app_context():
        assert delivery.delayed(db.session, later)
    assert health.read(app, later).problems() != []


@pytest.mark.sqlite_only
def test_live_standbys_while_notices_wait_past_patience_are_a_fault(
    make_app: Callable[..., Flask], sink: MailSink, t0: datetime
) -> None:
    """Regression (issue 12 review): a holder of the send lock that does not send (stopped,
    hung, not a notifier at all) left every worker standing by with health green."""
    app = app_for(make_app, sink.port, sink.cert_file)
    seed(app, notices_count=2)
    with _held_elsewhere(app):
        worker.drain(app, "B", clock=fixed(t0))
        assert health.read(app, t0).problems() == []  # due for seconds: patience
        with app.app_context():
            assert not delivery.delayed(db.session, t0)

        late = t0 + timedelta(minutes=5)  # past 2 x the 2 min lease
        worker.drain(app, "B", clock=fixed(late))
        found = health.read(app, late)
        assert found.queue is not None
        assert found.queue.due == 2
        assert found.problems() == [health.NOBODY_SENDING]
        assert found.as_dict()["healthy"] is False
        with app.app_context():
            assert delivery.delayed(db.session, late)  # staff pages say "delivery delayed"
    assert sink.handler.stored == 0


@pytest.mark.sqlite_only
def test_two_spellings_of_one_database_share_one_send_lock(tmp_path: Path) -> None:
    """Regression (issue 12 review): a database reached through a symbolic link had a lock
    file of its own, so two workers could send at once."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    direct = make_url(f"sqlite:///{real / 'portal.db'}")
    linked = make_url(f"sqlite:///{tmp_path / 'link' / 'portal.db'}")
    assert lease.send_lock_path(direct) == lease.send_lock_path(linked)
    with lease.send_lock(direct) as first, lease.send_lock(linked) as second:
        assert (first, second) == (True, False)


@pytest.mark.sqlite_only
def test_a_lock_file_that_is_a_symbolic_link_is_refused(tmp_path: Path) -> None:
    """Regression (issue 12 review): whoever could plant the lock file could hold it and
    keep every worker standing by; a link is refused, the file it points at untouched."""
    url = make_url(f"sqlite:///{tmp_path / 'portal.db'}")
    path = lease.send_lock_path(url)
    assert path is not None
    target = tmp_path / "elsewhere"
    target.write_text("x")
    path.symlink_to(target)
    with pytest.raises(lease.UnsafeLockFile, match="symbolic link"), lease.send_lock(url):
        pass
    assert target.read_text() == "x"
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(lease.UnsafeLockFile, match="not a regular file"), lease.send_lock(url):
        pass
