"""The lease is a setting and is renewed while a batch is sent (issue 12, item 2).

A batch on a slow relay keeps its rows however long it takes (another worker,
polling all the while, gets none of them); a single send slower than the
lease is cut off before the lease ends and its rows go back to the queue.
Real STARTTLS sink that takes its time, real SQLite and PostgreSQL, real clock.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from notifier import worker
from notifier.sink import MailSink
from notifier.smtp import RelayUnavailable, SmtpTransport, make_message_id
from portal.config import ConfigError, Settings, load
from portal.extensions import db
from portal.models import Notification
from tests.notifier.test_worker import DOMAIN, _delivered_ids, app_for, seed


def test_the_lease_is_a_setting(instance: Path) -> None:
    here = {"PORTAL_INSTANCE_DIR": str(instance)}
    assert Settings.from_config(load(here)).notifier_lease == 120  # 2 minutes by default
    assert load({**here, "PORTAL_NOTIFIER_LEASE": "45s"})["NOTIFIER_LEASE"] == 45
    loaded = load({**here, "PORTAL_NOTIFIER_WORKER_ID": "mail-1"})
    assert (loaded["NOTIFIER_WORKER_ID"], loaded["NOTIFIER_LEASE"]) == ("mail-1", 120)


def test_the_wait_after_a_relay_fault_is_a_setting(instance: Path) -> None:
    here = {"PORTAL_INSTANCE_DIR": str(instance)}
    default = Settings.from_config(load(here))
    assert default.notifier_relay_backoff == 15
    assert worker.relay_backoff(default) == (15.0, 300.0)
    quick = Settings.from_config(load({**here, "PORTAL_NOTIFIER_RELAY_BACKOFF": "2s"}))
    assert worker.relay_backoff(quick) == (2.0, 40.0)  # doubling to 20 times the first
    slow = Settings.from_config(load({**here, "PORTAL_NOTIFIER_RELAY_BACKOFF": "1m"}))
    assert worker.relay_backoff(slow) == (60.0, 300.0)  # never over 5 min
    pace = worker._Pace(worker.POLL_SECONDS, worker.relay_backoff(quick))
    fault = RelayUnavailable("connect-failed")
    waits = [pace.passed(worker.RunStats(transport_error=fault)) for _ in range(7)]
    assert waits == [2.0, 4.0, 8.0, 16.0, 32.0, 40.0, 40.0]


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("PORTAL_NOTIFIER_LEASE", "1s"),
        ("PORTAL_NOTIFIER_LEASE", "2h"),
        ("PORTAL_NOTIFIER_LEASE", "soon"),
        ("PORTAL_NOTIFIER_RELAY_BACKOFF", "0s"),
        ("PORTAL_NOTIFIER_RELAY_BACKOFF", "6m"),
        ("PORTAL_NOTIFIER_RELAY_BACKOFF", "later"),
        ("PORTAL_NOTIFIER_WORKER_ID", "two words"),
        ("PORTAL_NOTIFIER_WORKER_ID", "x" * 65),
        ("PORTAL_NOTIFIER_WORKER_ID", "ümlaut"),
    ],
)
def test_a_bad_lease_or_worker_id_names_the_setting(instance: Path, name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({"PORTAL_INSTANCE_DIR": str(instance), name: raw})
    assert str(caught.value).startswith(f"{name}: expected")


def test_a_batch_on_a_slow_relay_keeps_its_lease_while_it_is_sent(
    make_app: Callable[..., Flask], slow_sink: Callable[[float], MailSink]
) -> None:
    sink = slow_sink(0.35)  # 16 notices take longer than the 4 s lease
    app = app_for(make_app, sink.port, sink.cert_file, NOTIFIER_LEASE=4)
    seed(app, notices_count=16)
    done = threading.Event()
    taken: list[int] = []

    def other_worker() -> None:  # polls all the while, on the real clock
        while not done.wait(0.1):
            taken.append(worker.drain(app, "B").processed)

    poller = threading.Thread(target=other_worker)
    poller.start()
    try:
        stats = worker.drain(app, "A", batch=50)
    finally:
        done.set()
        poller.join(timeout=30)

    assert (stats.sent, stats.skipped, sum(taken)) == (16, 0, 0)
    assert len(taken) > 10  # B did try, while the batch outlasted the first lease
    with app.app_context():
        rows = db.session.scalars(select(Notification)).all()
        claims = sorted({row.claimed_at for row in rows if row.claimed_at is not None})
    assert {row.claimed_by for row in rows} == {"A"}
    assert claims[-1] - claims[0] >= timedelta(seconds=4 / 3)  # renewed on the way
    ids = Counter({make_message_id(row.public_id, DOMAIN): 1 for row in rows})
    assert _delivered_ids(sink) == ids


def test_a_send_slower_than_the_lease_is_cut_off_before_the_lease_ends(
    make_app: Callable[..., Flask], slow_sink: Callable[[float], MailSink]
) -> None:
    sink = slow_sink(4.0)  # one notice takes longer than the 3 s lease (SMTP timeout 30 s)
    app = app_for(make_app, sink.port, sink.cert_file, NOTIFIER_LEASE=3)
    seeded = seed(app, notices_count=2)

    stats = worker.drain(app, "A")

    assert (stats.sent, stats.failed, stats.retrying, stats.delayed) == (0, 0, 0, 2)
    assert stats.transport_error is not None
    assert (stats.transport_error.reason, stats.transport_error.setting) == (
        "timeout",
        "PORTAL_SMTP_HOST / PORTAL_SMTP_PORT (or PORTAL_NOTIFIER_LEASE)",
    )
    with app.app_context():
        rows = [db.session.get(Notification, i) for i in seeded.notice_ids]
        assert [(r.status, r.attempts, r.payload_sealed is not None) for r in rows if r] == [
            ("queued", 0, True)
        ] * 2


def test_a_pass_that_fails_on_the_database_hands_back_what_it_still_holds(
    make_app: Callable[..., Flask], sink: MailSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    seed(app, notices_count=6)
    real_send = SmtpTransport.send
    calls = 0

    def dies_on_the_third(self: SmtpTransport, msg: EmailMessage) -> str:
        nonlocal calls
        calls += 1
        if calls == 3:  # as the database connection breaks while the notice is being sent
            raise OperationalError("UPDATE notifications ...", {}, ConnectionResetError())
        return real_send(self, msg)

    monkeypatch.setattr(SmtpTransport, "send", dies_on_the_third)
    with pytest.raises(OperationalError):
        worker.drain(app, "A")

    with app.app_context():
        rows = db.session.scalars(select(Notification).order_by(Notification.id)).all()
        states = [(r.status, r.claimed_by, r.attempts) for r in rows]
    assert states == [("sent", "A", 1)] * 2 + [("queued", None, 0)] * 4  # none left "sending"
    monkeypatch.setattr(SmtpTransport, "send", real_send)
    assert worker.drain(app, "B").sent == 4  # at once: no lease to wait for
