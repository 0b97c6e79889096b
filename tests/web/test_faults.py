"""Faults an operator will meet (issue 11 item 14), over HTTP on both databases: a full disk
during an upload, a database outage, and what /readyz says about each."""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from flask import Flask
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from portal.extensions import db
from portal.models import Attachment, AuditEvent, Message, User
from portal.services import content
from portal.web import outage
from tests.browser_client import Browser, enrolled_user
from tests.factories import BODY, FILENAME, MINIMAL_PDF, PATIENT_NAME, SUBJECT
from tests.support.faults import TcpProxy, fill, tiny_disk

PASSWORD = "Correct horse battery staple 42"
FULL_TEXT = "The server cannot store files right now"
DOWN_TEXT = "cannot reach its database right now"


@pytest.fixture(autouse=True)
def fresh_outage_state(monkeypatch: pytest.MonkeyPatch) -> outage.Outage:
    state = outage.Outage("database")
    monkeypatch.setattr(outage, "database", state)
    return state


def signed_in_staff(app: Flask) -> Browser:
    _, secret, _ = enrolled_user(app)
    browser = Browser(app)
    assert browser.sign_in("sam@example.org", PASSWORD, secret).status_code == 302
    return browser


def register_patient(app: Flask, browser: Browser) -> str:
    done = browser.submit(
        "/staff/patients", {"email": "zq@example.org", "name": PATIENT_NAME, "dob": "1961-07-23"}
    )
    assert done.status_code == 200
    with app.app_context():
        return str(db.session.scalar(select(User.public_id).where(User.email == "zq@example.org")))


def compose(browser: Browser, patient_id: str) -> Any:
    data: dict[str, Any] = {
        "subject": SUBJECT,
        "body": BODY,
        "body_format": "text",
        "expires_days": "7",
        "attachments": [(io.BytesIO(MINIMAL_PDF), FILENAME)],
    }
    return browser.submit(
        f"/staff/messages/new?to={patient_id}", data, content_type="multipart/form-data"
    )


def stored(app: Flask) -> dict[str, int]:
    with app.app_context():
        store = content.blob_store()
        return {
            "messages": db.session.query(Message).count(),
            "attachments": db.session.query(Attachment).count(),
            "sends": db.session.query(AuditEvent).filter_by(action="message.send").count(),
            "blobs": len(list(store.iter_ids())),
            "partial": len(list((store.root / "tmp").iterdir())),
        }


def no_phi(text: str) -> None:
    for secret in (PATIENT_NAME, SUBJECT, BODY, FILENAME, "zq@example.org"):
        assert secret not in text


# --- a full disk under the blob store ------------------------------------------------------


@pytest.fixture
def full_blob_disk(tmp_path: Path) -> Iterator[Path]:
    with tiny_disk(tmp_path / "blobdisk", "2m") as mount:
        yield mount


def test_upload_to_a_full_disk_answers_507_and_stores_nothing(
    make_app: Any, full_blob_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(BLOB_DIR=str(full_blob_disk / "blobs"))
    browser = signed_in_staff(app)
    patient = register_patient(app, browser)
    filler = fill(full_blob_disk)
    with caplog.at_level(logging.INFO):
        refused = compose(browser, patient)
    assert refused.status_code == 507
    page = refused.get_data(as_text=True)
    assert FULL_TEXT in page
    no_phi(page)
    assert stored(app) == {"messages": 0, "attachments": 0, "sends": 0, "blobs": 0, "partial": 0}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "blob store cannot store files"
    ]
    no_phi(caplog.text)
    filler.unlink()  # room again: the same upload now goes through
    assert compose(browser, patient).status_code == 302
    assert stored(app)["blobs"] == 1


def test_readyz_reports_a_full_blob_store(make_app: Any, full_blob_disk: Path) -> None:
    app = make_app(BLOB_DIR=str(full_blob_disk / "blobs"))
    client = app.test_client()
    assert client.get("/readyz").get_json()["blob_store"] == "writable"
    filler = fill(full_blob_disk)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json() | {"schema": None} == {
        "status": "unavailable",
        "database": "ok",
        "blob_store": "not writable",
        "schema": None,
    }
    assert list((full_blob_disk / "blobs" / "tmp").iterdir()) == []  # the probe cleaned up
    filler.unlink()
    assert client.get("/readyz").status_code == 200


# --- a database outage ---------------------------------------------------------------------


class DatabaseSwitch:
    """Cuts and restores this test's database: a TCP proxy for PostgreSQL; for SQLite the
    database folder goes away (an unmounted volume) and comes back."""

    def __init__(self, backend: str, url: str, tmp_path: Path) -> None:
        self.backend = backend
        self.app: Flask | None = None
        if backend == "sqlite":
            self.folder = tmp_path / "dbvolume"
            self.folder.mkdir()
            source = Path(make_url(url).database or "")
            shutil.copy(source, self.folder / "portal.db")
            self.url = f"sqlite:///{self.folder / 'portal.db'}"
        else:
            parsed = make_url(url)
            self.proxy = TcpProxy((parsed.host or "127.0.0.1", parsed.port or 5432))
            self.url = parsed.set(host="127.0.0.1", port=self.proxy.port).render_as_string(
                hide_password=False
            )

    def cut(self) -> None:
        if self.backend == "sqlite":
            self.folder.rename(self.folder.with_name("dbvolume.gone"))
        else:
            self.proxy.cut()
        self._drop_pooled()

    def restore(self) -> None:
        if self.backend == "sqlite":
            self.folder.with_name("dbvolume.gone").rename(self.folder)
        else:
            self.proxy.restore()
        self._drop_pooled()

    def _drop_pooled(self) -> None:
        assert self.app is not None
        self.app.extensions["engine"].dispose()


@pytest.fixture
def switch(template: Any, tmp_path: Path) -> DatabaseSwitch:
    return DatabaseSwitch(template.backend, template.fresh(tmp_path), tmp_path)


def test_database_outage_answers_503_and_logs_once(
    make_app: Any,
    switch: DatabaseSwitch,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = switch.app = make_app(DATABASE_URL=switch.url)
    browser = signed_in_staff(app)
    assert browser.get("/staff/").status_code == 200
    token = browser.token("/staff/patients")
    switch.cut()
    with caplog.at_level(logging.INFO):
        answers = [browser.get("/staff/") for _ in range(3)]
        answers.append(
            browser.client.post(
                "/staff/patients", data={"csrf_token": token, "email": "a@example.org"}
            )
        )
        answers.append(app.test_client().get("/signin"))  # no session: the page itself fails
    for answer in answers:
        assert answer.status_code == 503
        assert answer.headers["Retry-After"] == str(outage.RETRY_AFTER_SECONDS)
        assert DOWN_TEXT in answer.get_data(as_text=True)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "database unavailable: answering 503 until it recovers"
    ]
    assert not any("stack" in vars(r) for r in caplog.records)
    caplog.clear()
    switch.restore()
    monkeypatch.setattr(outage, "QUIET_SECONDS", 0.0)
    with caplog.at_level(logging.INFO):
        assert browser.get("/staff/").status_code == 200  # the session survived the outage
        assert browser.get("/staff/").status_code == 200
    ended = [r.getMessage() for r in caplog.records if r.name == "portal.outage"]
    assert ended == ["database available again"]


def test_readyz_reports_the_database_down(make_app: Any, switch: DatabaseSwitch) -> None:
    app = switch.app = make_app(DATABASE_URL=switch.url)
    client = app.test_client()
    assert client.get("/readyz").get_json()["database"] == "ok"
    switch.cut()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json() == {
        "status": "unavailable",
        "database": "down",
        "blob_store": "writable",
    }
    switch.restore()
    assert client.get("/readyz").status_code == 200


def test_outage_state_is_one_line_each_way_under_threads() -> None:
    import threading

    clock = [100.0]
    state = outage.Outage("database", clock=lambda: clock[0])
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("portal.outage")
    logger.addHandler(handler)
    try:
        threads = [
            threading.Thread(target=state.failed, args=(ConnectionError(),)) for _ in range(20)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        state.succeeded()  # too soon after a failure: still down
        assert state.down
        clock[0] += outage.QUIET_SECONDS
        for _ in range(5):
            state.succeeded()
    finally:
        logger.removeHandler(handler)
    assert records == [
        "database unavailable: answering 503 until it recovers",
        "database available again",
    ]
    assert not state.down


# --- SQLite on a full disk (its own database: the file lives on the tiny disk) --------------


@contextlib.contextmanager
def sqlite_on_a_tiny_disk(tmp_path: Path) -> Iterator[tuple[Flask, Path]]:
    """The portal on a SQLite database of its own on a 16 MiB disk (blobs elsewhere):
    (app, the disk's folder); the engine disposed at the end."""
    from portal import create_app
    from portal.database import make_engine
    from portal.migrate import upgrade

    with tiny_disk(tmp_path / "disk", "16m") as disk:
        url = f"sqlite:///{disk / 'portal.db'}"
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        app = create_app(
            {"DATABASE_URL": url, "TESTING": True, "BLOB_DIR": str(tmp_path / "blobs")}
        )
        try:
            yield app, disk
        finally:
            app.extensions["engine"].dispose()


def test_sqlite_on_a_full_disk_answers_503_and_readyz_says_not_writable(
    tmp_path: Path, instance: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with sqlite_on_a_tiny_disk(tmp_path) as (app, disk):
        browser = signed_in_staff(app)
        token = browser.token("/staff/patients")
        with app.app_context():  # an empty WAL: the next write needs new blocks
            db.session.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        fill(disk)
        with caplog.at_level(logging.INFO):
            refused = browser.client.post(
                "/staff/patients",
                data={
                    "csrf_token": token,
                    "email": "zq@example.org",
                    "name": PATIENT_NAME,
                    "dob": "1961-07-23",
                },
            )
        assert refused.status_code == 503
        assert DOWN_TEXT in refused.get_data(as_text=True)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        no_phi(caplog.text)
        ready = app.test_client().get("/readyz")
        assert ready.status_code == 503
        assert ready.get_json()["database"] == "not writable"


def test_an_inbox_whose_audit_event_cannot_be_written_is_not_shown(
    tmp_path: Path, instance: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The inbox's event is written by the audit group appender (portal.audit_group), on a
    connection of its own: when that write fails (SQLite on a full disk: reads still work)
    the patient gets the 503 page, and no subject is shown without its event."""
    from tests.support.lists import fill_inbox
    from tests.support.pickup import enrolled_patient, signed_in

    with sqlite_on_a_tiny_disk(tmp_path) as (app, disk):
        enrolled_user(app, email="sam@example.org")
        _, secret = enrolled_patient(app, "pat@example.org", PATIENT_NAME)
        fill_inbox(app, "pat@example.org", 3, ["sam@example.org"], subject=SUBJECT)
        browser = signed_in(app, "pat@example.org", secret)
        assert SUBJECT in browser.get("/inbox").get_data(as_text=True)
        with app.app_context():
            shown = db.session.scalar(select(func.count()).select_from(AuditEvent))
            db.session.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        fill(disk)
        with caplog.at_level(logging.INFO):
            refused = browser.get("/inbox")
        assert refused.status_code == 503
        page = refused.get_data(as_text=True)
        assert DOWN_TEXT in page
        assert SUBJECT not in page
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        no_phi(caplog.text)
        with app.app_context():
            assert db.session.scalar(select(func.count()).select_from(AuditEvent)) == shown


def test_a_missing_table_is_a_logged_500_not_a_quiet_outage(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug that shares OperationalError's class (SQLite) must keep its stack and its 500."""
    app = make_app()

    @app.get("/probe-missing-table")
    def probe() -> str:
        db.session.execute(text("SELECT * FROM no_such_table_here"))
        return "unreachable"

    browser = signed_in_staff(app)
    with caplog.at_level(logging.INFO):
        answer = browser.get("/probe-missing-table")
    assert answer.status_code == 500
    assert not outage.database.down
    assert not [r for r in caplog.records if r.name == "portal.outage"]
    assert [r for r in caplog.records if r.levelno == logging.ERROR and "stack" in vars(r)]


@pytest.mark.parametrize(
    ("error", "down"),
    [
        (sqlite3.OperationalError("database or disk is full"), None),  # code set below
        (sqlite3.OperationalError("no such table: x"), False),
    ],
)
def test_sqlite_errors_are_told_apart_by_their_result_code(error: Any, down: Any) -> None:
    if down is None:
        error.sqlite_errorcode, down = 13, True  # SQLITE_FULL
    else:
        error.sqlite_errorcode = 1  # SQLITE_ERROR: a bug
    assert outage.is_outage(error) is down


def test_postgres_errors_are_told_apart_by_their_sqlstate() -> None:
    refused = psycopg.OperationalError("connection refused")  # no server answered: no sqlstate
    assert outage.is_outage(refused)
    assert outage.is_outage(psycopg.errors.AdminShutdown())
    assert outage.is_outage(psycopg.errors.DiskFull())
    assert not outage.is_outage(psycopg.errors.DeadlockDetected())
    assert not outage.is_outage(psycopg.errors.QueryCanceled())
    assert not outage.is_outage(psycopg.errors.UndefinedTable())


def test_a_session_lost_after_the_commit_never_says_nothing_was_saved(
    make_app: Any, switch: DatabaseSwitch
) -> None:
    app = switch.app = make_app(DATABASE_URL=switch.url)

    @app.get("/probe-cut-after-commit")
    def probe() -> str:
        from flask import session

        from portal.web.transaction import commit_now

        commit_now()
        session["probe"] = "changed"  # so the session row must be written
        switch.cut()  # the database goes away between the commit and the session save
        return "done"

    browser = signed_in_staff(app)

    answer = browser.get("/probe-cut-after-commit")
    page_text = answer.get_data(as_text=True)
    assert answer.status_code == 503
    assert "Your last action was saved" in page_text
    assert DOWN_TEXT not in page_text
    assert "session=;" in answer.headers.get("Set-Cookie", "").replace(" ", "")
    switch.restore()
