"""A misconfigured or unusable relay is no notice's fault (issue 12, item 4).

A wrong CA file, a refused login, a relay without STARTTLS: every row stays
queued with its link (still sealed, still opening to the same URL), no attempt
is counted, nothing is failed or audited as failed, the heartbeat and the staff
page say delivery is delayed, and once the setting is fixed every notice goes
out exactly once. Real STARTTLS sinks (aiosmtpd), real SQLite and PostgreSQL.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from notifier import worker
from notifier.sink import MailSink
from notifier.smtp import make_message_id
from portal.extensions import db
from portal.models import AuditEvent, Message, Notification, NotifierWorker
from portal.services import delivery, messaging, notices
from tests.notifier.test_worker import DOMAIN, app_for, fixed, seed

PASSWORD = "s3cret-relay-pass"


@pytest.fixture
def t0() -> datetime:
    """The moment the worker runs at: just after the test seeded its rows."""
    return datetime.now(UTC) + timedelta(seconds=30)


def _state(app: Flask, ids: list[int], urls: list[str]) -> list[tuple[str, int, bool]]:
    """(status, attempts, link opens to its URL) of each notice."""
    with app.app_context():
        found = []
        for notice_id, url in zip(ids, urls, strict=True):
            row = db.session.get(Notification, notice_id)
            assert row is not None
            found.append((row.status, row.attempts, notices.open_payload(db.session, row) == url))
        return found


def _failed_events(app: Flask) -> int:
    with app.app_context():
        return (
            db.session.scalar(select(func.count()).where(AuditEvent.action == "notice.failed")) or 0
        )


def _delivered_ids(sink: MailSink) -> Counter[str]:
    box = sink.handler.mailbox
    return Counter(str(box.get_message(key)["Message-ID"]) for key in box.iterkeys())


@pytest.fixture
def relays(sink_factory: Callable[..., MailSink], plain_sink: MailSink) -> dict[str, MailSink]:
    """A STARTTLS relay requiring a login, and one without STARTTLS."""
    return {"auth": sink_factory("auth", auth=("notifier", PASSWORD)), "plain": plain_sink}


# case -> (the broken settings, the reason and the setting the worker reports)
CASES = {
    "wrong-ca": ("tls-verify-failed", "PORTAL_SMTP_CA_FILE"),
    "unreadable-ca": ("ca-file-unusable", "PORTAL_SMTP_CA_FILE"),
    "wrong-password": ("auth-failed", "PORTAL_SMTP_USERNAME / PORTAL_SMTP_PASSWORD"),
    "no-login": ("auth-required", "PORTAL_SMTP_USERNAME / PORTAL_SMTP_PASSWORD"),
    "no-starttls": ("starttls-unavailable", "PORTAL_SMTP_TLS"),
}


def _broken(case: str, relays: dict[str, MailSink], other_ca: str, tmp: Path) -> dict[str, Any]:
    auth = relays["auth"]
    good = {"SMTP_USERNAME": "notifier", "SMTP_PASSWORD": PASSWORD}
    return {
        "wrong-ca": {"port": auth.port, "ca": other_ca, **good},
        "unreadable-ca": {"port": auth.port, "ca": tmp / "no-such-ca.pem", **good},
        "wrong-password": {"port": auth.port, "ca": auth.cert_file, **good, "SMTP_PASSWORD": "x"},
        "no-login": {"port": auth.port, "ca": auth.cert_file},
        "no-starttls": {"port": relays["plain"].port, "ca": other_ca, **good},
    }[case]


def _app(make_app: Callable[..., Flask], given: dict[str, Any]) -> Flask:
    values = dict(given)
    return app_for(make_app, values.pop("port"), values.pop("ca"), **values)


@pytest.mark.parametrize("case", list(CASES))
def test_a_misconfigured_relay_keeps_every_notice_queued_until_it_is_fixed(
    make_app: Callable[..., Flask],
    relays: dict[str, MailSink],
    other_ca_file: str,
    tmp_path: Path,
    t0: datetime,
    case: str,
) -> None:
    reason, setting = CASES[case]
    broken = _app(make_app, _broken(case, relays, other_ca_file, tmp_path))
    seeded = seed(broken, notices_count=3)

    stats = worker.drain(broken, "w1", clock=fixed(t0))

    assert (stats.sent, stats.failed, stats.retrying, stats.delayed) == (0, 0, 0, 3)
    assert stats.transport_error is not None
    assert (stats.transport_error.reason, stats.transport_error.setting) == (reason, setting)
    assert _state(broken, seeded.notice_ids, seeded.urls) == [("queued", 0, True)] * 3
    assert _failed_events(broken) == 0
    with broken.app_context():
        heartbeat = db.session.get(NotifierWorker, "w1")
        assert heartbeat is not None
        assert (heartbeat.transport_error, heartbeat.pass_delayed) == (reason, 3)
        assert delivery.error_current(heartbeat)
        assert delivery.delayed(db.session, t0)
        message = db.session.get(Message, seeded.message_id)
        assert message is not None
        entries = [e for e in messaging.status(db.session, message) if "Email" in e.what]
        assert [("delivery delayed" in e.what, bool(e.alert)) for e in entries] == [
            (True, True)
        ] * 3
    # A second pass with the setting still wrong changes nothing either.
    again = worker.drain(broken, "w1", clock=fixed(t0), probe=True)
    assert again.transport_error is not None
    assert (again.transport_error.reason, again.sent, again.failed) == (reason, 0, 0)
    assert _state(broken, seeded.notice_ids, seeded.urls) == [("queued", 0, True)] * 3

    auth = relays["auth"]
    fixed_app = app_for(
        make_app, auth.port, auth.cert_file, SMTP_USERNAME="notifier", SMTP_PASSWORD=PASSWORD
    )
    stats = worker.drain(fixed_app, "w1", clock=fixed(t0), probe=True)

    assert (stats.sent, stats.transport_error) == (3, None)
    with fixed_app.app_context():
        public_ids = db.session.scalars(select(Notification.public_id)).all()
        heartbeat = db.session.get(NotifierWorker, "w1")
        assert heartbeat is not None
        assert heartbeat.transport_error == reason  # kept as the last one, no longer current
        assert not delivery.error_current(heartbeat)
        assert not delivery.delayed(db.session, t0)
        statuses = Counter(db.session.scalars(select(Notification.status)))
    assert statuses == {"sent": 3}
    assert _delivered_ids(auth) == Counter({make_message_id(p, DOMAIN): 1 for p in public_ids})
    assert _failed_events(fixed_app) == 0


def test_a_refused_recipient_still_fails_its_notice_alone(
    make_app: Callable[..., Flask], refusing_sink: Callable[..., MailSink], t0: datetime
) -> None:
    sink = refusing_sink(rcpt_reply="550 5.1.1 mailbox unknown")
    app = app_for(make_app, sink.port, sink.cert_file)
    seeded = seed(app)

    stats = worker.drain(app, "w1", clock=fixed(t0))

    assert (stats.failed, stats.delayed, stats.transport_error) == (1, 0, None)
    assert _state(app, seeded.notice_ids, seeded.urls) == [("failed", 1, False)]


def test_run_forever_logs_one_error_backs_off_and_resumes_when_the_ca_file_is_fixed(
    make_app: Callable[..., Flask],
    relays: dict[str, MailSink],
    other_ca_file: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    auth = relays["auth"]
    ca_file = tmp_path / "relay-ca.pem"  # wrong now; fixed in place below, no restart
    ca_file.write_bytes(Path(other_ca_file).read_bytes())
    app = app_for(make_app, auth.port, ca_file, SMTP_USERNAME="notifier", SMTP_PASSWORD=PASSWORD)
    seed(app, notices_count=2)
    monkeypatch.setattr(worker, "RELAY_BACKOFF", (0.05, 0.1))  # not 15 s to 5 min
    passes: list[worker.RunStats] = []
    real_drain = worker.drain

    def counted(*args: Any, **kwargs: Any) -> worker.RunStats:
        passes.append(real_drain(*args, **kwargs))
        return passes[-1]

    monkeypatch.setattr(worker, "drain", counted)
    stop = threading.Event()
    runner = threading.Thread(target=worker.run_forever, args=(app, "w1", 0.05, stop))
    caplog.set_level(logging.INFO, logger="notifier.worker")
    runner.start()
    try:
        _wait_for(lambda: len(passes) >= 4)
        assert auth.handler.stored == 0
        ca_file.write_bytes(auth.cert_file.read_bytes())  # type: ignore[union-attr]
        _wait_for(lambda: auth.handler.stored == 2)
    finally:
        stop.set()
        runner.join(timeout=20)

    assert not runner.is_alive()
    ours = [r for r in caplog.records if r.name.startswith("notifier")]  # not the sink's
    errors = [r.getMessage() for r in ours if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "PORTAL_SMTP_CA_FILE" in errors[0]
    assert "tls-verify-failed" in errors[0]
    assert any("usable again" in r.getMessage() for r in ours)
    assert all(p.transport_error is not None for p in passes[:4])
    assert passes[1].delayed == 0  # later passes probe the relay first and claim nothing


def _wait_for(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    """Poll ``condition`` until it holds (or fail after ``seconds``)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)
