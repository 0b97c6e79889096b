"""``notifier run`` killed mid-batch (SIGKILL), as a real process (issue 12, item 2).

Its rows must not sit ``sending`` for ten minutes: another worker takes them
once the lease (a setting, here seconds) runs out, and the same worker started
again under its stable id takes them back at once. Every notice goes out once,
or twice with the same Message-ID when the kill fell between the relay's 250
and the commit. Real processes, a real STARTTLS sink that takes its time, real
SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta

from flask import Flask
from sqlalchemy import select

from notifier import lease, worker
from notifier.sink import MailSink
from notifier.smtp import make_message_id
from portal.extensions import db
from portal.models import Notification
from tests.notifier.test_send_lock import lock_is_free
from tests.notifier.test_worker import DOMAIN, PATIENT_EMAIL, _delivered_ids, app_for, seed
from tests.support.notifier_process import WorkerProcess, notifier_env, wait_for

COUNT = 12
SINK_DELAY = 0.25  # seconds the sink takes over each message
MOST_SENT_AGAIN = 2  # a slice of 0.5 s takes 2 sends of 0.25 s: at most those sent again


def _rows(app: Flask) -> list[Notification]:
    with app.app_context():
        return list(db.session.scalars(select(Notification).order_by(Notification.id)))


def _all_sent(app: Flask) -> bool:
    return all(row.status == "sent" for row in _rows(app))


def _killed_mid_batch(
    app: Flask, sink: MailSink, start: Callable[..., WorkerProcess], env: dict[str, str]
) -> dict[int, datetime]:
    """Run worker "A" until it has sent a few, SIGKILL it; return its held rows' claims."""
    first = start(env, "--worker-id", "A")
    wait_for(lambda: sink.handler.stored >= 3)
    with app.app_context():
        lock = lease.send_lock_path(db.engine.url)  # SQLite: one worker sends at a time
    assert lock is None or not lock_is_free(lock)  # held by A for its pass
    first.kill()
    assert lock is None or lock_is_free(lock)  # the OS dropped it with A: nothing stale
    held = {r.id: r.claimed_at for r in _rows(app) if r.status == "sending" and r.claimed_at}
    assert held, "the kill should leave rows claimed"
    assert all(r.claimed_by == "A" for r in _rows(app) if r.status == "sending")
    return held


def _sent_once_or_again_with_the_same_id(app: Flask, sink: MailSink, most_again: int) -> None:
    """Every notice sent, each once or again with the same Message-ID: at most
    ``most_again`` of them, the rows of the slice in flight at the kill, sent but not yet
    recorded (a slice takes no new send once 0.5 s have passed since its first: with the
    sink taking 0.25-0.3 s over each message, 2 of them)."""
    assert worker.SLICE_SECONDS <= 0.5  # the bound below holds for slices of 0.5 s at most
    rows = _rows(app)
    delivered = _delivered_ids(sink)
    assert set(delivered) == {make_message_id(r.public_id, DOMAIN) for r in rows}
    assert set(delivered.values()) <= {1, 2}
    assert sum(delivered.values()) - len(rows) <= most_again
    assert Counter(r.status for r in rows) == {"sent": COUNT}


def test_a_killed_workers_rows_go_to_another_worker_within_the_lease(
    make_app: Callable[..., Flask],
    slow_sink: Callable[[float], MailSink],
    worker_process: Callable[..., WorkerProcess],
) -> None:
    sink = slow_sink(SINK_DELAY)
    app = app_for(make_app, sink.port, sink.cert_file)
    seed(app, notices_count=COUNT)
    env = notifier_env(app, sink, NOTIFIER_LEASE="3s")
    held = _killed_mid_batch(app, sink, worker_process, env)

    other = worker_process(env, "--worker-id", "B")
    wait_for(lambda: _all_sent(app), 60)  # the old fixed lease kept them for ten minutes

    assert other.stop() == 0
    _sent_once_or_again_with_the_same_id(app, sink, MOST_SENT_AGAIN)
    taken = [r for r in _rows(app) if r.id in held]
    assert {r.claimed_by for r in taken} == {"B"}
    assert all(r.sent_at and r.sent_at >= held[r.id] + timedelta(seconds=3) for r in taken)
    assert PATIENT_EMAIL not in other.stderr.read_text()  # its log names rows by id only


def test_a_worker_started_again_under_its_id_takes_its_rows_back_at_once(
    make_app: Callable[..., Flask],
    slow_sink: Callable[[float], MailSink],
    worker_process: Callable[..., WorkerProcess],
) -> None:
    sink = slow_sink(SINK_DELAY)
    app = app_for(make_app, sink.port, sink.cert_file)
    seed(app, notices_count=COUNT)
    lease = timedelta(minutes=5)  # longer than the test may take: waiting for it would fail
    env = notifier_env(app, sink, NOTIFIER_LEASE="5m")
    held = _killed_mid_batch(app, sink, worker_process, env)

    again = worker_process({**env, "PORTAL_NOTIFIER_WORKER_ID": "A"}, "--health-port", "0")
    url = again.health_url()
    wait_for(lambda: _all_sent(app), 60)

    with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - our own http URL
        status, body = answer.status, json.loads(answer.read())
    assert again.stop() == 0
    _sent_once_or_again_with_the_same_id(app, sink, MOST_SENT_AGAIN)
    taken = [r for r in _rows(app) if r.id in held]
    assert {r.claimed_by for r in taken} == {"A"}
    assert all(r.sent_at and r.sent_at < held[r.id] + lease for r in taken)
    assert (status, body["healthy"], body["worker_id"], body["problems"]) == (200, True, "A", [])
    [me] = [w for w in body["workers"] if w["worker_id"] == "A"]
    assert me["live"]
    assert body["queue"] == {"queued": 0, "due": 0, "sending": 0, "oldest_due_at": None}
    assert body["last_transport_error"] is None


def test_the_health_endpoint_answers_503_while_the_relay_is_unusable(
    make_app: Callable[..., Flask],
    sink: MailSink,
    other_ca_file: str,
    worker_process: Callable[..., WorkerProcess],
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    seed(app, notices_count=2)
    env = {**notifier_env(app, sink), "PORTAL_SMTP_CA_FILE": other_ca_file}
    process = worker_process(env, "--worker-id", "H", "--health-port", "0")
    url = process.health_url()

    def unhealthy() -> bool:
        try:
            urllib.request.urlopen(url, timeout=10)  # noqa: S310 - our own http URL
        except urllib.error.HTTPError as err:
            found.append(json.loads(err.read()))
            return err.code == 503 and "tls-verify-failed" in str(found[-1]["problems"])
        return False

    found: list[dict[str, object]] = []
    wait_for(unhealthy, 60)
    assert process.stop() == 0

    body = found[-1]
    [problem] = body["problems"]  # type: ignore[misc]
    assert "tls-verify-failed" in problem
    assert "PORTAL_SMTP_CA_FILE" in problem
    assert body["queue"]["queued"] == 2  # type: ignore[index]
    assert sink.handler.stored == 0
    errors = [
        line
        for line in process.stderr.read_text().splitlines()
        if line.startswith("{") and json.loads(line)["level"] == "ERROR"
    ]
    assert len(errors) == 1
    assert "PORTAL_SMTP_CA_FILE" in errors[0]
