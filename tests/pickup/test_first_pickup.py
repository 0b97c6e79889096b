"""From the email to the document: first-time (identity, password, app) and returning patients."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select
from werkzeug.test import TestResponse

from portal.extensions import db
from portal.models import PatientProfile, PickupLink, User
from tests.browser_client import Browser, current_code
from tests.factories import BODY, SUBJECT, make_patient
from tests.support.pickup import (
    NEW_PASSWORD,
    PASSWORD,
    STAFF_EMAIL,
    chain_ok,
    enrolled_patient,
    events,
    send,
    signed_in,
)

_SECRET = re.compile(r'id="totp-secret">([A-Z2-7]+)<')
_NEXT = re.compile(r'href="([^"]+)">I have saved them')


class Walk:
    """A browser that counts the screens (pages shown) a person goes through."""

    def __init__(self, app: Flask) -> None:
        self.browser = Browser(app)
        self.screens: list[str] = []
        self.locations: list[str] = []

    def follow(self, response: TestResponse) -> TestResponse:
        while response.status_code in (302, 303):
            self.locations.append(response.location)
            response = self.browser.get(response.location)
        return response

    def open(self, url: str) -> TestResponse:
        response = self.follow(self.browser.get(url))
        self.screens.append(url)
        return response

    def submit(self, url: str, data: dict[str, str] | None = None) -> TestResponse:
        """Fill the form on the current screen (``url``) and land on the next screen."""
        fields = {"csrf_token": self.browser.token(url), **(data or {})}
        response = self.follow(self.browser.client.post(url, data=fields))
        self.screens.append(self.locations[-1] if self.locations else url)
        return response


def first_pickup(app: Flask, path: str, answer: str) -> tuple[Walk, TestResponse]:
    """Walk a first-time patient from the link to the page after enrolment."""
    walk = Walk(app)
    assert walk.open(path).status_code == 200
    verify = walk.submit(path)
    assert "Confirm it is you" in verify.get_data(as_text=True)
    chosen = walk.submit("/pickup/verify", {"answer": answer})
    assert "Choose your password" in chosen.get_data(as_text=True), chosen.status_code
    enrol = walk.submit("/pickup/password", {"password": NEW_PASSWORD, "confirm": NEW_PASSWORD})
    found = _SECRET.search(enrol.get_data(as_text=True))
    assert found, enrol.get_data(as_text=True)[:500]
    codes = walk.submit("/mfa/enrol", {"code": current_code(found.group(1))})
    return walk, codes


def finish(walk: Walk, codes: TestResponse) -> TestResponse:
    """Leave the recovery-codes screen; land wherever it leads (the message, ideally)."""
    target = _NEXT.search(codes.get_data(as_text=True))
    assert target, codes.get_data(as_text=True)[:500]
    return walk.open(target.group(1).replace("&amp;", "&"))


@pytest.mark.parametrize("typed", ["1961-07-23", "23/07/1961"])
def test_first_time_patient_with_date_of_birth(
    app: Flask, staff: Any, patient: User, typed: str, capfd: pytest.CaptureFixture[str]
) -> None:
    sent = send(app)
    walk, codes = first_pickup(app, sent.path, typed)
    assert "Your recovery codes" in codes.get_data(as_text=True)
    page = finish(walk, codes)
    if "/messages/" not in walk.screens[-1]:  # landed on the inbox: one more click
        assert "Your messages" in page.get_data(as_text=True)
        page = walk.open(f"/messages/{sent.public_id}")
    assert page.status_code == 200
    assert BODY in page.get_data(as_text=True)
    assert all(sent.token not in loc for loc in walk.locations + walk.screens[1:])
    with app.app_context():
        user = db.session.get(User, patient.id)
        profile = db.session.get(PatientProfile, patient.id)
        assert user
        assert user.password_hash
        assert user.totp_enabled_at
        assert profile
        assert profile.verified_at
    verified = events(app, "auth.identity.verify")
    assert [(e.outcome, json.loads(e.details)["method"]) for e in verified] == [("success", "dob")]
    assert events(app, "message.view")
    logged = capfd.readouterr().err
    assert '"rule": "/pickup/verify"' in logged
    assert sent.token not in logged
    assert not [phi for phi in ("1961", "Quagmire", "Xylophonoma") if phi in logged]
    assert chain_ok(app)
    assert len(walk.screens) <= 6, walk.screens


def test_first_time_patient_with_access_code(app: Flask, staff: Any) -> None:
    with app.app_context():
        from portal.audit import NO_REQUEST, SYSTEM
        from portal.services import accounts

        made = accounts.create_user(
            db.session,
            role="patient",
            email="ac@example.org",
            name="Ada Codeholder",
            actor=SYSTEM,
            meta=NO_REQUEST,
            issue_access_code=True,
        )
        db.session.commit()
    assert made.access_code
    sent = send(app, to="ac@example.org")
    walk = Walk(app)
    walk.open(sent.path)
    verify = walk.submit(sent.path)
    assert "Access code" in verify.get_data(as_text=True)
    wrong = walk.submit("/pickup/verify", {"answer": "AAAA-BBBB-CCCC"})
    assert "4 tries left" in wrong.get_data(as_text=True)
    typed = made.access_code.lower().replace("-", " ")  # as people type it
    chosen = walk.submit("/pickup/verify", {"answer": typed})
    assert "Choose your password" in chosen.get_data(as_text=True)


def test_five_wrong_answers_lock_the_link(app: Flask, staff: Any, patient: User) -> None:
    sent = send(app)
    browser = Browser(app)
    browser.submit(sent.path)
    statuses = [
        browser.submit("/pickup/verify", {"answer": f"0{day}/01/1970"}).status_code
        for day in range(1, 6)
    ]
    assert statuses == [401, 401, 401, 401, 403]
    page = browser.get("/pickup/verify")
    assert page.status_code == 403
    assert "locked" in page.get_data(as_text=True)
    right = browser.client.post(
        "/pickup/verify", data={"csrf_token": browser.token(sent.path), "answer": "1961-07-23"}
    )
    assert right.status_code == 403
    with app.app_context():
        link = db.session.scalar(select(PickupLink))
        assert link
        assert link.locked_at is not None
        assert link.verify_failures == 5
    outcomes = [e.outcome for e in events(app, "auth.identity.verify")]
    assert outcomes == ["failure"] * 5
    staff_view = signed_in(app, STAFF_EMAIL, staff[1]).get(f"/staff/messages/{sent.public_id}")
    assert "Link locked" in staff_view.get_data(as_text=True)


def test_password_step_needs_the_identity_check(app: Flask, staff: Any, patient: User) -> None:
    sent = send(app)
    browser = Browser(app)
    browser.submit(sent.path)
    skipped = browser.get("/pickup/password")
    assert skipped.status_code == 302
    assert skipped.location == "/pickup/verify"
    assert browser.get("/pickup/verify").status_code == 200


def test_weak_password_is_refused(app: Flask, staff: Any, patient: User) -> None:
    sent = send(app)
    browser = Browser(app)
    browser.submit(sent.path)
    browser.submit("/pickup/verify", {"answer": "1961-07-23"})
    weak = browser.submit("/pickup/password", {"password": "password", "confirm": "password"})
    assert weak.status_code == 200
    assert 'class="error"' in weak.get_data(as_text=True)
    with app.app_context():
        user = db.session.get(User, patient.id)
        assert user is not None
        assert user.password_hash is None


def test_returning_patient_in_three_screens(app: Flask, staff: Any) -> None:
    _, secret = enrolled_patient(app)
    sent = send(app)
    walk = Walk(app)
    landing = walk.open(sent.path)
    assert 'name="password"' in landing.get_data(as_text=True)  # signs in on the link's page
    code = walk.submit(sent.path, {"password": PASSWORD})
    assert "Enter your code" in code.get_data(as_text=True)
    message = walk.submit("/signin/code", {"code": current_code(secret)})
    assert message.status_code == 200
    assert BODY in message.get_data(as_text=True)
    assert len(walk.screens) == 3, walk.screens
    assert walk.screens[-1] == f"/messages/{sent.public_id}"
    assert all(sent.token not in loc for loc in walk.locations)


def test_wrong_password_on_the_link_page(app: Flask, staff: Any) -> None:
    enrolled_patient(app)
    sent = send(app)
    walk = Walk(app)
    walk.open(sent.path)
    wrong = walk.submit(sent.path, {"password": "not the password 1"})
    assert wrong.status_code == 401
    assert "not right" in wrong.get_data(as_text=True)
    assert SUBJECT not in wrong.get_data(as_text=True)


def test_signed_in_recipient_goes_straight_on(app: Flask, staff: Any) -> None:
    _, secret = enrolled_patient(app)
    sent = send(app)
    browser = signed_in(app, "zq@example.org", secret)
    moved = browser.submit(sent.path)
    assert moved.location == "/pickup"
    assert browser.get("/pickup").location == f"/messages/{sent.public_id}"
    assert browser.get("/inbox").status_code == 200  # still signed in


def test_someone_else_signed_in_gets_404(app: Flask, staff: Any) -> None:
    enrolled_patient(app)
    _, other_secret = enrolled_patient(app, email="other@example.org", name="Olive Other")
    sent = send(app)
    browser = signed_in(app, "other@example.org", other_secret)
    browser.submit(sent.path)
    assert browser.get("/pickup").status_code == 404
    denied = events(app, "access.denied")
    assert len(denied) == 1
    assert denied[0].target_id == sent.public_id


def test_staff_following_a_patient_link_gets_404(app: Flask, staff: Any) -> None:
    with app.app_context():
        make_patient(db.session)
        db.session.commit()
    sent = send(app)
    browser = signed_in(app, STAFF_EMAIL, staff[1])
    browser.submit(sent.path)
    assert browser.get("/pickup").status_code == 404
    assert browser.get(f"/messages/{sent.public_id}").status_code == 404
    denied = events(app, "access.denied")
    assert len(denied) == 2
    assert {e.actor_role for e in denied} == {"staff"}
    assert chain_ok(app)
