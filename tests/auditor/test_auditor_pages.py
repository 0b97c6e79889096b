"""Auditor console over HTTP: search, export (re-auth, audited), disclosures PDF, verify."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from pypdf import PdfReader
from sqlalchemy import select, text
from werkzeug.test import TestResponse

from portal import audit
from portal.audit import Action, Actor, RequestMeta
from portal.database import travel, utcnow
from portal.extensions import db
from portal.models import AuditEvent, Message, User
from portal.services import messaging
from tests.browser_client import Browser, enrolled_user, next_code
from tests.factories import BODY, PATIENT_NAME, SUBJECT, make_patient

PASSWORD = "Correct horse battery staple 42"


@pytest.fixture(autouse=True)
def real_time() -> Any:
    yield
    travel(None)


@pytest.fixture
def world(app: Flask) -> dict[str, Any]:
    """A staff sender, a patient with one message, two patient accesses, a signed-in auditor."""
    staff, _, _ = enrolled_user(app, email="sam@example.org")
    _, secret, _ = enrolled_user(app, role="auditor", email="ada@example.org", name="Ada Auditor")
    with app.app_context():
        patient = make_patient(db.session)
        sent = messaging.send(
            db.session,
            sender=db.session.get(User, staff.id),
            recipient=patient,
            subject=SUBJECT,
            body=BODY,
            meta=RequestMeta("198.51.100.7", "staff-browser", "r1"),
        )
        for action in (Action.MESSAGE_VIEW, Action.ATTACHMENT_DOWNLOAD):
            audit.record(
                db.session,
                action,
                actor=Actor(patient.id, "patient"),
                meta=RequestMeta("203.0.113.9", "patient-phone", "r2"),
                target_type="message",
                target_id=sent.message.public_id,
                patient_id=patient.id,
                message_id=sent.message.id,
            )
        db.session.commit()
        message_id = sent.message.public_id
    browser = Browser(app)
    assert browser.sign_in("ada@example.org", PASSWORD, secret).status_code == 302
    return {"browser": browser, "secret": secret, "message": message_id}


def events(app: Flask, action: str) -> list[AuditEvent]:
    with app.app_context():
        return list(db.session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def patient_public_id(app: Flask, email: str = "zq@example.org") -> str:
    with app.app_context():
        found = db.session.scalar(select(User.public_id).where(User.email == email))
        assert found is not None
        return str(found)


def search(browser: Browser, data: dict[str, str]) -> TestResponse:
    """Post the search form, then follow its redirect to the results page."""
    posted = browser.submit("/audit/", data)
    assert posted.status_code == 303, posted.get_data(as_text=True)[:300]
    return browser.get(posted.location)


def test_search_by_patient_shows_metadata_not_content(app: Flask, world: dict[str, Any]) -> None:
    page = search(world["browser"], {"patient": "zq@example.org"}).get_data(as_text=True)
    assert PATIENT_NAME in page
    assert "message.view" in page
    assert "203.0.113.9" in page
    assert SUBJECT not in page
    assert "Xylophonoma" not in page
    searches = events(app, "audit.search")
    assert searches[-1].details == json.dumps(
        {"patient_id": searches[-1].patient_id}, separators=(",", ":")
    )


def test_search_combined_filters(app: Flask, world: dict[str, Any]) -> None:
    page = search(
        world["browser"],
        {
            "patient": "zq@example.org",
            "action": "attachment.download",
            "outcome": "success",
            "client_ip": "203.0.113.9",
            "message": world["message"],
        },
    ).get_data(as_text=True)
    assert "1 event" in page
    assert "attachment.download" in page


def test_search_bad_filters_refused(app: Flask, world: dict[str, Any]) -> None:
    browser = world["browser"]
    token = browser.token("/audit/")
    before = len(events(app, "audit.search"))
    page = browser.client.post(
        "/audit/", data={"csrf_token": token, "patient": "nobody@example.org"}
    )
    assert page.status_code == 400
    assert "No account has that patient email" in page.get_data(as_text=True)
    refused = browser.get("/audit/?client_ip=not-an-ip&patient_id=" + "0" * 32)
    assert refused.status_code == 400
    assert "No account has that patient id" in refused.get_data(as_text=True)
    assert len(events(app, "audit.search")) == before
    assert browser.client.post("/audit/", data={"patient": "zq@example.org"}).status_code == 400


def test_no_email_travels_in_a_url(app: Flask, world: dict[str, Any]) -> None:
    """Issue 10 item 10: a search by email is posted; results, pages and exports use ids."""
    with app.app_context():
        for _ in range(60):
            audit.record(
                db.session,
                Action.AUTH_SIGNIN,
                actor=Actor(None, "system"),
                patient_id=db.session.scalar(select(User.id).where(User.email == "zq@example.org")),
            )
        db.session.commit()
    browser = world["browser"]
    posted = browser.submit("/audit/", {"patient": "zq@example.org", "action": "auth.signin"})
    assert posted.status_code == 303
    assert f"patient_id={patient_public_id(app)}" in posted.location
    assert "@" not in posted.location
    assert "%40" not in posted.location
    results = browser.get(posted.location)
    page = results.get_data(as_text=True)
    assert "Older events" in page
    links = re.findall(r'(?:href|action)="([^"]*)"', page)
    assert [link for link in links if "/audit/" in link]
    assert not [link for link in links if "@" in link or "%40" in link or "example.org" in link]
    assert 'value="zq@example.org"' in page  # shown in the form, in the page body only
    older = browser.get(re.findall(r'href="([^"]*before=[^"]*)"', page)[0].replace("&amp;", "&"))
    assert "auth.signin" in older.get_data(as_text=True)
    actor_only = browser.submit("/audit/", {"actor": "sam@example.org"})
    assert f"actor_id={patient_public_id(app, 'sam@example.org')}" in actor_only.location
    assert "message.send" in browser.get(actor_only.location).get_data(as_text=True)


def test_email_in_a_url_is_refused_not_ignored(app: Flask, world: dict[str, Any]) -> None:
    browser = world["browser"]
    before = len(events(app, "audit.search"))
    for url in (
        "/audit/?patient=zq@example.org",
        "/audit/?actor=zq@example.org",
        "/audit/export/csv?patient=zq@example.org",
    ):
        refused = browser.get(url)
        assert refused.status_code == 400, url
        assert "addresses are never accepted in a link" in refused.get_data(as_text=True)
    assert len(events(app, "audit.search")) == before
    assert events(app, "audit.export") == []


def test_keyset_pages(app: Flask, world: dict[str, Any]) -> None:
    with app.app_context():
        for _ in range(60):
            audit.record(db.session, Action.AUTH_SIGNIN, actor=Actor(None, "system"))
        db.session.commit()
    browser = world["browser"]
    first = browser.get("/audit/?action=auth.signin").get_data(as_text=True)
    assert "Older events" in first
    before = first.split("before=")[1].split("&")[0].split('"')[0]
    second = browser.get(f"/audit/?action=auth.signin&before={before}").get_data(as_text=True)
    seqs = lambda page: [int(c.split("</td>")[0]) for c in page.split("<tr>\n        <td>")[1:]]  # noqa: E731
    assert set(seqs(first)).isdisjoint(seqs(second))
    assert max(seqs(second)) < min(seqs(first))


def test_export_needs_reauth_and_is_audited(app: Flask, world: dict[str, Any]) -> None:
    browser = world["browser"]
    travel(timedelta(minutes=6))
    url = f"/audit/export/csv?patient_id={patient_public_id(app)}"
    stale = browser.get(url)
    assert stale.location.startswith("/reauth")
    assert events(app, "audit.export") == []
    assert browser.submit(stale.location, {"code": next_code(world["secret"])}).status_code == 302
    response = browser.get(url)
    assert response.status_code == 200
    assert "attachment" in response.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert {r["action"] for r in rows} >= {"message.send", "message.view"}
    assert {r["patient_name"] for r in rows} == {PATIENT_NAME}
    assert SUBJECT not in response.get_data(as_text=True)
    assert len(events(app, "audit.export")) == 1


@pytest.mark.parametrize("fmt", ["json", "fhir"])
def test_other_export_formats(app: Flask, world: dict[str, Any], fmt: str) -> None:
    body = world["browser"].get(f"/audit/export/{fmt}").get_data(as_text=True)
    if fmt == "json":
        assert all(json.loads(line)["hash"] for line in body.splitlines())
    else:
        bundle = json.loads(body)
        assert bundle["resourceType"] == "Bundle"
        resources = [entry["resource"] for entry in bundle["entry"]]
        assert {r["resourceType"] for r in resources} == {"AuditEvent"}
        patients = [
            e["what"]["reference"]
            for r in resources
            for e in r.get("entity", [])
            if e["what"].get("reference", "").startswith("Patient/")
        ]
        assert patients
    assert SUBJECT not in body


def test_disclosure_report_lists_accesses(app: Flask, world: dict[str, Any]) -> None:
    today = utcnow().date()
    response = world["browser"].submit(
        "/audit/disclosures",
        {
            "patient": "zq@example.org",
            "since": (today - timedelta(days=1)).isoformat(),
            "until": today.isoformat(),
        },
    )
    assert response.mimetype == "application/pdf"
    pdf_text = " ".join(p.extract_text() for p in PdfReader(io.BytesIO(response.data)).pages)
    flat = " ".join(pdf_text.split())
    assert PATIENT_NAME in flat
    assert "viewed in the portal" in flat
    assert "record downloaded" in flat
    assert "Sam Staffer" in flat
    assert "203.0.113.9" in flat
    assert SUBJECT not in flat
    assert len(events(app, "audit.report")) == 1


def test_disclosure_report_bad_input(app: Flask, world: dict[str, Any]) -> None:
    page = world["browser"].submit(
        "/audit/disclosures",
        {"patient": "sam@example.org", "since": "2026-01-02", "until": "2026-01-01"},
    )
    assert "No patient has that email" in page.get_data(as_text=True)
    assert events(app, "audit.report") == []


def test_verify_page_intact_then_broken(app: Flask, world: dict[str, Any], backend: str) -> None:
    page = world["browser"].get("/audit/verify").get_data(as_text=True)
    assert "Intact" in page
    assert "Unanchored:" in page  # issue 10 item 18: a cut end is invisible without a head
    head = page.split('id="head-hash">')[1].split("<")[0]
    pinned = world["browser"].get(f"/audit/verify?head={head}").get_data(as_text=True)
    assert "Intact" in pinned
    assert "Anchored:" in pinned
    with app.app_context():
        if backend == "postgresql":
            db.session.execute(text("SET LOCAL session_replication_role = replica"))
        db.session.execute(text("UPDATE audit_events SET client_ip = '192.0.2.1' WHERE seq = 2"))
        db.session.commit()
    broken = world["browser"].get("/audit/verify").get_data(as_text=True)
    assert "BROKEN at event 2" in broken


def test_verify_from_unknown_head(app: Flask, world: dict[str, Any]) -> None:
    page = world["browser"].get("/audit/verify?head=" + "ab" * 32).get_data(as_text=True)
    assert "BROKEN" in page
    assert "not in the trail" in page


def test_auditor_cannot_reach_content(app: Flask, world: dict[str, Any]) -> None:
    browser = world["browser"]
    assert browser.get(f"/staff/messages/{world['message']}").status_code == 403
    assert browser.get("/staff/").status_code == 403
    with app.app_context():
        message = db.session.scalar(select(Message))
        attachment_free = message.public_id
    for url in (f"/messages/{attachment_free}", f"/messages/{attachment_free}/pdf", "/inbox"):
        assert browser.get(url).status_code in {403, 404}


def test_other_roles_cannot_reach_auditor_pages(app: Flask, world: dict[str, Any]) -> None:
    _, secret, _ = enrolled_user(app, role="staff", email="s2@example.org", name="Sid Second")
    staff = Browser(app)
    staff.sign_in("s2@example.org", PASSWORD, secret)
    for url in ("/audit/", "/audit/verify", "/audit/export/csv", "/audit/disclosures"):
        assert staff.get(url).status_code == 403


@pytest.mark.postgres_only
def test_verify_page_is_intact_while_others_append(app: Flask, world: dict[str, Any]) -> None:
    """Issue 10 item 19: appends during the walk once showed BROKEN and were audited as a
    failed verification; the head is now read first."""
    import threading

    with app.app_context():
        for _ in range(3000):
            audit.record(db.session, Action.AUTH_SIGNIN, actor=Actor(None, "system"))
        db.session.commit()
    stop, errors = threading.Event(), []

    def appender() -> None:
        try:
            with app.app_context():
                while not stop.is_set():
                    audit.record(db.session, Action.AUTH_SIGNIN, actor=Actor(None, "system"))
                    db.session.commit()
        except BaseException as error:
            errors.append(error)

    pool = [threading.Thread(target=appender) for _ in range(3)]
    for thread in pool:
        thread.start()
    try:
        pages = [world["browser"].get("/audit/verify").get_data(as_text=True) for _ in range(6)]
    finally:
        stop.set()
        for thread in pool:
            thread.join()
    assert errors == []
    assert [("Intact" in p, "BROKEN" in p) for p in pages] == [(True, False)] * len(pages)
    assert {e.outcome for e in events(app, "audit.verify")} == {"success"}
