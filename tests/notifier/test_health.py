"""The notifier's heartbeat, ``notifier status`` and the health endpoint (issue 12, item 7).

Real database (SQLite and PostgreSQL), real STARTTLS sink, the real CLI and a
real HTTP server on a free port; time moved with portal.database.travel.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from sqlalchemy import update

from notifier import health, health_server, worker
from notifier.cli import main
from notifier.sink import MailSink
from portal import create_worker_app
from portal.database import travel, utcnow
from portal.extensions import db
from portal.models import Notification, NotifierWorker
from portal.services import delivery
from tests.notifier.test_worker import BASE_URL, MAIL_FROM, PATIENT_EMAIL, app_for, seed


@pytest.fixture(autouse=True)
def real_time() -> Iterator[None]:
    """Every test ends on the real clock."""
    yield
    travel(None)


def _report(app: Flask, now: datetime | None = None) -> health.Report:
    return health.read(app, now or utcnow())


def _env(
    monkeypatch: pytest.MonkeyPatch, app: Flask, sink: MailSink, ca: str | None = None
) -> None:
    """The settings `notifier` commands read, as an operator sets them."""
    for name, value in {
        "DATABASE_URL": app.config["DATABASE_URL"],
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(sink.port),
        "SMTP_CA_FILE": ca or str(sink.cert_file),
        "MAIL_FROM": MAIL_FROM,
        "BASE_URL": BASE_URL,
    }.items():
        monkeypatch.setenv(f"PORTAL_{name}", value)


def test_a_pass_writes_the_heartbeat(make_app: Callable[..., Flask], sink: MailSink) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    seed(app, notices_count=2)
    before = utcnow()

    worker.drain(app, "w1")

    with app.app_context():
        row = db.session.get(NotifierWorker, "w1")
        assert row is not None
        assert (row.pass_sent, row.pass_failed, row.pass_retrying, row.pass_delayed) == (2, 0, 0, 0)
        assert row.host == socket.gethostname()
        assert row.lease_seconds == 120
        assert row.pass_at is not None
        assert row.pass_at >= before
        assert row.transport_ok_at is not None  # it used the relay
        assert (row.transport_error, row.transport_error_at) == (None, None)
    found = _report(app)
    assert found.problems() == []
    assert found.queue == health.QueueState(queued=0, due=0, sending=0, oldest_due_at=None)


def test_the_report_shows_the_queue_and_the_oldest_due_notice(
    make_app: Callable[..., Flask], free_port: int
) -> None:
    app = app_for(make_app, free_port, None)  # nobody listens: the relay is down
    seeded = seed(app, notices_count=3)
    t0 = datetime.now(UTC)
    with app.app_context():
        for offset, notice_id in zip((-300, -60, 3600), seeded.notice_ids, strict=True):
            db.session.execute(
                update(Notification)
                .where(Notification.id == notice_id)
                .values(next_attempt_at=t0 + timedelta(seconds=offset))
            )
        db.session.commit()

    worker.drain(app, "w1", clock=lambda: t0)
    found = _report(app, t0)

    assert found.queue is not None
    assert (found.queue.queued, found.queue.due, found.queue.sending) == (3, 2, 0)
    assert found.queue.oldest_due_at == t0 - timedelta(seconds=300)
    [problem] = found.problems()
    assert problem.startswith("worker w1: cannot use the mail relay (connect-failed")
    assert "PORTAL_SMTP_HOST / PORTAL_SMTP_PORT" in problem
    last = found.last_transport_error()
    assert last is not None
    assert (last["worker_id"], last["reason"], last["current"]) == ("w1", "connect-failed", True)
    text = health.render_text(found)
    assert "queue: 3 queued (2 due, oldest due" in text
    assert "last transport error: connect-failed" in text
    assert text.splitlines()[-1].startswith("UNHEALTHY: worker w1: cannot use the mail relay")


def test_a_worker_whose_heartbeat_stops_is_reported_stale(
    make_app: Callable[..., Flask], sink: MailSink
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file, NOTIFIER_LEASE=60)
    worker.drain(app, "w1")
    beat = _report(app).workers[0].row.beat_at

    almost = _report(app, beat + delivery.stale_after(60) - timedelta(seconds=1))
    stale = _report(app, beat + delivery.stale_after(60) + timedelta(seconds=1))

    assert almost.problems() == []
    assert [w.live for w in stale.workers] == [False]
    assert stale.problems() == ["no notifier worker is running (no recent heartbeat)"]
    assert stale.problems("w1") == [f"worker w1: no heartbeat since {health._when(beat)}"]
    assert stale.problems("nobody") == ["worker nobody: no heartbeat yet"]


def test_a_cleared_transport_error_is_kept_as_the_last_one_but_is_not_current(
    make_app: Callable[..., Flask], sink: MailSink, other_ca_file: str
) -> None:
    seed(app_for(make_app, sink.port, sink.cert_file))
    worker.drain(app_for(make_app, sink.port, other_ca_file), "w1")
    app = app_for(make_app, sink.port, sink.cert_file)
    assert _report(app).problems() != []

    worker.drain(app, "w1", probe=True)

    found = _report(app)
    last = found.last_transport_error()
    assert last is not None
    assert (last["reason"], last["current"]) == ("tls-verify-failed", False)
    assert last["setting"] == "PORTAL_SMTP_CA_FILE"
    assert found.problems() == []


def test_a_fixed_relay_clears_the_stored_error_even_when_nothing_is_due(
    make_app: Callable[..., Flask], sink: MailSink, other_ca_file: str
) -> None:
    seed(app_for(make_app, sink.port, sink.cert_file))
    worker.drain(app_for(make_app, sink.port, other_ca_file), "w1")  # the CA file was wrong
    app = app_for(make_app, sink.port, sink.cert_file)  # fixed, and the worker restarted
    with app.app_context():  # nothing is due: no notice would open a connection
        db.session.execute(update(Notification).values(status="cancelled"))
        db.session.commit()
    assert _report(app).problems() != []

    stats = worker.drain(app, "w1")  # its first pass, no probe asked for

    assert (stats.processed, stats.transport_error) == (0, None)
    last = _report(app).last_transport_error()
    assert last is not None
    assert last["current"] is False  # before: stuck "current"
    assert _report(app).problems() == []


def test_notifier_status_prints_the_report_and_exits_by_health(
    make_app: Callable[..., Flask],
    sink: MailSink,
    other_ca_file: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    seed(app, notices_count=2)
    _env(monkeypatch, app, sink)
    runner = CliRunner()

    nobody = runner.invoke(main, ["status"])
    assert nobody.exit_code == 1
    assert "UNHEALTHY: no notifier worker is running" in nobody.output

    worker.drain(app_for(make_app, sink.port, other_ca_file), "w1")
    broken = runner.invoke(main, ["status"])
    assert broken.exit_code == 1
    assert "queue: 2 queued (2 due" in broken.output
    assert "worker w1 (live" in broken.output
    assert "check PORTAL_SMTP_CA_FILE" in broken.output

    worker.drain(app, "w1", probe=True)
    good = runner.invoke(main, ["status", "--json"])
    assert good.exit_code == 0, good.output
    body = json.loads(good.output)
    assert (body["healthy"], body["database"], body["problems"]) == (True, "ok", [])
    assert body["queue"] == {"queued": 0, "due": 0, "sending": 0, "oldest_due_at": None}
    assert body["last_transport_error"]["reason"] == "tls-verify-failed"
    assert body["last_transport_error"]["current"] is False
    [w1] = body["workers"]
    assert (w1["worker_id"], w1["live"], w1["last_pass"]["sent"]) == ("w1", True, 2)
    assert PATIENT_EMAIL not in good.output + broken.output

    travel(timedelta(hours=1))  # nobody has beaten since
    assert runner.invoke(main, ["status"]).exit_code == 1


@pytest.mark.parametrize("where", ["postgresql", "sqlite"])
def test_notifier_status_with_the_database_unreachable_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, instance: Path, free_port: int, tmp_path: Path, where: str
) -> None:
    url = {
        "postgresql": f"postgresql://portal@127.0.0.1:{free_port}/portal",
        "sqlite": f"sqlite:///{tmp_path}/no/such/folder/portal.db",
    }[where]
    monkeypatch.setenv("PORTAL_DATABASE_URL", url)

    result = CliRunner().invoke(main, ["status"])

    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == "UNHEALTHY: database unreachable"
    as_json = CliRunner().invoke(main, ["status", "--json"])
    assert json.loads(as_json.output)["database"] == "unreachable"


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--health-port", "70000"], 2, "--health-port"),
        (["--health-port", "http"], 2, "--health-port"),
        (["--once", "--health-port", "0"], 2, "not --once"),
        (["--worker-id", "two words"], 2, "--worker-id"),
        (["--worker-id", "x" * 65], 2, "--worker-id"),
    ],
)
def test_notifier_run_refuses_bad_options(
    instance: Path, args: list[str], code: int, says: str
) -> None:
    result = CliRunner().invoke(main, ["run", *args])

    assert result.exit_code == code
    assert says in result.output
    assert "Traceback" not in result.output


def test_notifier_run_says_when_the_health_port_is_taken(
    make_app: Callable[..., Flask], sink: MailSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    seed(app)
    _env(monkeypatch, app, sink)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["run", "--health-port", str(port)])

    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: --health-port: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert sink.handler.stored == 0  # it did not start working


def test_notifier_run_once_exits_1_when_the_relay_is_unusable(
    make_app: Callable[..., Flask],
    sink: MailSink,
    other_ca_file: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    seed(app, notices_count=2)
    _env(monkeypatch, app, sink, ca=other_ca_file)

    result = CliRunner().invoke(main, ["run", "--once", "--worker-id", "cron-1"])

    assert result.exit_code == 1
    assert result.output.strip().endswith("sent 0, failed 0, retrying 0")
    assert _report(app).problems("cron-1")[0].startswith("worker cron-1: cannot use")


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - a local http URL
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def serve() -> Iterator[Callable[[Flask, str], str]]:
    """``serve(app, worker_id)``: the health endpoint on a free port; returns its URL."""
    servers: list[health_server.HealthServer] = []

    def start(app: Flask, worker_id: str) -> str:
        servers.append(health_server.start(app, worker_id, "127.0.0.1", 0))
        return f"http://127.0.0.1:{servers[-1].server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_the_health_endpoint_answers_for_its_worker(
    make_app: Callable[..., Flask],
    sink: MailSink,
    other_ca_file: str,
    serve: Callable[[Flask, str], str],
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    seed(app, notices_count=1)
    base = serve(app, "w1")

    assert _get(f"{base}/health")[0] == 503  # no heartbeat yet
    worker.drain(app_for(make_app, sink.port, other_ca_file), "w1")
    status, body = _get(f"{base}/health")
    assert (status, body["worker_id"], body["healthy"]) == (503, "w1", False)
    assert "PORTAL_SMTP_CA_FILE" in body["problems"][0]
    assert body["queue"]["queued"] == 1

    worker.drain(app, "w1", probe=True)
    status, body = _get(f"{base}/health")
    assert (status, body["healthy"], body["queue"]["queued"]) == (200, True, 0)
    assert _get(f"{base}/")[0] == 200
    assert _get(f"{base}/readyz")[0] == 404  # the portal's, not the notifier's

    travel(delivery.stale_after(120) + timedelta(seconds=1))
    status, body = _get(f"{base}/health")
    assert (status, body["problems"]) == (503, [f"worker w1: no heartbeat since {_beat(app)}"])


def _beat(app: Flask) -> str:
    with app.app_context():
        row = db.session.get(NotifierWorker, "w1")
        assert row is not None
        return health._when(row.beat_at)


def test_the_health_endpoint_answers_503_when_the_database_is_unreachable(
    instance: Path, free_port: int, serve: Callable[[Flask, str], str]
) -> None:
    app = create_worker_app({"DATABASE_URL": f"postgresql://portal@127.0.0.1:{free_port}/x"})

    status, body = _get(f"{serve(app, 'w1')}/health")

    assert (status, body["database"], body["problems"]) == (
        503,
        "unreachable",
        ["database unreachable"],
    )


def test_a_starting_worker_forgets_workers_silent_for_a_week(
    make_app: Callable[..., Flask], sink: MailSink
) -> None:
    app = app_for(make_app, sink.port, sink.cert_file)
    now = utcnow()
    with app.app_context():
        health.beat(db.session, "host:111", now - timedelta(days=8), 120)  # gone
        health.beat(db.session, "host:222", now - timedelta(days=6), 120)  # stale, kept a while
        health.register(db.session, "host:333", now, 120)
        db.session.commit()

    assert [w.row.worker_id for w in _report(app).workers] == ["host:222", "host:333"]
    assert [w.live for w in _report(app).workers] == [False, True]
