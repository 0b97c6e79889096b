"""Rendering notices from templates/email, and the PHI guard's terms and matching."""

from __future__ import annotations

import email.headerregistry
import email.policy
import inspect
import re
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from flask import Flask

from notifier import phi, render
from notifier.smtp import make_message_id
from portal.audit import NO_REQUEST, SYSTEM
from portal.extensions import db
from portal.models import Attachment, Message, Notification
from portal.models.notifications import NoticeKind
from portal.models.types import new_public_id
from portal.services import accounts, keys, notices

URL = "https://portal.example.org/p/Zq3x-Ab_9kLmNoPqRsTuVwXyZ0123456789abcdefgH"
EXPIRES = datetime(2031, 6, 7, 12, 0, tzinfo=UTC)
ORG = {
    "org_name": "Riverside Family Practice",
    "org_address": "4 Mill Lane, Riverside",
    "support_contact": "reception on 01234 567890",
}
ALLOWED_CONTEXT = {
    "url",
    "org_name",
    "org_address",
    "support_contact",
    "expires_on",
    "valid_hours",
    "valid_minutes",
}


def notice(kind: str) -> Notification:
    """An unsaved notice of ``kind`` with a public id."""
    return Notification(kind=kind, public_id="0123456789abcdef0123456789abcdef")


def rendered(kind: str, **overrides: Any) -> Any:
    """``kind`` rendered with the demo organisation."""
    values: dict[str, Any] = {
        **ORG,
        "url": URL,
        "expires_at": EXPIRES,
        "mail_from": "no-reply@portal.example.org",
        "to_address": "pat@patients.example.org",
        "message_id_domain": "portal.example.org",
        **overrides,
    }
    return render.render(notice(kind), **values)


@pytest.mark.parametrize("kind", list(NoticeKind))
def test_every_kind_renders_text_and_html_with_the_link(kind: str) -> None:
    msg = rendered(kind)

    assert msg.get_content_type() == "multipart/alternative"
    plain, html = msg.get_body(("plain",)), msg.get_body(("html",))
    assert URL in plain.get_content()
    assert f'href="{URL}"' in html.get_content()
    assert "Riverside Family Practice" in msg["Subject"]
    assert "\n" not in msg["Subject"]
    assert msg["Message-ID"] == make_message_id(
        "0123456789abcdef0123456789abcdef", "portal.example.org"
    )
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["From"] == "Riverside Family Practice <no-reply@portal.example.org>"
    assert msg["To"] == "pat@patients.example.org"
    assert msg["Date"]


def test_pickup_says_until_when_the_link_works() -> None:
    msg = rendered("pickup")

    assert "7 June 2031" in msg.get_body(("plain",)).get_content()
    assert msg["Subject"] == "You have a secure message from Riverside Family Practice"


def test_reminder_and_invite_say_what_they_are() -> None:
    assert rendered("reminder")["Subject"].startswith("Reminder:")
    assert "72 hours" in rendered("invite").get_body(("plain",)).get_content()


def test_html_escapes_the_organisation() -> None:
    msg = rendered("pickup", org_name="Smith & <Jones>")

    html = msg.get_body(("html",)).get_content()
    assert "Smith &amp; &lt;Jones&gt;" in html
    assert "<Jones>" not in html
    assert "Smith & <Jones>" in msg.get_body(("plain",)).get_content()


@pytest.mark.parametrize("kind", list(NoticeKind))
def test_context_functions_take_and_return_only_non_phi_fields(kind: str) -> None:
    function = render.CONTEXTS[kind]
    parameters = set(inspect.signature(function).parameters)
    context = function(url=URL, expires_at=EXPIRES, **ORG)

    assert parameters == {"url", "org_name", "org_address", "support_contact", "expires_at"}
    assert set(context) <= ALLOWED_CONTEXT


def test_stated_link_lifetimes_match_the_account_links_service() -> None:
    from portal.services.account_links import INVITE_TTL, RESET_TTL

    assert timedelta(hours=render.INVITE_VALID_HOURS) == INVITE_TTL
    assert timedelta(minutes=render.RESET_VALID_MINUTES) == RESET_TTL
    assert "60 minutes" in rendered("reset").get_body(("plain",)).get_content()


def test_message_id_is_stable_per_notice() -> None:
    assert rendered("pickup")["Message-ID"] == rendered("pickup")["Message-ID"]


# -- the PHI guard ------------------------------------------------------------------------


def test_find_phi_matches_whole_words_case_insensitively() -> None:
    terms = {"Quenby", "Philippa Quenby", "07/03/1984"}

    assert phi.find_phi(["Dear PHILIPPA   quenby,"], terms)
    assert phi.find_phi(["born 07/03/1984."], terms)
    assert phi.find_phi(["<p>Ms&nbsp;Quenby</p>"], terms)
    assert not phi.find_phi(["Quenbyshire is a place"], terms)
    assert not phi.find_phi(["107/03/19845"], terms)
    assert not phi.find_phi(["nothing here"], set())


def test_find_phi_decodes_html_entities() -> None:
    assert phi.find_phi(["<p>O&#39;Brien</p>"], {"O'Brien"})


def test_dob_terms_cover_common_formats() -> None:
    terms = phi.dob_terms("1984-03-07")

    assert {"1984-03-07", "07/03/1984", "03/07/1984", "7 March 1984", "March 7, 1984"} <= terms


def test_name_terms_keep_short_parts_only_in_the_whole_name() -> None:
    assert phi.name_terms("Jo Li Wainwright") == {"Jo Li Wainwright", "Wainwright"}


def test_subject_and_body_terms_skip_stopwords_and_short_words() -> None:
    assert phi.subject_terms("Your scan from today") == {"Your scan from today", "scan"}
    assert phi.body_terms("Please could you bring these inhalers tomorrow") == {"bring", "inhalers"}


@pytest.fixture
def session(app: Flask) -> Iterator[Any]:
    """The app's session, inside an app context."""
    with app.app_context():
        yield db.session


def _message(
    session: Any, sender: Any, recipient: Any, subject: str, body: str, filename: str | None = None
) -> Message:
    key_row, key = keys.create(session, "message")
    pid = new_public_id()
    message = Message(
        public_id=pid,
        sender_id=sender.id,
        recipient_id=recipient.id,
        data_key_id=key_row.id,
        expires_at=datetime.now(UTC) + timedelta(days=7),
        subject_sealed=keys.seal_text(key, "messages", "subject", pid, subject),
        body_sealed=keys.seal_text(key, "messages", "body", pid, body),
    )
    session.add(message)
    session.flush()
    if filename:
        apid = new_public_id()
        session.add(
            Attachment(
                public_id=apid,
                message_id=message.id,
                blob_id=apid,
                filename_sealed=keys.seal_text(key, "attachments", "filename", apid, filename),
                size=1,
                sha256="0" * 64,
            )
        )
        session.flush()
    return message


def _people(session: Any) -> tuple[Any, Any]:
    staff = accounts.create_user(
        session,
        role="staff",
        email="dr@clinic.example.org",
        name="Gregory Marwick",
        actor=SYSTEM,
        meta=NO_REQUEST,
    ).user
    patient = accounts.create_user(
        session,
        role="patient",
        email="pq@patients.example.org",
        name="Philippa Quenby",
        dob=date(1984, 3, 7),
        actor=SYSTEM,
        meta=NO_REQUEST,
    ).user
    return staff, patient


def test_phi_terms_of_a_pickup_notice(session: Any) -> None:
    staff, patient = _people(session)
    message = _message(
        session,
        staff,
        patient,
        "Biopsy outcome",
        "Your secure message: thyroid carcinoma confirmed.",
        "quenby-lab.pdf",
    )
    row = notices.enqueue(session, kind="pickup", recipient=patient, url=URL, message=message)

    terms = phi.phi_terms(session, row)

    assert {
        "Philippa Quenby",
        "Philippa",
        "Quenby",
        "1984-03-07",
        "7 March 1984",
        "Biopsy outcome",
        "Biopsy",
        "outcome",
        "thyroid",
        "carcinoma",
        "confirmed",
        "quenby-lab.pdf",
        "quenby-lab",
    } <= terms
    assert not {"secure", "message", "Your secure message"} & terms  # the template says them
    assert "Gregory Marwick" not in terms


def test_phi_terms_of_a_reply_notice_name_the_patient_who_wrote(session: Any) -> None:
    staff, patient = _people(session)
    reply = _message(session, patient, staff, "Re: inhaler dosage", "Thanks, breathing better")
    row = notices.enqueue(session, kind="reply", recipient=staff, url=URL, message=reply)

    terms = phi.phi_terms(session, row)

    assert {
        "Philippa Quenby",
        "Quenby",
        "07/03/1984",
        "inhaler",
        "dosage",
        "breathing",
        "Gregory Marwick",
    } <= terms


def test_a_patient_named_like_the_organisation_does_not_block_notices(
    session: Any, app: Flask
) -> None:
    patient = accounts.create_user(
        session,
        role="patient",
        email="x@patients.example.org",
        name="Demo Clinic",
        issue_access_code=True,
        actor=SYSTEM,
        meta=NO_REQUEST,
    ).user
    row = notices.enqueue(session, kind="pickup", recipient=patient, url=URL)

    terms = phi.phi_terms(session, row)
    msg = rendered("pickup", org_name=app.config["ORG_NAME"])

    assert app.config["ORG_NAME"] == "Pickup Portal Demo Clinic"
    assert terms == set()  # every word of the name is one the notice says anyway
    assert not phi.find_phi(render.readable_texts(msg), terms)


# -- credential-change notices ------------------------------------------------------------

CHANGE_NOTICES = [
    (NoticeKind.MFA_CHANGED, "Your Riverside Family Practice portal sign-in settings changed"),
    (NoticeKind.PASSWORD_CHANGED, "Your Riverside Family Practice portal password changed"),
]


@pytest.mark.parametrize(("kind", "subject"), CHANGE_NOTICES)
def test_change_notices_say_what_changed_and_whom_to_call(kind: str, subject: str) -> None:
    msg = rendered(kind)
    plain = msg.get_body(("plain",)).get_content()

    assert msg["Subject"] == subject
    assert "reception on 01234 567890" in plain
    assert "signed out" in plain
    assert "7 June 2031" not in plain  # no expiry: there is no link to expire


def test_locked_notice_says_whom_to_contact_to_unlock(session: Any) -> None:
    msg = rendered(NoticeKind.ACCOUNT_LOCKED)
    plain = msg.get_body(("plain",)).get_content()
    _, patient = _people(session)
    row = notices.enqueue(session, kind=NoticeKind.ACCOUNT_LOCKED, recipient=patient, url=None)

    assert msg["Subject"] == "Your Riverside Family Practice portal account was locked"
    assert "too many failed sign-in" in plain
    assert "contact reception on 01234 567890" in plain
    assert not phi.find_phi(render.readable_texts(msg), phi.phi_terms(session, row))


@pytest.mark.parametrize(("kind", "subject"), CHANGE_NOTICES)
def test_change_notices_to_a_patient_pass_the_phi_guard(
    session: Any, kind: str, subject: str
) -> None:
    _, patient = _people(session)
    row = notices.enqueue(session, kind=kind, recipient=patient, url=None)
    terms = phi.phi_terms(session, row)
    texts = render.readable_texts(rendered(kind))

    assert {"Philippa Quenby", "1984-03-07"} <= terms
    assert row.payload_sealed is None  # nothing stored: the notice links the portal's front page
    assert not phi.find_phi(texts, terms)
    assert not any("Quenby" in text for text in texts)


# -- the header registry that remembers its classes ----------------------------------------


def test_a_notice_is_byte_for_byte_what_emails_default_policy_builds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    moment = datetime(2031, 6, 1, 9, 30, tzinfo=UTC)
    ours = rendered("pickup", now=moment)
    monkeypatch.setattr(render, "POLICY", email.policy.default)
    standard = rendered("pickup", now=moment)

    def flat(msg: Any) -> bytes:  # the multipart boundary is random: the rest must match
        return re.sub(rb"=+\d+==", b"BOUNDARY", msg.as_bytes(policy=email.policy.SMTP))

    assert flat(ours) == flat(standard)
    assert ours.policy is not email.policy.default


def test_header_classes_are_made_once_per_name() -> None:
    first, second = rendered("pickup"), rendered("reminder")

    assert type(first["Subject"]) is type(second["Subject"])
    assert type(first["To"]) is type(second["To"])
    assert type(first["Subject"]) is not type(first["To"])
    assert isinstance(first["To"], email.headerregistry.AddressHeader)


def test_addresses_and_message_ids_are_never_shared_between_notices() -> None:
    first = rendered("pickup", to_address="first@patients.example.org")
    second = rendered("pickup", to_address="second@patients.example.org")

    assert first["Subject"] is second["Subject"]  # the same parsed header, shared
    assert first["To"] is not second["To"]
    assert first["Message-ID"] is not second["Message-ID"]
    kept = " ".join(f"{name} {value}" for name, value in render._SHARED)
    assert "@patients.example.org" not in kept
    assert "notice-" not in kept


def test_each_notice_has_its_own_boundary_absent_from_its_parts() -> None:
    first, second = rendered("pickup"), rendered("pickup")
    boundary = first.get_boundary()
    assert boundary
    assert boundary != second.get_boundary()
    assert all(boundary not in str(part.get_payload()) for part in first.iter_parts())
    flat = first.as_bytes(policy=email.policy.SMTP)
    assert flat.count(f"--{boundary}".encode()) == 3  # two parts and the closing line
    again = email.message_from_bytes(flat, policy=email.policy.default)
    assert [p.get_content().replace("\r\n", "\n") for p in again.iter_parts()] == [
        p.get_content() for p in first.iter_parts()
    ]
