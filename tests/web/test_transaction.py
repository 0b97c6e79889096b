"""The request's one commit boundary (portal.web.transaction): a view that returns commits,
whatever its status; an exception rolls back every row and blob; streams commit first."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Blueprint, Flask, abort
from sqlalchemy import func, select

from portal import audit
from portal.audit import SYSTEM, Action
from portal.extensions import db, limiter
from portal.models import AuditEvent
from portal.services import content, pickup
from portal.web.security import request_meta
from tests.browser_client import enrolled_user
from tests.factories import MINIMAL_PDF
from tests.support.pickup import STAFF_EMAIL, chain_ok, enrolled_patient, events, send, signed_in


@pytest.fixture(autouse=True)
def clean_limits(app: Flask) -> None:
    """Empty rate-limit counters (the Redis store is shared between test runs)."""
    with app.app_context():
        limiter.reset()


def _record(marker: str) -> None:
    audit.record(
        db.session,
        Action.AUDIT_SEARCH,
        actor=SYSTEM,
        meta=request_meta(),
        details={"probe": marker},
    )


def probe_blueprint() -> Blueprint:
    """Test-only views that write and never commit (registered in these tests, not the app)."""
    bp = Blueprint("probe", __name__, url_prefix="/probe")

    @bp.get("/forgets")
    def forgets() -> str:
        _record("forgets")
        return "ok"

    @bp.get("/refuses")
    def refuses() -> tuple[str, int]:  # a 401 that must keep its counter (failed sign-in)
        _record("refuses")
        return "no", 401

    @bp.get("/raises")
    def raises() -> str:
        _record("raises")
        content.store_blob(db.session, os.urandom(32), "probe-object", iter([b"x" * 100]))
        raise RuntimeError("a bug after the writes")

    @bp.get("/aborts")
    def aborts() -> str:
        _record("aborts")
        abort(404)

    return bp


@pytest.fixture
def probe(app: Flask) -> Flask:
    """The app with the probe blueprint registered (before its first request)."""
    app.register_blueprint(probe_blueprint())
    return app


def probe_events(app: Flask, marker: str) -> int:
    """How many probe events with ``marker`` a fresh session (another connection) sees."""
    with app.app_context():
        rows = db.session.scalars(
            select(AuditEvent.details).where(AuditEvent.action == Action.AUDIT_SEARCH)
        )
        return sum(1 for details in rows if f'"{marker}"' in (details or ""))


def blob_count(app: Flask) -> int:
    with app.app_context():
        return len(list(content.blob_store().iter_ids()))


def test_a_view_that_forgets_to_commit_still_has_its_audit_event_committed(probe: Flask) -> None:
    response = probe.test_client().get("/probe/forgets")
    assert (response.status_code, response.data) == (200, b"ok")
    assert probe_events(probe, "forgets") == 1
    assert chain_ok(probe)


def test_a_4xx_the_view_returns_is_committed_too(probe: Flask) -> None:
    """The documented choice: the status never decides, an escaping exception does."""
    assert probe.test_client().get("/probe/refuses").status_code == 401
    assert probe_events(probe, "refuses") == 1


def test_an_exception_rolls_back_every_row_and_blob(probe: Flask) -> None:
    before = blob_count(probe)
    response = probe.test_client().get("/probe/raises")
    assert response.status_code == 500
    assert b"a bug after the writes" not in response.data
    assert probe_events(probe, "raises") == 0
    assert blob_count(probe) == before
    with probe.app_context():
        assert db.session.scalar(select(func.count()).select_from(AuditEvent)) == 0
    assert chain_ok(probe)


def test_an_abort_after_a_write_rolls_it_back(probe: Flask) -> None:
    assert probe.test_client().get("/probe/aborts").status_code == 404
    assert probe_events(probe, "aborts") == 0


def test_the_next_request_starts_clean_after_a_rollback(probe: Flask) -> None:
    client = probe.test_client()
    assert client.get("/probe/raises").status_code == 500
    assert client.get("/probe/forgets").status_code == 200
    assert (probe_events(probe, "raises"), probe_events(probe, "forgets")) == (0, 1)


def test_a_streamed_downloads_audit_event_is_committed_before_the_first_byte(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    enrolled_user(app, role="staff", email=STAFF_EMAIL)
    _, secret = enrolled_patient(app)
    sent = send(app)
    browser = signed_in(app, "zq@example.org", secret)
    with app.app_context():
        message = pickup.find_message(db.session, sent.public_id)
        assert message is not None
        attachment_id = message.attachments[0].public_id
    seen_at_first_byte: list[int] = []
    real_open = pickup.open_attachment

    def watched(*args: Any, **kwargs: Any) -> tuple[str, Iterator[bytes]]:
        name, chunks = real_open(*args, **kwargs)

        def first_checks() -> Iterator[bytes]:
            # Another connection, at the moment the first chunk is about to leave.
            seen_at_first_byte.append(len(events(app, "attachment.download")))
            try:
                yield from chunks
            finally:
                chunks.close()  # type: ignore[attr-defined]

        return name, first_checks()

    monkeypatch.setattr(pickup, "open_attachment", watched)
    url = f"/messages/{sent.public_id}/attachments/{attachment_id}/download"
    response = browser.get(url, buffered=False)
    assert response.status_code == 200
    body = io.BytesIO()
    for chunk in response.response:
        body.write(chunk)
    response.close()
    assert seen_at_first_byte == [1]
    assert body.getvalue() == MINIMAL_PDF
    assert len(events(app, "attachment.download")) == 1
