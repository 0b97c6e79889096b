"""Object-level access for staff: only the sender acts on a message, or a colleague who
covers for them with a reason from a fixed list (audited, for the rest of the session)."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from flask import Flask
from sqlalchemy import select
from werkzeug.test import TestResponse

from portal.audit import NO_REQUEST
from portal.database import travel
from portal.extensions import db
from portal.models import AuditEvent, Message, PickupLink, User
from portal.services import accounts, messaging
from portal.services.messages import Upload
from tests.browser_client import Browser, enrolled_user, next_code
from tests.factories import FILENAME, MINIMAL_PDF, PATIENT_NAME, SUBJECT, make_patient

PASSWORD = "Correct horse battery staple 42"
OTHER_EMAIL = "sid@example.org"
# Every per-message staff route except the cover form itself (the way in, tested below).
MESSAGE_ROUTES = [
    ("GET", "/staff/messages/{id}"),
    ("POST", "/staff/messages/{id}/revoke"),
    ("POST", "/staff/messages/{id}/resend"),
]
COVER_ROUTES = {"/staff/messages/<public_id>/cover"}
Colleague = tuple[Browser, int, str]


@pytest.fixture(autouse=True)
def real_clock() -> object:
    yield
    travel(None)


@pytest.fixture
def sam(app: Flask) -> tuple[User, str]:
    """The sender, sam@example.org: (user, TOTP secret)."""
    user, secret, _ = enrolled_user(app)
    return user, secret


@pytest.fixture
def sent(app: Flask, sam: tuple[User, str]) -> str:
    """A message from sam@example.org to the recognisable-PHI patient; its public id."""
    sender, _ = sam
    with app.app_context():
        patient = make_patient(db.session)
        staff = db.session.get(User, sender.id)
        done = messaging.send(
            db.session,
            sender=staff,
            recipient=patient,
            subject=SUBJECT,
            body="Body",
            uploads=[Upload(FILENAME, io.BytesIO(MINIMAL_PDF))],
            meta=NO_REQUEST,
        )
        db.session.commit()
        return done.message.public_id


@pytest.fixture
def colleague(app: Flask) -> tuple[Browser, int, str]:
    """Another member of staff, signed in; (browser, user id, TOTP secret)."""
    user, secret, _ = enrolled_user(app, email=OTHER_EMAIL, name="Sid Second")
    browser = Browser(app)
    assert browser.sign_in(OTHER_EMAIL, PASSWORD, secret).status_code == 302
    return browser, user.id, secret


def hit(browser: Browser, method: str, url: str) -> TestResponse:
    if method == "GET":
        return browser.get(url)
    return browser.submit(url, form_page="/staff/patients")


def events(app: Flask, action: str) -> list[AuditEvent]:
    with app.app_context():
        return list(
            db.session.scalars(
                select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)
            )
        )


def cover(browser: Browser, public_id: str, reason: str) -> TestResponse:
    url = f"/staff/messages/{public_id}/cover"
    return browser.submit(url, {"reason": reason}, form_page=url)


def test_every_per_message_route_is_in_the_denial_test(app: Flask) -> None:
    rules = {
        r.rule
        for r in app.url_map.iter_rules()
        if r.endpoint.startswith("staff.") and "<public_id>" in r.rule
    }
    assert rules == {u.replace("{id}", "<public_id>") for _, u in MESSAGE_ROUTES} | COVER_ROUTES


@pytest.mark.parametrize(("method", "route"), MESSAGE_ROUTES)
def test_other_staff_get_404_and_the_refusal_is_audited(
    app: Flask, sent: str, colleague: Colleague, method: str, route: str
) -> None:
    browser, other_id, _ = colleague
    response = hit(browser, method, route.format(id=sent))
    assert response.status_code == 404
    page = response.get_data(as_text=True)
    assert SUBJECT not in page
    assert PATIENT_NAME not in page
    assert f"/staff/messages/{sent}/cover" in page  # the way to cover, same as for no message
    denied = events(app, "access.denied")
    assert [(e.actor_id, e.outcome, e.target_id) for e in denied] == [(other_id, "denied", sent)]
    assert '"reason":"not_sender"' in (denied[0].details or "")
    assert not events(app, "message.view")
    assert not events(app, "message.resend")
    with app.app_context():
        assert db.session.scalar(select(Message.revoked_at)) is None
        assert db.session.query(PickupLink).count() == 1


@pytest.mark.parametrize(("method", "route"), MESSAGE_ROUTES)
def test_missing_message_looks_the_same_and_records_nothing(
    app: Flask, sent: str, colleague: Colleague, method: str, route: str
) -> None:
    browser, _, _ = colleague
    missing = "0" * 32
    response = hit(browser, method, route.format(id=missing))
    assert response.status_code == 404
    assert f"/staff/messages/{missing}/cover" in response.get_data(as_text=True)
    assert not events(app, "access.denied")


def test_cover_lets_a_colleague_act_for_the_rest_of_the_session(
    app: Flask, sent: str, colleague: Colleague
) -> None:
    browser, other_id, _ = colleague
    form = browser.get(f"/staff/messages/{sent}/cover")
    assert form.status_code == 200
    assert SUBJECT not in form.get_data(as_text=True)
    assert 'value="sender_absent"' in form.get_data(as_text=True)
    done = cover(browser, sent, "sender_absent")
    assert done.status_code == 302
    assert done.location == f"/staff/messages/{sent}"
    covers = events(app, "message.cover")
    assert [(e.actor_id, e.target_id) for e in covers] == [(other_id, sent)]
    assert '"reason":"sender_absent"' in (covers[0].details or "")
    assert SUBJECT in browser.get(done.location).get_data(as_text=True)
    assert hit(browser, "POST", f"/staff/messages/{sent}/resend").status_code == 302
    assert [e.actor_id for e in events(app, "message.resend")] == [other_id]
    assert hit(browser, "POST", f"/staff/messages/{sent}/revoke").status_code == 302
    assert [e.actor_id for e in events(app, "message.revoke")] == [other_id]


def test_cover_ends_with_the_session(app: Flask, sent: str, colleague: Colleague) -> None:
    browser, _, secret = colleague
    assert cover(browser, sent, "on_call").status_code == 302
    assert browser.get(f"/staff/messages/{sent}").status_code == 200
    assert browser.submit("/signout", form_page="/staff/").status_code == 302
    assert browser.sign_in(OTHER_EMAIL, PASSWORD, code=next_code(secret)).status_code == 302
    assert browser.get(f"/staff/messages/{sent}").status_code == 404
    assert len(events(app, "access.denied")) == 1


def test_cover_survives_for_that_message_only(app: Flask, sent: str, colleague: Colleague) -> None:
    browser, _, _ = colleague
    with app.app_context():
        sender = accounts.find_by_email(db.session, "sam@example.org")
        patient = accounts.find_by_email(db.session, "zq@example.org")
        assert sender is not None
        assert patient is not None
        second = messaging.send(
            db.session,
            sender=sender,
            recipient=patient,
            subject=SUBJECT,
            body="Body",
            meta=NO_REQUEST,
        ).message.public_id
        db.session.commit()
    cover(browser, sent, "patient_request")
    assert browser.get(f"/staff/messages/{sent}").status_code == 200
    assert browser.get(f"/staff/messages/{second}").status_code == 404


def test_covering_colleague_still_reauthenticates_to_revoke(
    app: Flask, sent: str, colleague: Colleague
) -> None:
    browser, _, _ = colleague
    cover(browser, sent, "sender_request")
    travel(timedelta(minutes=6))
    stale = hit(browser, "POST", f"/staff/messages/{sent}/revoke")
    assert stale.status_code == 302
    assert stale.location.startswith("/reauth")
    assert not events(app, "message.revoke")


@pytest.mark.parametrize(
    "reason",
    [
        "",
        "Zebulon Quagmire-Phiseed asked me",
        "sender_absent ",
        "SENDER_ABSENT",
        "other",
    ],
)
def test_cover_takes_only_a_reason_from_the_list(
    app: Flask, sent: str, colleague: Colleague, reason: str
) -> None:
    browser, _, _ = colleague
    response = cover(browser, sent, reason)
    assert response.status_code == 400
    assert "Traceback" not in response.get_data(as_text=True)
    assert not events(app, "message.cover")
    assert browser.get(f"/staff/messages/{sent}").status_code == 404


def test_cover_needs_csrf(app: Flask, sent: str, colleague: Colleague) -> None:
    browser, _, _ = colleague
    response = browser.client.post(
        f"/staff/messages/{sent}/cover", data={"reason": "sender_absent"}
    )
    assert response.status_code == 400
    assert not events(app, "message.cover")
    assert browser.get(f"/staff/messages/{sent}").status_code == 404


@pytest.mark.parametrize("public_id", ["0" * 32, "not-an-id", "x" * 33])
def test_cover_for_no_message_is_404(
    app: Flask, sent: str, colleague: Colleague, public_id: str
) -> None:
    browser, _, _ = colleague
    response = browser.submit(
        f"/staff/messages/{public_id}/cover", {"reason": "on_call"}, form_page="/staff/patients"
    )
    assert response.status_code == 404
    assert not events(app, "message.cover")


def test_sender_sees_the_cover_in_the_history(
    app: Flask, sam: tuple[User, str], sent: str, colleague: Colleague
) -> None:
    browser, _, _ = colleague
    cover(browser, sent, "sender_absent")
    sender = Browser(app)
    assert sender.sign_in("sam@example.org", PASSWORD, sam[1]).status_code == 302
    page = sender.get(f"/staff/messages/{sent}")
    assert page.status_code == 200
    assert "A colleague covered for the sender" in page.get_data(as_text=True)


def test_patient_cannot_cover(app: Flask, sent: str) -> None:
    _, secret, _ = enrolled_user(app, role="patient", email="p@example.org", name="Pat Ient")
    browser = Browser(app)
    browser.sign_in("p@example.org", PASSWORD, secret)
    assert browser.get(f"/staff/messages/{sent}/cover").status_code == 403
