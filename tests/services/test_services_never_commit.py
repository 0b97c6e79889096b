"""Services flush, they never commit: a static check of the source, and a runtime
check that fails if a commit happens while a service (or the audit trail) is on the stack."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import event
from sqlalchemy.orm import Session

from portal.audit import NO_REQUEST, SYSTEM
from portal.extensions import db, limiter
from portal.services import keys
from tests.browser_client import Browser, enrolled_user
from tests.factories import make_message, make_patient, make_user
from tests.support.pickup import STAFF_EMAIL, enrolled_patient, send, signed_in

ROOT = Path(__file__).resolve().parents[2]
# The layers that only ever add to the caller's transaction.
NEVER_COMMIT = [
    *sorted((ROOT / "portal" / "services").glob("*.py")),
    ROOT / "portal" / "audit.py",
    ROOT / "notifier" / "outbox.py",
]


def commit_calls(path: Path) -> list[str]:
    """Return ``file:line`` of every ``<anything>.commit(...)`` call in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "commit"
    ]


def test_no_service_module_calls_commit() -> None:
    assert len(NEVER_COMMIT) > 10  # the glob found the services
    assert [hit for path in NEVER_COMMIT for hit in commit_calls(path)] == []


def test_the_static_check_finds_a_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def save(session):\n    session.flush()\n    session.commit()\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert commit_calls(sample) == ["sample.py:3"]


def _committing_layer() -> str | None:
    """The innermost service or audit frame on the current stack, if any."""
    frame = sys._getframe(1)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path in NEVER_COMMIT:
            return f"{path.name}:{frame.f_code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return None


@pytest.fixture
def commits_from_services() -> Iterator[list[str]]:
    """Every commit made while a service was on the stack (should stay empty)."""
    found: list[str] = []

    def check(_session: Session) -> None:
        layer = _committing_layer()
        if layer is not None:
            found.append(layer)

    event.listen(Session, "before_commit", check)
    yield found
    event.remove(Session, "before_commit", check)


def test_the_runtime_check_finds_a_service_that_commits(
    app: Flask, commits_from_services: list[str]
) -> None:
    fake = compile(
        "def save(session):\n    session.commit()\n",
        str(ROOT / "portal" / "services" / "keys.py"),
        "exec",
    )
    scope: dict[str, Any] = {}
    exec(fake, scope)  # noqa: S102 - a function that claims to live in a service module
    with app.app_context():
        scope["save"](db.session)
    assert commits_from_services == ["keys.py:save"]


def test_requests_across_the_portal_commit_only_at_their_boundary(
    app: Flask, commits_from_services: list[str]
) -> None:
    with app.app_context():
        limiter.reset()
    _, staff_secret, _ = enrolled_user(app, role="staff", email=STAFF_EMAIL)
    _, secret = enrolled_patient(app)
    sent = send(app)
    assert Browser(app).sign_in("zq@example.org", "wrong password").status_code == 401
    staff = signed_in(app, STAFF_EMAIL, staff_secret)
    for url in ("/staff/", f"/staff/messages/{sent.public_id}"):
        assert staff.get(url).status_code == 200, url
    patient = signed_in(app, "zq@example.org", secret)
    for url in (
        "/inbox",
        f"/messages/{sent.public_id}",
        f"/messages/{sent.public_id}/pdf",
        "/history",
    ):
        assert patient.get(url).status_code == 200, url
    assert patient.get(sent.path).status_code == 200
    assert commits_from_services == []


def test_key_rotation_commits_only_through_its_callers_checkpoint(
    app: Flask, commits_from_services: list[str]
) -> None:
    with app.app_context():
        staff, patient = make_user(db.session), make_patient(db.session)
        for _ in range(3):
            make_message(db.session, staff, patient)
        db.session.commit()
        live = sum(keys.status(db.session).values())  # messages' and people's data keys
        checkpoints: list[int] = []
        result = keys.rotate(
            db.session,
            actor=SYSTEM,
            meta=NO_REQUEST,
            batch_size=1,
            checkpoint=lambda: checkpoints.append(1),
        )
        assert commits_from_services == []  # the service itself committed nothing
        db.session.commit()
        assert result.rewrapped == live
        assert len(checkpoints) == 2 + live  # intent, start, then one per batch of one
        assert keys.status(db.session) == {result.version: live}


def test_the_runtime_check_watches_the_modules_that_run() -> None:
    """The check matches frames by file: the services imported must be these very files
    (not an installed or build/ copy), or it would watch nothing."""
    import portal.audit
    import portal.services.keys
    import portal.services.messaging

    for module in (portal.services.keys, portal.services.messaging, portal.audit):
        assert Path(module.__file__ or "") in NEVER_COMMIT
