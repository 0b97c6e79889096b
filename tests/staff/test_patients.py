"""Staff pages that show PHI write an audit event; patients' addresses never travel in URLs."""

from __future__ import annotations

import re

import pytest
from flask import Flask
from sqlalchemy import select
from werkzeug.test import TestResponse

from portal.audit import NO_REQUEST
from portal.extensions import db
from portal.models import AuditEvent, User
from portal.services import accounts, messaging
from tests.browser_client import Browser, enrolled_user
from tests.factories import PATIENT_NAME, SUBJECT, make_patient

PASSWORD = "Correct horse battery staple 42"
EMAIL = "zq@example.org"
_URLS = re.compile(r'(?:href|action|src)="([^"]*)"')


@pytest.fixture
def browser(app: Flask) -> Browser:
    """Sam, a member of staff, signed in."""
    _, secret, _ = enrolled_user(app)
    signed_in = Browser(app)
    assert signed_in.sign_in("sam@example.org", PASSWORD, secret).status_code == 302
    return signed_in


@pytest.fixture
def patient_id(app: Flask) -> str:
    """The recognisable-PHI patient, registered; their public id."""
    with app.app_context():
        patient = make_patient(db.session, email=EMAIL)
        db.session.commit()
        return patient.public_id


def events(app: Flask, action: str) -> list[AuditEvent]:
    with app.app_context():
        return list(db.session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def urls(response: TestResponse) -> list[str]:
    return [*_URLS.findall(response.get_data(as_text=True)), response.location or ""]


def find(browser: Browser, email: str) -> TestResponse:
    return browser.submit("/staff/patients", {"intent": "find", "email": email})


def test_lookup_is_a_post_audited_and_links_by_public_id(
    app: Flask, browser: Browser, patient_id: str
) -> None:
    response = find(browser, EMAIL)
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert PATIENT_NAME in page
    assert f"/staff/messages/new?to={patient_id}" in page
    assert not [u for u in urls(response) if "zq" in u or "%40" in u or "@" in u]
    looked = events(app, "patient.lookup")
    assert len(looked) == 1
    assert looked[0].patient_id is not None
    assert looked[0].target_id == patient_id
    assert looked[0].details == '{"found":true}'


def test_lookup_form_posts_with_csrf(browser: Browser) -> None:
    page = browser.get("/staff/patients").get_data(as_text=True)
    find_form = page.split("<form", 2)[1]
    assert 'method="post"' in find_form
    assert 'name="csrf_token"' in find_form
    assert 'method="get"' not in page


def test_old_get_search_shows_no_patient(app: Flask, browser: Browser, patient_id: str) -> None:
    response = browser.get(f"/staff/patients?email={EMAIL}")
    assert response.status_code == 200
    assert PATIENT_NAME not in response.get_data(as_text=True)
    assert patient_id not in response.get_data(as_text=True)
    assert not events(app, "patient.lookup")


def test_lookup_without_csrf_is_refused(app: Flask, browser: Browser, patient_id: str) -> None:
    response = browser.client.post("/staff/patients", data={"intent": "find", "email": EMAIL})
    assert response.status_code == 400
    assert PATIENT_NAME not in response.get_data(as_text=True)
    assert not events(app, "patient.lookup")


def test_lookup_miss_is_audited_without_the_address(app: Flask, browser: Browser) -> None:
    response = find(browser, "nobody-known@example.org")
    assert response.status_code == 200
    assert "Register them below" in response.get_data(as_text=True)
    looked = events(app, "patient.lookup")
    assert [(e.patient_id, e.target_id, e.details) for e in looked] == [
        (None, None, '{"found":false}')
    ]
    with app.app_context():
        assert not db.session.scalars(
            select(AuditEvent).where(AuditEvent.details.contains("nobody-known"))
        ).first()


@pytest.mark.parametrize("email", ["", "   ", "a" * 250 + "@example.org"])
def test_lookup_bad_input_is_an_error_not_a_search(
    app: Flask, browser: Browser, patient_id: str, email: str
) -> None:
    response = find(browser, email)
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert 'class="error"' in page
    assert PATIENT_NAME not in page
    assert not events(app, "patient.lookup")
    with app.app_context():
        assert db.session.query(User).filter_by(role="patient").count() == 1


def test_staff_user_is_not_found_as_a_patient(app: Flask, browser: Browser) -> None:
    page = find(browser, "sam@example.org").get_data(as_text=True)
    assert "Sam Staffer" not in page.split("Register a patient")[0].split("Find a patient")[1]
    assert events(app, "patient.lookup")[0].details == '{"found":false}'


def test_register_leaves_the_address_out_of_every_url(app: Flask, browser: Browser) -> None:
    done = browser.submit(
        "/staff/patients", {"email": EMAIL, "name": PATIENT_NAME, "dob": "1961-07-23"}
    )
    assert done.status_code == 200
    with app.app_context():
        public_id = db.session.scalar(select(User.public_id).where(User.email == EMAIL))
    assert f"/staff/messages/new?to={public_id}" in done.get_data(as_text=True)
    assert not [u for u in urls(done) if "zq" in u or "@" in u or "%40" in u]
    compose = browser.get(f"/staff/messages/new?to={public_id}")
    assert compose.status_code == 200
    assert not [u for u in urls(compose) if "zq" in u or "@" in u or "%40" in u]


def test_compose_page_is_audited(app: Flask, browser: Browser, patient_id: str) -> None:
    response = browser.get(f"/staff/messages/new?to={patient_id}")
    assert PATIENT_NAME in response.get_data(as_text=True)
    viewed = events(app, "patient.view")
    assert [(e.target_id, e.details) for e in viewed] == [(patient_id, '{"page":"staff_compose"}')]
    assert viewed[0].patient_id is not None


def test_compose_page_redisplayed_after_bad_input_is_audited(
    app: Flask, browser: Browser, patient_id: str
) -> None:
    url = f"/staff/messages/new?to={patient_id}"
    response = browser.submit(url, {"subject": "", "body": "", "expires_days": "7"})
    assert response.status_code == 200
    assert "Enter a subject." in response.get_data(as_text=True)
    assert len(events(app, "patient.view")) == 2  # the form, then the form with its errors
    assert not events(app, "message.send")


@pytest.mark.parametrize("to", ["", "0" * 32, "not-a-patient"])
def test_compose_for_no_patient_is_404_and_shows_nothing(
    app: Flask, browser: Browser, patient_id: str, to: str
) -> None:
    response = browser.get(f"/staff/messages/new?to={to}")
    assert response.status_code == 404
    assert not events(app, "patient.view")


def test_staff_home_listing_is_audited(app: Flask, browser: Browser, patient_id: str) -> None:
    with app.app_context():
        sender = accounts.find_by_email(db.session, "sam@example.org")
        patient = accounts.find_by_email(db.session, EMAIL)
        assert sender is not None
        assert patient is not None
        messaging.send(
            db.session,
            sender=sender,
            recipient=patient,
            subject=SUBJECT,
            body="Body",
            meta=NO_REQUEST,
        )
        db.session.commit()
        sender_id = sender.id
    page = browser.get("/staff/").get_data(as_text=True)
    assert SUBJECT in page
    listed = events(app, "message.list")
    assert [(e.actor_id, e.details) for e in listed] == [
        (sender_id, '{"count":1,"page":"staff_index"}')
    ]


def test_patient_history_names_the_lookup_in_words(app: Flask, browser: Browser) -> None:
    _, secret, _ = enrolled_user(app, role="patient", email="pat@example.org", name="Pat Ient")
    find(browser, "pat@example.org")
    patient = Browser(app)
    assert patient.sign_in("pat@example.org", PASSWORD, secret).status_code == 302
    page = patient.get("/history").get_data(as_text=True)
    assert "Looked you up by email address" in page
    assert "patient.lookup" not in page
