"""Signed-in reading: access control on every request, downloads, PDF, reply, inbox, history."""

from __future__ import annotations

import hashlib
import io
import re
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from pypdf import PdfReader
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError

from notifier import phi, render
from portal import audit
from portal.audit import NO_REQUEST, SYSTEM
from portal.database import utcnow
from portal.extensions import db
from portal.models import Attachment, AuditEvent, Conversation, Message, Notification, User
from portal.services import content, messaging, notices
from tests.browser_client import Browser, current_code
from tests.factories import BODY, FILENAME, MINIMAL_PDF, PHI_STRINGS, SUBJECT
from tests.support.pickup import (
    PASSWORD,
    STAFF_EMAIL,
    SentMessage,
    chain_ok,
    enrolled_patient,
    events,
    send,
    signed_in,
)


@pytest.fixture
def reader(app: Flask, staff: Any) -> tuple[Browser, SentMessage]:
    """The recipient, signed in, and a message with one PDF attachment."""
    _, secret = enrolled_patient(app)
    sent = send(app)
    return signed_in(app, "zq@example.org", secret), sent


def attachment_of(app: Flask, public_id: str) -> Attachment:
    with app.app_context():
        message = db.session.scalar(select(Message).where(Message.public_id == public_id))
        assert message is not None
        return message.attachments[0]


def download_url(sent: SentMessage, attachment: Attachment, how: str = "download") -> str:
    return f"/messages/{sent.public_id}/attachments/{attachment.public_id}/{how}"


def set_message(app: Flask, public_id: str, **values: Any) -> None:
    with app.app_context():
        message = db.session.scalar(select(Message).where(Message.public_id == public_id))
        assert message is not None
        if values.pop("revoke", False):
            messaging.revoke(db.session, message, actor=SYSTEM, meta=NO_REQUEST)
        if values.pop("shred", False):
            content.shred(db.session, message, actor=SYSTEM, meta=NO_REQUEST)
        for name, value in values.items():
            setattr(message, name, value)
        db.session.commit()


def test_message_page_shows_everything_and_marks_it_read(
    app: Flask, reader: tuple[Browser, SentMessage]
) -> None:
    browser, sent = reader
    inbox = browser.get("/inbox").get_data(as_text=True)
    assert SUBJECT in inbox
    assert 'class="unread' in inbox
    assert "New" in inbox
    page = browser.get(f"/messages/{sent.public_id}")
    body = page.get_data(as_text=True)
    attachment = attachment_of(app, sent.public_id)
    for expected in (
        SUBJECT,
        BODY,
        FILENAME,
        "Sam Staffer",
        attachment.sha256,
        "Download as PDF",
        "Your reply",
    ):
        assert expected in body
    assert page.headers["Cache-Control"] == "no-store"
    assert 'class="unread' not in browser.get("/inbox").get_data(as_text=True)
    with app.app_context():
        message = db.session.scalar(select(Message).where(Message.public_id == sent.public_id))
        assert message is not None
        assert message.first_opened_at is not None
    assert len(events(app, "message.view")) == 1


def test_markdown_body_is_sanitised(app: Flask, staff: Any) -> None:
    _, secret = enrolled_patient(app)
    sent = send(
        app,
        body="**Hi** <script>alert(1)</script> <img src=x onerror=alert(1)>",
        body_format="markdown",
    )
    page = signed_in(app, "zq@example.org", secret).get(f"/messages/{sent.public_id}")
    html = page.get_data(as_text=True)
    assert "<strong>Hi</strong>" in html
    assert "<script>alert" not in html
    assert "<img src=x" not in html


def test_download_is_byte_identical_with_safe_headers(
    app: Flask, reader: tuple[Browser, SentMessage]
) -> None:
    browser, sent = reader
    attachment = attachment_of(app, sent.public_id)
    response = browser.get(download_url(sent, attachment))
    assert response.status_code == 200
    assert response.data == MINIMAL_PDF
    assert hashlib.sha256(response.data).hexdigest() == attachment.sha256
    headers = response.headers
    assert headers["Content-Type"] == "application/pdf"
    assert headers["Content-Length"] == str(len(MINIMAL_PDF))
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Content-Disposition"] == (
        f"attachment; filename=\"{FILENAME}\"; filename*=UTF-8''{FILENAME}"
    )
    assert [e.target_id for e in events(app, "attachment.download")] == [attachment.public_id]


def test_non_ascii_file_name_gets_an_ascii_fallback(app: Flask, staff: Any) -> None:
    _, secret = enrolled_patient(app)
    sent = send(app, files=[('Résumé "x"\r\n.pdf', MINIMAL_PDF)])
    browser = signed_in(app, "zq@example.org", secret)
    disposition = browser.get(download_url(sent, attachment_of(app, sent.public_id))).headers[
        "Content-Disposition"
    ]
    assert disposition.startswith('attachment; filename="Resume x.pdf"; ')
    assert "filename*=UTF-8''R%C3%A9sum%C3%A9%20x.pdf" in disposition
    assert "\r" not in disposition
    assert "\n" not in disposition


def test_view_inline_under_a_sandbox(app: Flask, reader: tuple[Browser, SentMessage]) -> None:
    browser, sent = reader
    response = browser.get(download_url(sent, attachment_of(app, sent.public_id), "view"))
    assert response.data == MINIMAL_PDF
    assert response.headers["Content-Disposition"].startswith("inline; ")
    csp = response.headers["Content-Security-Policy"]
    assert csp.startswith("sandbox")
    assert "default-src 'none'" in csp
    assert len(events(app, "attachment.view")) == 1


def test_download_as_pdf_contains_the_body(app: Flask, reader: tuple[Browser, SentMessage]) -> None:
    browser, sent = reader
    response = browser.get(f"/messages/{sent.public_id}/pdf")
    assert response.status_code == 200
    assert response.mimetype == "application/pdf"
    assert response.headers["Content-Disposition"].startswith("attachment; ")
    words = " ".join(
        page.extract_text() for page in PdfReader(io.BytesIO(response.data)).pages
    ).split()
    flat = " ".join(words)
    assert "Xylophonoma biopsy shows Quasirandomitis" in flat
    assert SUBJECT in flat
    assert attachment_of(app, sent.public_id).sha256[:16] in flat.replace(" ", "")
    assert len(events(app, "message.pdf")) == 1


def test_download_fails_closed_when_the_audit_event_cannot_be_written(
    app: Flask, reader: tuple[Browser, SentMessage], monkeypatch: pytest.MonkeyPatch
) -> None:
    browser, sent = reader
    url = download_url(sent, attachment_of(app, sent.public_id))

    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise OperationalError("INSERT INTO audit_events", {}, Exception("disk full"))

    monkeypatch.setattr(audit, "record", broken)
    refused = browser.get(url)
    assert refused.status_code == 503
    assert b"%PDF" not in refused.data
    assert "nothing was sent" in refused.get_data(as_text=True)
    pdf_refused = browser.get(f"/messages/{sent.public_id}/pdf")
    assert pdf_refused.status_code == 503
    assert b"%PDF" not in pdf_refused.data
    monkeypatch.undo()
    with app.app_context():
        real_commit = db.session.commit
        calls = {"n": 0}

        def failing_commit() -> None:
            calls["n"] += 1
            raise OperationalError("COMMIT", {}, Exception("connection lost"))

        monkeypatch.setattr(db.session, "commit", failing_commit)
        lost = browser.get(url)
        monkeypatch.setattr(db.session, "commit", real_commit)
    assert lost.status_code == 503
    assert b"%PDF" not in lost.data
    assert calls["n"] == 1
    assert events(app, "attachment.download") == []
    assert browser.get(url).data == MINIMAL_PDF  # works again once auditing does
    assert chain_ok(app)


def test_revoke_during_an_open_session_stops_the_next_download(
    app: Flask, reader: tuple[Browser, SentMessage]
) -> None:
    browser, sent = reader
    url = download_url(sent, attachment_of(app, sent.public_id))
    assert browser.get(url).status_code == 200
    set_message(app, sent.public_id, revoke=True)
    for path in (url, f"/messages/{sent.public_id}", f"/messages/{sent.public_id}/pdf"):
        stopped = browser.get(path)
        assert stopped.status_code == 410
        assert b"%PDF" not in stopped.data
        assert BODY not in stopped.get_data(as_text=True)
    reply = browser.submit(
        f"/messages/{sent.public_id}/reply", {"body": "Thanks"}, form_page="/inbox"
    )
    assert reply.status_code == 410
    inbox = browser.get("/inbox").get_data(as_text=True)
    assert "Withdrawn" in inbox
    assert f"/messages/{sent.public_id}" not in inbox
    reasons = {e.details for e in events(app, "access.denied")}
    assert reasons == {'{"reason":"revoked"}'}
    assert chain_ok(app)


def test_expired_message_stops_in_an_open_session(
    app: Flask, reader: tuple[Browser, SentMessage]
) -> None:
    browser, sent = reader
    set_message(app, sent.public_id, expires_at=utcnow() - timedelta(minutes=1))
    page = browser.get(f"/messages/{sent.public_id}")
    assert page.status_code == 410
    assert "expired" in page.get_data(as_text=True)
    assert "Expired" in browser.get("/inbox").get_data(as_text=True)


def test_shredded_message_says_deleted(app: Flask, reader: tuple[Browser, SentMessage]) -> None:
    browser, sent = reader
    set_message(app, sent.public_id, shred=True)
    page = browser.get(f"/messages/{sent.public_id}")
    assert page.status_code == 410
    assert "This message was deleted" in page.get_data(as_text=True)
    assert "Deleted" in browser.get("/inbox").get_data(as_text=True)
    assert browser.get("/history").status_code == 200


def test_wrong_patient_gets_404_and_an_audit_event(
    app: Flask, reader: tuple[Browser, SentMessage]
) -> None:
    _, sent = reader
    _, secret = enrolled_patient(app, email="other@example.org", name="Olive Other")
    other = signed_in(app, "other@example.org", secret)
    attachment = attachment_of(app, sent.public_id)
    for path in (
        f"/messages/{sent.public_id}",
        download_url(sent, attachment),
        download_url(sent, attachment, "view"),
        f"/messages/{sent.public_id}/pdf",
    ):
        refused = other.get(path)
        assert refused.status_code == 404
        assert not [phi for phi in PHI_STRINGS if phi in refused.get_data(as_text=True)]
    assert SUBJECT not in other.get("/inbox").get_data(as_text=True)
    denied = events(app, "access.denied")
    assert len(denied) == 4
    assert {e.target_id for e in denied} == {sent.public_id}
    with app.app_context():
        other_id = db.session.scalar(select(User.id).where(User.email == "other@example.org"))
    assert {e.actor_id for e in denied} == {other_id}


def test_unknown_and_malformed_ids_are_404(app: Flask, reader: tuple[Browser, SentMessage]) -> None:
    browser, sent = reader
    for path in (
        "/messages/" + "0" * 32,
        "/messages/x'--",
        "/messages/" + "a" * 500,
        f"/messages/{sent.public_id}/attachments/{'0' * 32}/download",
        f"/messages/{sent.public_id}/attachments/nope/view",
    ):
        assert browser.get(path).status_code == 404
    assert events(app, "access.denied") == []


def test_anonymous_visitors_are_sent_to_sign_in(app: Flask, staff: Any) -> None:
    enrolled_patient(app)
    sent = send(app)
    response = Browser(app).get(f"/messages/{sent.public_id}")
    assert response.status_code == 302
    assert response.location.startswith("/signin?next=")


def test_reply_is_stored_encrypted_and_notifies_staff_without_phi(
    app: Flask, reader: tuple[Browser, SentMessage]
) -> None:
    browser, sent = reader
    reply_text = "Thank you, Dr Phiseedwell: Quasirandomitis noted, calling Tuesday."
    done = browser.submit(
        f"/messages/{sent.public_id}/reply",
        {"body": reply_text},
        form_page=f"/messages/{sent.public_id}",
    )
    assert done.status_code == 302
    page = browser.get(done.location).get_data(as_text=True)
    assert "Sent by you" in page
    assert "calling Tuesday" in page
    assert SUBJECT in browser.get("/inbox").get_data(as_text=True)
    assert browser.get("/inbox").get_data(as_text=True).count("<tr") == 2  # header + 1 message
    with app.app_context():
        raw = db.session.execute(text("SELECT subject_sealed, body_sealed FROM messages")).all()
        assert len(raw) == 2
        assert all(b"calling Tuesday" not in bytes(body) for _, body in raw)
        answer = db.session.scalar(select(Message).where(Message.in_reply_to_id.is_not(None)))
        staff_user = db.session.scalar(select(User).where(User.email == STAFF_EMAIL))
        assert answer
        assert staff_user
        assert answer.recipient_id == staff_user.id
        notice = db.session.scalar(select(Notification).where(Notification.kind == "reply"))
        assert notice
        assert notice.recipient_id == staff_user.id
        url = notices.open_payload(db.session, notice)
        conversation = db.session.get(Conversation, answer.conversation_id)
        assert conversation is not None
        # Straight to the conversation's staff page (after sign-in), by its public id only.
        assert url == f"{app.config['BASE_URL']}/staff/conversations/{conversation.public_id}"
        email = render.render(
            notice,
            url=url,
            org_name=app.config["ORG_NAME"],
            org_address=app.config["ORG_ADDRESS"],
            support_contact="the desk",
            expires_at=None,
            mail_from="no-reply@example.org",
            to_address=STAFF_EMAIL,
            message_id_domain="example.org",
        )
        texts = [t.replace(url, " ") for t in render.readable_texts(email)]
        assert not phi.find_phi(texts, phi.phi_terms(db.session, notice))
        assert not [s for s in (*PHI_STRINGS, "Tuesday") if any(s in t for t in texts)]
    assert len(events(app, "message.reply")) == 1
    assert chain_ok(app)


def test_over_long_or_empty_reply_is_refused(
    app: Flask, reader: tuple[Browser, SentMessage]
) -> None:
    browser, sent = reader
    url = f"/messages/{sent.public_id}/reply"
    for body in ("x" * 10_001, "   "):
        refused = browser.submit(url, {"body": body}, form_page=f"/messages/{sent.public_id}")
        assert refused.status_code == 400
        assert 'class="error"' in refused.get_data(as_text=True)
    assert browser.client.post(url, data={"body": "no token"}).status_code == 400
    with app.app_context():
        assert db.session.scalar(select(Message).where(Message.in_reply_to_id.is_not(None))) is None
    assert events(app, "message.reply") == []


def test_inbox_newest_first_with_states(app: Flask, staff: Any) -> None:
    _, secret = enrolled_patient(app)
    first = send(app, body="first")
    second = send(app, body="second")
    set_message(app, first.public_id, revoke=True)
    inbox = signed_in(app, "zq@example.org", secret).get("/inbox").get_data(as_text=True)
    assert inbox.index("Withdrawn") > inbox.index(f"/messages/{second.public_id}")
    assert f"/messages/{first.public_id}" not in inbox
    assert "Sam Staffer" in inbox


def test_history_lists_every_access(app: Flask, reader: tuple[Browser, SentMessage]) -> None:
    browser, sent = reader
    attachment = attachment_of(app, sent.public_id)
    browser.get(f"/messages/{sent.public_id}")
    browser.get(download_url(sent, attachment))
    staff_browser = signed_in(app, STAFF_EMAIL, _staff_secret(app))
    staff_browser.get(f"/staff/messages/{sent.public_id}")
    assert staff_browser.get("/history").status_code == 403  # patients only
    page = browser.get("/history").get_data(as_text=True)
    for expected in (
        "Read the message",
        "Downloaded an attachment",
        "Sent you a message",
        "Sam Staffer",
        "(staff, ",
        "You",
        "127.0.0.1",
        SUBJECT,
    ):
        assert expected in page, expected
    rows = re.findall(r"<tr>", page)[1:]  # after the header row
    with app.app_context():
        patient_id = db.session.scalar(select(User.id).where(User.email == "zq@example.org"))
        mine = db.session.scalars(select(AuditEvent).where(AuditEvent.patient_id == patient_id))
        assert len(rows) + 1 == len(list(mine))  # + the audited view of this page
    assert chain_ok(app)


NOSY_NAME = "Ottoline Nosyparker-Snoop"
NOSY_EMAIL = "ottoline.snoop@example.org"
NOSY_IP = "198.51.100.77"
NOSY_LEAKS = (NOSY_NAME, "Nosyparker", "Ottoline", NOSY_EMAIL, "ottoline.snoop", NOSY_IP)


def _nosy_patient_denied(app: Flask, sent: SentMessage) -> None:
    """A second, recognisable patient tries the first patient's message from their own address."""
    _, secret = enrolled_patient(app, email=NOSY_EMAIL, name=NOSY_NAME)
    nosy = signed_in(app, NOSY_EMAIL, secret)
    refused = nosy.get(f"/messages/{sent.public_id}", environ_base={"REMOTE_ADDR": NOSY_IP})
    assert refused.status_code == 404
    denied = events(app, "access.denied")
    assert [e.client_ip for e in denied] == [NOSY_IP]


def test_history_never_names_another_patient(
    app: Flask, reader: tuple[Browser, SentMessage]
) -> None:
    """Issue 10 item 4: other patients' attempts show without name, email or address."""
    browser, sent = reader
    _nosy_patient_denied(app, sent)
    page = browser.get("/history").get_data(as_text=True)
    assert not [leak for leak in NOSY_LEAKS if leak in page]
    assert "Another patient" in page
    assert "Was refused access" in page
    assert f"(staff, {app.config['ORG_NAME']})" in page  # the organisation's people by name
    assert "Sam Staffer" in page


def test_disclosure_pdf_never_names_another_patient(
    app: Flask, reader: tuple[Browser, SentMessage]
) -> None:
    """Issue 10 item 4: the same rule in the patient's accounting of disclosures."""
    browser, sent = reader
    _nosy_patient_denied(app, sent)
    today = utcnow().date().isoformat()
    response = browser.submit(
        "/history/disclosures.pdf", {"since": today, "until": today}, form_page="/history"
    )
    assert response.mimetype == "application/pdf"
    text_ = " ".join(p.extract_text() for p in PdfReader(io.BytesIO(response.data)).pages)
    spaced, squeezed = " ".join(text_.split()), "".join(text_.split())
    assert not [leak for leak in NOSY_LEAKS if leak in spaced or leak.replace(" ", "") in squeezed]
    assert "Another patient" in spaced
    assert "access attempt denied" in spaced
    assert "Sam Staffer" in spaced


def test_history_view_is_audited(app: Flask, reader: tuple[Browser, SentMessage]) -> None:
    """Issue 10 item 10: the history shows subjects and names (PHI), so each view is audited."""
    browser, _ = reader
    assert events(app, "patient.history.view") == []
    assert browser.get("/history").status_code == 200
    assert browser.get("/history").status_code == 200
    viewed = events(app, "patient.history.view")
    with app.app_context():
        patient_id = db.session.scalar(select(User.id).where(User.email == "zq@example.org"))
    assert len(viewed) == 2
    assert {(e.actor_id, e.patient_id, e.client_ip) for e in viewed} == {
        (patient_id, patient_id, "127.0.0.1")
    }
    assert "Viewed this access history" in browser.get("/history").get_data(as_text=True)
    assert chain_ok(app)


def _staff_secret(app: Flask) -> str:
    from portal.services import signin

    with app.app_context():
        user = db.session.scalar(select(User).where(User.email == STAFF_EMAIL))
        assert user is not None
        secret = signin.totp_secret(db.session, user)
        assert secret is not None
        return secret


def test_a_whole_pickup_leaves_a_complete_verified_trail(app: Flask, staff: Any) -> None:
    _, secret = enrolled_patient(app)
    sent = send(app)
    browser = Browser(app)
    browser.get(sent.path)
    browser.submit(sent.path)
    start = browser.get("/pickup")
    signin_page = start.location
    browser.submit(signin_page, {"email": "zq@example.org", "password": PASSWORD})
    landed = browser.submit("/signin/code", {"code": current_code(secret)})
    assert landed.location == f"/messages/{sent.public_id}"
    attachment = attachment_of(app, sent.public_id)
    browser.get(landed.location)
    browser.get(download_url(sent, attachment))
    browser.get(download_url(sent, attachment, "view"))
    browser.get(f"/messages/{sent.public_id}/pdf")
    browser.submit(
        f"/messages/{sent.public_id}/reply", {"body": "Thank you."}, form_page=landed.location
    )
    actions = [e.action for e in events(app)]
    expected = [
        "message.send",
        "link.open",
        "auth.signin",
        "message.view",
        "attachment.download",
        "attachment.view",
        "message.pdf",
        "message.reply",
    ]
    assert [a for a in dict.fromkeys(actions) if a in expected] == expected  # first of each
    with app.app_context():
        patient_id = db.session.scalar(select(User.id).where(User.email == "zq@example.org"))
    about = [e for e in events(app) if e.action in expected[3:]]
    assert {e.patient_id for e in about} == {patient_id}
    assert {e.actor_id for e in about} == {patient_id}
    assert all(e.client_ip == "127.0.0.1" and e.request_id for e in about)
    assert chain_ok(app)


def test_patient_downloads_own_disclosure_record(app: Flask) -> None:
    """Issue 7 item 3: the patient's own accounting of disclosures, from the portal."""
    from tests.browser_client import enrolled_user

    _, secret, _ = enrolled_user(app, role="patient", email="pat@example.org", name="Pat Ient")
    browser = Browser(app)
    assert (
        browser.sign_in("pat@example.org", "Correct horse battery staple 42", secret).status_code
        == 302
    )
    browser.get("/inbox")
    today = utcnow().date().isoformat()
    response = browser.submit(
        "/history/disclosures.pdf", {"since": today, "until": today}, form_page="/history"
    )
    assert response.mimetype == "application/pdf"
    pdf_text = " ".join(p.extract_text() for p in PdfReader(io.BytesIO(response.data)).pages)
    assert "Pat Ient" in " ".join(pdf_text.split())
    bad = browser.submit(
        "/history/disclosures.pdf", {"since": today, "until": "2000-01-01"}, form_page="/history"
    )
    assert bad.status_code == 400  # the history page again, the error under "To (inclusive)"
    assert "The last day is before the first." in bad.get_data(as_text=True)
    with app.app_context():
        assert db.session.query(AuditEvent).filter_by(action="audit.report").count() == 1
        assert db.session.query(AuditEvent).filter_by(action="message.list").count() == 1
