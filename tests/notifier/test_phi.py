"""The PHI guard's per-session memory of people's terms and its two queries per notice: it
still stops every notice that names the patient, and is never stale."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import event

from notifier import phi, render
from portal.crypto.errors import ContentDestroyed
from portal.extensions import db
from portal.models import Notification, User
from portal.services import keys, notices
from tests.factories import FILENAME, PATIENT_NAME, make_message, make_patient, make_user

URL = "https://portal.example.org/p/Zq3x-Ab_9kLmNoPqRsTuVwXyZ0123456789abcdefgH"


@pytest.fixture
def session(app: Flask) -> Iterator[Any]:
    with app.app_context():
        yield db.session


def pickup(session: Any, staff: User, patient: User) -> Notification:
    """A new message to ``patient`` and its queued pickup notice, committed."""
    message = make_message(session, staff, patient)
    row = notices.enqueue(session, kind="pickup", recipient=patient, url=URL, message=message)
    session.commit()
    return row


def email_saying(text: str) -> list[str]:
    """The readable texts of a pickup notice whose body also says ``text``."""
    msg = render.render(
        Notification(kind="pickup", public_id="0123456789abcdef0123456789abcdef"),
        url=URL,
        org_name="Riverside Family Practice",
        org_address="4 Mill Lane, Riverside",
        support_contact="reception",
        expires_at=None,
        mail_from="no-reply@portal.example.org",
        to_address="pat@patients.example.org",
        message_id_domain="portal.example.org",
    )
    return [*render.readable_texts(msg), f"Dear {text},"]


@pytest.fixture
def unwraps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The data key ids keys.unwrap is asked for."""
    asked: list[int] = []
    real = keys.unwrap

    def counting(session: Any, data_key_id: int) -> bytes:
        asked.append(data_key_id)
        return real(session, data_key_id)

    monkeypatch.setattr(keys, "unwrap", counting)
    return asked


def test_the_guard_stops_the_patients_name_on_every_notice_of_a_pass(session: Any) -> None:
    staff, patient = make_user(session), make_patient(session)
    rows = [pickup(session, staff, patient) for _ in range(3)]

    for row in rows:  # the first fills the memory, the others are served from it
        terms = phi.phi_terms(session, row)
        assert phi.find_phi(email_saying(PATIENT_NAME), terms)
        assert phi.find_phi(email_saying("Quagmire"), terms)
        assert phi.find_phi(email_saying("23/07/1961"), terms)
        assert phi.find_phi(email_saying(FILENAME), terms)  # each message's own terms
        assert not phi.find_phi(email_saying("Patient"), terms)


def test_a_person_is_unsealed_once_per_session(session: Any, unwraps: list[int]) -> None:
    staff, patient = make_user(session), make_patient(session)
    rows = [pickup(session, staff, patient) for _ in range(3)]
    messages = [row.message_id for row in rows]
    unwraps.clear()

    for row in rows:
        phi.phi_terms(session, row)

    assert unwraps.count(patient.data_key_id) == 1  # then from the memory, across commits
    assert len(unwraps) == 1 + len(messages)  # and each message's own key once


def test_a_renamed_patient_is_looked_for_by_the_new_name(session: Any) -> None:
    staff, patient = make_user(session), make_patient(session)
    first, second = pickup(session, staff, patient), pickup(session, staff, patient)
    assert not phi.find_phi(email_saying("Ottoline Brackenridge"), phi.phi_terms(session, first))

    key = keys.unwrap(session, patient.data_key_id)
    patient.name_sealed = keys.seal_text(
        key, "users", "name", patient.public_id, "Ottoline Brackenridge"
    )
    session.commit()

    terms = phi.phi_terms(session, second)
    assert phi.find_phi(email_saying("Ottoline Brackenridge"), terms)
    assert phi.find_phi(email_saying("Brackenridge"), terms)


def test_a_shredded_key_is_not_served_from_the_memory(session: Any) -> None:
    staff, patient = make_user(session), make_patient(session)
    first, second = pickup(session, staff, patient), pickup(session, staff, patient)
    phi.phi_terms(session, first)

    keys.destroy(session, patient.data_key_id)
    session.commit()

    with pytest.raises(ContentDestroyed):
        phi.phi_terms(session, second)


def test_the_memory_is_bounded(session: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(phi, "PERSON_MEMO_SIZE", 2)
    staff = make_user(session)
    people = [make_patient(session, email=f"p{i}@example.org") for i in range(4)]
    rows = [pickup(session, staff, person) for person in people]

    for row in rows:
        phi.phi_terms(session, row)

    assert 0 < len(session.info["phi_person_terms"]) <= 2


@pytest.fixture
def statements(app: Flask) -> Iterator[list[str]]:
    """The SQL statements the app's engine runs while the test body does."""
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    engine = app.extensions["engine"]
    event.listen(engine, "before_cursor_execute", before)
    yield seen
    event.remove(engine, "before_cursor_execute", before)


def test_a_notice_costs_two_queries(session: Any, statements: list[str]) -> None:
    staff, patient = make_user(session), make_patient(session)
    rows = [pickup(session, staff, patient) for _ in range(2)]
    phi.phi_terms(session, rows[0])
    statements.clear()

    phi.phi_terms(session, rows[1])

    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 2, selects  # the message with its key and files; the people


def test_a_reply_still_names_the_patient_who_wrote(session: Any) -> None:
    staff, patient = make_user(session), make_patient(session)
    reply = make_message(session, patient, staff, files=[])
    row = notices.enqueue(session, kind="reply", recipient=staff, url=None, message=reply)
    session.commit()

    terms = phi.phi_terms(session, row)

    assert {PATIENT_NAME, "Quagmire", "1961-07-23", "Sam Staffer"} <= terms


@pytest.fixture
def own_templates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Point the guard at a template folder of the test's; returns a writer of its body."""
    folder = tmp_path / "pickup"
    folder.mkdir()
    for name in render.PARTS:
        (folder / name).write_text("Your message\n")
    monkeypatch.setattr(phi, "template_dir", lambda _kind: folder)

    def write_body(text: str) -> None:
        path = folder / "body.txt"
        path.write_text(text)
        stamp = path.stat().st_mtime_ns + 1_000_000_000  # a visibly later version
        os.utime(path, ns=(stamp, stamp))

    return write_body


def test_an_edited_template_changes_the_vocabulary(own_templates: Callable[[str], None]) -> None:
    assert "wardrobe" not in phi.template_vocabulary("pickup")

    own_templates("Please collect your wardrobe\n")

    assert "wardrobe" in phi.template_vocabulary("pickup")


def test_a_prefetched_batch_needs_no_query_and_gives_the_same_terms(
    session: Any, statements: list[str]
) -> None:
    staff, patient = make_user(session), make_patient(session)
    other = make_patient(session, email="other@example.org")
    rows = [pickup(session, staff, patient), pickup(session, staff, other)]
    reply = make_message(session, patient, staff, files=[])
    rows.append(notices.enqueue(session, kind="reply", recipient=staff, url=None, message=reply))
    session.commit()
    expected = [phi.phi_terms(session, row) for row in rows]
    session.commit()

    phi.prefetch(session, rows)
    statements.clear()
    found = [phi.phi_terms(session, row) for row in rows]

    assert found == expected
    assert [s for s in statements if s.lstrip().upper().startswith("SELECT")] == []


def test_prefetched_reads_last_one_transaction(session: Any) -> None:
    staff, patient = make_user(session), make_patient(session)
    row = pickup(session, staff, patient)
    phi.prefetch(session, [row])
    key = keys.unwrap(session, patient.data_key_id)
    patient.name_sealed = keys.seal_text(
        key, "users", "name", patient.public_id, "Ottoline Brackenridge"
    )
    session.commit()  # the prefetched (old) name goes with the transaction

    assert phi.find_phi(email_saying("Brackenridge"), phi.phi_terms(session, row))
