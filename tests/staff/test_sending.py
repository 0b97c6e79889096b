"""Staff send: register patients, compose with PDFs, refuse bad files, status, revoke, resend."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from pypdf import PdfWriter
from sqlalchemy import select

from portal.extensions import db
from portal.models import Attachment, AuditEvent, Message, Notification, PickupLink, User
from portal.services import content
from tests.browser_client import Browser, enrolled_user, next_code
from tests.factories import BODY, FILENAME, MINIMAL_PDF, PATIENT_NAME, SUBJECT

PASSWORD = "Correct horse battery staple 42"


@pytest.fixture
def staff(app: Flask) -> tuple[Browser, str]:
    _, secret, _ = enrolled_user(app)
    browser = Browser(app)
    assert browser.sign_in("sam@example.org", PASSWORD, secret).status_code == 302
    return browser, secret


@pytest.fixture
def patient(app: Flask, staff: tuple[Browser, str]) -> str:
    browser, _ = staff
    done = browser.submit(
        "/staff/patients", {"email": "zq@example.org", "name": PATIENT_NAME, "dob": "1961-07-23"}
    )
    assert done.status_code == 200
    with app.app_context():
        return db.session.scalar(select(User.public_id).where(User.email == "zq@example.org"))


def encrypted_pdf() -> bytes:
    writer = PdfWriter()
    writer.add_blank_page(72, 72)
    writer.encrypt("secret-pass")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def compose(
    browser: Browser, patient_id: str, files: list[tuple[bytes, str]], **fields: str
) -> Any:
    url = f"/staff/messages/new?to={patient_id}"
    data: dict[str, Any] = {
        "subject": SUBJECT,
        "body": BODY,
        "body_format": "text",
        "expires_days": "7",
        **fields,
    }
    data["attachments"] = [(io.BytesIO(blob), name) for blob, name in files]
    return browser.submit(url, data, content_type="multipart/form-data")


def counts(app: Flask) -> dict[str, int]:
    with app.app_context():
        return {
            "messages": db.session.query(Message).count(),
            "attachments": db.session.query(Attachment).count(),
            "links": db.session.query(PickupLink).count(),
            "notices": db.session.query(Notification).count(),
            "sends": db.session.query(AuditEvent).filter_by(action="message.send").count(),
            "blobs": len(list(content.blob_store().iter_ids())),
        }


NOTHING = {"messages": 0, "attachments": 0, "links": 0, "notices": 0, "sends": 0, "blobs": 0}


def test_send_with_pdfs(app: Flask, staff: tuple[Browser, str], patient: str) -> None:
    browser, _ = staff
    sent = compose(browser, patient, [(MINIMAL_PDF, FILENAME), (MINIMAL_PDF, "second.pdf")])
    assert sent.status_code == 302
    assert counts(app) == {
        "messages": 1,
        "attachments": 2,
        "links": 1,
        "notices": 1,
        "sends": 1,
        "blobs": 2,
    }
    status = browser.get(sent.location).get_data(as_text=True)
    assert FILENAME in status
    with app.app_context():
        sha = db.session.scalars(select(Attachment.sha256)).first()
    assert sha in status
    assert "Email notice queued" in status
    assert "/p/" not in sent.location


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"Just some text, no PDF here", "is not a PDF file"),
        (b"<html><script>alert(1)</script></html>\n" + MINIMAL_PDF, "is not a PDF file"),
        (MINIMAL_PDF[:40] + b"\x00garbage" * 10, "could not be read"),
        (b"%PDF-1.7\n" + b"\x89PNG junk" * 50, "could not be read"),
        ("encrypted", "password-protected"),
    ],
)
def test_bad_uploads_refused_and_nothing_stored(
    app: Flask, staff: tuple[Browser, str], patient: str, blob: Any, message: str
) -> None:
    browser, _ = staff
    data = encrypted_pdf() if blob == "encrypted" else blob
    response = compose(browser, patient, [(MINIMAL_PDF, "good.pdf"), (data, "bad.pdf")])
    assert response.status_code == 400
    assert message in response.get_data(as_text=True)
    assert "Traceback" not in response.get_data(as_text=True)
    assert counts(app) == NOTHING


def test_oversize_upload_refused(make_app: Any, tmp_path: Path) -> None:
    app = make_app(MAX_UPLOAD=2000)
    _, secret, _ = enrolled_user(app)
    browser = Browser(app)
    browser.sign_in("sam@example.org", PASSWORD, secret)
    browser.submit(
        "/staff/patients", {"email": "zq@example.org", "name": PATIENT_NAME, "dob": "1961-07-23"}
    )
    with app.app_context():
        patient_id = db.session.scalar(select(User.public_id).where(User.role == "patient"))
    big = MINIMAL_PDF + b"%" + b"x" * 3000 + b"\n"
    response = compose(browser, patient_id, [(big, "big.pdf")])
    assert "larger than this portal accepts" in response.get_data(as_text=True)
    assert counts(app) == NOTHING


def test_crash_mid_send_leaves_nothing(
    app: Flask, staff: tuple[Browser, str], patient: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from portal.services import notices

    def explode(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("power cut between message and notice")

    monkeypatch.setattr(notices, "enqueue", explode)
    browser, _ = staff
    response = compose(browser, patient, [(MINIMAL_PDF, FILENAME)])
    assert response.status_code == 500
    assert SUBJECT not in response.get_data(as_text=True)
    assert counts(app) == NOTHING


def test_register_patient_with_access_code_shown_once(
    app: Flask, staff: tuple[Browser, str]
) -> None:
    browser, _ = staff
    page = browser.submit(
        "/staff/patients", {"email": "ac@example.org", "name": "Ann Code", "access_code": "y"}
    ).get_data(as_text=True)
    assert 'id="access-code"' in page
    code = page.split('id="access-code">')[1].split("<")[0]
    with app.app_context():
        user = db.session.scalar(select(User).where(User.email == "ac@example.org"))
        assert code not in (user.profile.access_code_hash or "")
    again = browser.submit("/staff/patients", {"intent": "find", "email": "ac@example.org"})
    assert "Ann Code" in again.get_data(as_text=True)
    assert code not in again.get_data(as_text=True)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"email": "not-an-email", "name": "X Y", "dob": "1990-01-01"}, "valid email"),
        ({"email": "a@example.org", "name": "X Y"}, "date of birth or issue an access code"),
        ({"email": "a@example.org", "name": "X Y", "dob": "2999-01-01"}, "between 1900 and today"),
    ],
)
def test_register_patient_bad_input(
    app: Flask, staff: tuple[Browser, str], fields: dict[str, str], error: str
) -> None:
    browser, _ = staff
    page = browser.submit("/staff/patients", fields).get_data(as_text=True)
    assert error in page
    with app.app_context():
        assert db.session.query(User).filter_by(role="patient").count() == 0


def test_revoke_needs_reauth_and_stops_links(
    app: Flask, staff: tuple[Browser, str], patient: str
) -> None:
    from datetime import timedelta

    from portal.database import travel

    browser, secret = staff
    status_url = compose(browser, patient, [(MINIMAL_PDF, FILENAME)]).location
    public_id = status_url.rsplit("/", 1)[1]
    try:
        travel(timedelta(minutes=6))
        stale = browser.submit(
            f"/staff/messages/{public_id}/revoke", {"back": status_url}, form_page=status_url
        )
        assert stale.location.startswith("/reauth")
        assert browser.submit(stale.location, {"code": next_code(secret)}).location == status_url
        done = browser.submit(f"/staff/messages/{public_id}/revoke", form_page=status_url)
        assert done.location == status_url
    finally:
        travel(None)
    with app.app_context():
        message = db.session.scalar(select(Message))
        assert message.revoked_at is not None
        assert all(link.revoked_at for link in db.session.scalars(select(PickupLink)))
        assert db.session.scalar(select(Notification.status)) == "cancelled"
        assert db.session.query(AuditEvent).filter_by(action="message.revoke").count() == 1


def test_resend_revokes_old_link(app: Flask, staff: tuple[Browser, str], patient: str) -> None:
    browser, _ = staff
    status_url = compose(browser, patient, [(MINIMAL_PDF, FILENAME)]).location
    public_id = status_url.rsplit("/", 1)[1]
    assert (
        browser.submit(f"/staff/messages/{public_id}/resend", form_page=status_url).location
        == status_url
    )
    with app.app_context():
        links = db.session.scalars(select(PickupLink).order_by(PickupLink.id)).all()
        assert len(links) == 2
        assert links[0].revoked_at is not None
        assert links[1].revoked_at is None
        assert db.session.query(Notification).count() == 2
        assert db.session.query(AuditEvent).filter_by(action="message.resend").count() == 1


def test_patient_cannot_reach_staff_pages(app: Flask) -> None:
    _, secret, _ = enrolled_user(app, role="patient", email="p@example.org", name="Pat Ient")
    browser = Browser(app)
    browser.sign_in("p@example.org", PASSWORD, secret)
    assert browser.get("/staff/").status_code == 403
    assert browser.get("/staff/patients").status_code == 403


def test_cli_send(app: Flask, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from portal import cli
    from tests.factories import make_patient, make_user

    with app.app_context():
        make_user(db.session, email="cli-staff@example.org")
        make_patient(db.session)
        db.session.commit()
    pdf = tmp_path / "result.pdf"
    pdf.write_bytes(MINIMAL_PDF)
    bad = tmp_path / "notes.pdf"
    bad.write_bytes(b"not a pdf at all")
    env = {"PORTAL_DATABASE_URL": app.config["DATABASE_URL"]}
    base = [
        "messages",
        "send",
        "--from",
        "cli-staff@example.org",
        "--to",
        "zq@example.org",
        "--subject",
        SUBJECT,
        "--body",
        BODY,
    ]
    refused = CliRunner().invoke(
        cli.main, [*base, "--attach", str(pdf), "--attach", str(bad)], env=env
    )
    assert refused.exit_code == 1
    assert "not a PDF" in refused.output
    assert counts(app) == NOTHING
    unknown = CliRunner().invoke(cli.main, [*base[:5], "nobody@example.org", *base[6:]], env=env)
    assert unknown.exit_code == 1
    ok = CliRunner().invoke(cli.main, [*base, "--attach", str(pdf), "--expires-in", "3d"], env=env)
    assert ok.exit_code == 0, ok.output
    assert counts(app)["notices"] == 1
    assert SUBJECT not in ok.output
