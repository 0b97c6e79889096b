"""The auditor's queries: filters, keyset pagination, names, search auditing, verify from a head."""

from __future__ import annotations

import json
import time
from datetime import UTC, date, datetime
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from portal import audit
from portal.audit import Action, Actor, Outcome, RequestMeta
from portal.database import utcnow
from portal.extensions import db
from portal.models import AuditEvent, AuditHead, User
from portal.services import audit_query, keys
from portal.services.audit_query import AuditFilter
from portal.services.errors import ServiceError
from tests.factories import PATIENT_NAME, make_message, make_patient, make_user


def actor_of(user: User) -> Actor:
    return Actor(user.id, user.role)


def head_seq(session: Session) -> int:
    return int(session.scalar(select(AuditHead.seq)) or 0)


def event(
    session: Session,
    action: Action = Action.MESSAGE_VIEW,
    *,
    actor: User | None = None,
    ip: str | None = None,
    ua: str | None = None,
    **kwargs: Any,
) -> int:
    """Record one event and return its seq."""
    meta = RequestMeta(client_ip=ip, user_agent=ua, request_id="req-1")
    return audit.record(
        session, action, actor=actor_of(actor) if actor else audit.SYSTEM, meta=meta, **kwargs
    ).seq


def seqs(session: Session, flt: AuditFilter) -> set[int]:
    page = audit_query.search(session, flt, limit=audit_query.MAX_LIMIT)
    assert page.total == len(page.rows) == audit_query.count(session, flt)
    return {row.seq for row in page.rows}


def pause() -> datetime:
    """Return a moment strictly between the events before and after it."""
    time.sleep(0.01)
    moment = utcnow()
    time.sleep(0.01)
    return moment


def test_each_filter_alone_and_combined(app: Flask) -> None:
    with app.app_context():
        s = db.session
        staff = make_user(s, "staff", "staff@example.org", "Sam Staffer")
        p1 = make_patient(s, "p1@example.org")
        p1_created = head_seq(s)
        p2 = make_user(s, "patient", "p2@example.org", "Other Patient", dob=date(1970, 1, 1))
        p2_created = head_seq(s)
        t0 = pause()
        e1 = event(s, actor=staff, patient_id=p1.id, message_id=11, ip="192.0.2.1")
        e2 = event(s, actor=p1, patient_id=p1.id, message_id=12, ip="192.0.2.2")
        e3 = event(s, Action.AUTH_SIGNIN_FAILED, outcome=Outcome.FAILURE, ip="198.51.100.7")
        t1 = pause()
        e4 = event(s, Action.AUTH_SIGNIN, actor=staff, ip="192.0.2.1")
        e5 = event(
            s,
            Action.ACCESS_DENIED,
            actor=p2,
            patient_id=p1.id,
            message_id=11,
            outcome=Outcome.DENIED,
            ip="2001:db8::1",
        )
        e6 = event(s, Action.MESSAGE_SEND, actor=staff, patient_id=p2.id, message_id=13)
        t2 = pause()
        s.commit()
        cases: list[tuple[AuditFilter, set[int]]] = [
            (AuditFilter(), set(range(1, e6 + 1))),
            (AuditFilter(patient_id=p1.id), {p1_created, e1, e2, e5}),
            (AuditFilter(actor_id=staff.id), {e1, e4, e6}),
            (AuditFilter(action="message.view"), {e1, e2}),
            (AuditFilter(action="auth."), {e3, e4}),
            (AuditFilter(outcome="failure"), {e3}),
            (AuditFilter(outcome="denied"), {e5}),
            (AuditFilter(message_id=11), {e1, e5}),
            (AuditFilter(client_ip="192.0.2.1"), {e1, e4}),
            (AuditFilter(client_ip="2001:db8::1"), {e5}),
            (AuditFilter(since=t1), {e4, e5, e6}),
            (AuditFilter(until=t0), set(range(1, p2_created + 1))),
            (AuditFilter(since=t0, until=t1), {e1, e2, e3}),
            (AuditFilter(since=t2), set()),
            (AuditFilter(patient_id=p1.id, since=t1), {e5}),
            (AuditFilter(patient_id=p1.id, action="message.view", actor_id=p1.id), {e2}),
            (AuditFilter(actor_id=staff.id, client_ip="192.0.2.1", action="auth."), {e4}),
            (AuditFilter(message_id=11, outcome="success"), {e1}),
            (AuditFilter(patient_id=p2.id), {p2_created, e6}),
        ]
        for flt, expected in cases:
            assert seqs(s, flt) == expected, flt


def test_action_prefix_is_not_a_wildcard(app: Flask) -> None:
    with app.app_context():
        event(db.session, Action.AUTH_SIGNIN)
        event(db.session, Action.AUTH_SIGNIN_FAILED)
        assert seqs(db.session, AuditFilter(action="auth.signin")) == {1}
        assert seqs(db.session, AuditFilter(action="auth.signin.")) == {2}


def test_rows_carry_names_and_public_ids(app: Flask) -> None:
    with app.app_context():
        s = db.session
        staff = make_user(s, "staff", "staff@example.org", "Sam Staffer")
        patient = make_patient(s)
        message = make_message(s, staff, patient)
        gone = make_user(s, "staff", "gone@example.org", "Gone Person")
        event(
            s,
            actor=staff,
            patient_id=patient.id,
            message_id=message.id,
            target_type="message",
            target_id=message.public_id,
            ua="Firefox",
            details={"bytes": 5},
        )
        event(s, Action.NOTICE_SENT)
        event(s, actor=gone)
        event(s, Action.MESSAGE_VIEW, patient_id=999_999)
        keys.destroy(s, gone.data_key_id)
        s.commit()
        rows = {row.seq: row for row in audit_query.search(s, AuditFilter()).rows}
        newest = max(rows)
        view = rows[newest - 3]
        assert (view.actor_name, view.actor_role) == ("Sam Staffer", "staff")
        assert (view.patient_name, view.patient_public_id) == (PATIENT_NAME, patient.public_id)
        assert view.message_public_id == message.public_id
        assert view.details == {"bytes": 5}
        assert (view.user_agent, view.request_id) == ("Firefox", "req-1")
        assert view.occurred_at.tzinfo is not None
        assert rows[newest - 2].actor_name == "system"
        assert rows[newest - 2].patient_name is None
        assert rows[newest - 1].actor_name == "(unavailable)"
        assert rows[newest].patient_name == "(unknown)"


def test_keyset_pages_cover_every_event_once_newest_first(app: Flask) -> None:
    with app.app_context():
        for i in range(23):
            event(db.session, target_id=f"t{i}")
        db.session.commit()
        seen: list[int] = []
        before: int | None = None
        while True:
            page = audit_query.search(db.session, AuditFilter(), before_seq=before, limit=5)
            assert page.total == 23
            seen += [row.seq for row in page.rows]
            if page.next_before is None:
                break
            before = page.next_before
        assert seen == list(range(23, 0, -1))


def test_pages_stay_stable_while_events_are_appended(app: Flask) -> None:
    with app.app_context():
        for _ in range(12):
            event(db.session, patient_id=3)
        db.session.commit()
        flt = AuditFilter(patient_id=3)
        first = audit_query.search(db.session, flt, limit=5)
        for _ in range(5):
            event(db.session, patient_id=3)
        db.session.commit()
        seen = [row.seq for row in first.rows]
        before = first.next_before
        while before is not None:
            page = audit_query.search(db.session, flt, before_seq=before, limit=5)
            seen += [row.seq for row in page.rows]
            before = page.next_before
        assert seen == list(range(12, 0, -1))
        assert audit_query.search(db.session, flt, limit=5).rows[0].seq == 17


def test_page_limit_is_bounded(app: Flask) -> None:
    with app.app_context():
        for limit in (0, audit_query.MAX_LIMIT + 1):
            with pytest.raises(ServiceError):
                audit_query.search(db.session, AuditFilter(), limit=limit)


def test_from_args_parses_form_strings() -> None:
    flt = audit_query.from_args(
        patient_id="3",
        actor_id="",
        action="auth.",
        outcome="Denied",
        message_id=None,
        client_ip=" 192.0.2.1 ",
        since="2026-01-01",
        until="2026-02-01T12:30:00+01:00",
    )
    assert flt == AuditFilter(
        patient_id=3,
        action="auth.",
        outcome="denied",
        client_ip="192.0.2.1",
        since=datetime(2026, 1, 1, tzinfo=UTC),
        until=datetime(2026, 2, 1, 11, 30, tzinfo=UTC),
    )
    assert flt.to_details() == {
        "patient_id": 3,
        "action": "auth.",
        "outcome": "denied",
        "client_ip": "192.0.2.1",
        "since": "2026-01-01",
        "until": "2026-02-01T11:30:00Z",
    }
    assert AuditFilter().to_details() == {}


def test_from_args_lists_every_problem() -> None:
    with pytest.raises(ServiceError) as caught:
        audit_query.from_args(
            patient_id="x",
            action="drop table",
            outcome="maybe",
            client_ip="999.1.1.1",
            since="yesterday",
        )
    assert len(caught.value.messages) == 5
    with pytest.raises(ServiceError, match="later"):
        audit_query.from_args(since="2026-02-01", until="2026-01-01")
    with pytest.raises(ServiceError):
        audit_query.from_args(action="nothing.")


def test_record_search_writes_filters_not_results(app: Flask) -> None:
    with app.app_context():
        flt = AuditFilter(
            patient_id=3, action="message.view", since=datetime(2026, 1, 1, tzinfo=UTC)
        )
        auditor = Actor(9, "auditor")
        meta = RequestMeta(client_ip="192.0.2.9")
        audit_query.record_search(db.session, flt, auditor, meta)
        db.session.commit()
        row = audit_query.search(db.session, AuditFilter(action="audit.search")).rows[0]
        assert (row.actor_id, row.patient_id, row.client_ip) == (9, 3, "192.0.2.9")
        assert row.details == {"patient_id": 3, "action": "message.view", "since": "2026-01-01"}


def rewrite_history(session: Session, backend: str, seq: int) -> None:
    """Edit event ``seq`` and re-chain every later event, as an attacker with owner rights would."""
    rows = session.execute(select(*audit.VERIFY_COLUMNS).order_by(AuditEvent.seq)).all()
    if backend == "postgresql":
        session.execute(text("SET LOCAL session_replication_role = replica"))
    prev = rows[seq - 2][-1] if seq > 1 else audit.GENESIS_HASH
    for row in rows[seq - 1 :]:
        fields = list(row[:-1])
        if fields[0] == seq:
            fields[10] = "203.0.113.66"  # client_ip
        fields[-1] = prev
        prev = audit._hash_fields(*fields)
        session.execute(
            text(
                "UPDATE audit_events SET client_ip = :ip, prev_hash = :p, hash = :h WHERE seq = :s"
            ),
            {"ip": fields[10], "p": fields[-1], "h": prev, "s": fields[0]},
        )
    session.execute(text("UPDATE audit_head SET hash = :h"), {"h": prev})
    session.commit()


def test_verify_from_head(app: Flask, backend: str) -> None:
    with app.app_context():
        s = db.session
        for _ in range(4):
            event(s, ip="192.0.2.1")
        s.commit()
        noted = audit.verify(s).head_hash
        assert audit_query.verify_from_head(s, noted).ok
        assert audit_query.verify_from_head(s, noted.upper()).ok
        for _ in range(3):
            event(s)
        s.commit()
        result = audit_query.verify_from_head(s, noted)
        assert result.ok
        assert result.count == 7
        rewrite_history(s, backend, 2)
        assert audit.verify(s).ok
        broken = audit_query.verify_from_head(s, noted)
        assert not broken.ok
        assert broken.problem == (
            f"the noted head {noted[:12]} is not in the trail (history rewritten?)"
        )


def test_verify_from_head_reports_a_broken_chain_first(app: Flask, backend: str) -> None:
    with app.app_context():
        for _ in range(3):
            event(db.session)
        db.session.commit()
        noted = audit.verify(db.session).head_hash
        if backend == "postgresql":
            db.session.execute(text("SET LOCAL session_replication_role = replica"))
        db.session.execute(text("UPDATE audit_events SET outcome = 'denied' WHERE seq = 2"))
        db.session.commit()
        result = audit_query.verify_from_head(db.session, noted)
        assert (result.ok, result.bad_seq) == (False, 2)


@pytest.mark.parametrize("bad", ["", "abc", "g" * 64, "0" * 63, "0" * 65])
def test_verify_from_head_refuses_malformed_hash(app: Flask, bad: str) -> None:
    with app.app_context(), pytest.raises(ServiceError):
        audit_query.verify_from_head(db.session, bad)


def test_details_are_json_objects(app: Flask) -> None:
    with app.app_context():
        event(db.session, details={"format": "csv", "n": 2})
        row = audit_query.search(db.session, AuditFilter()).rows[0]
        assert json.dumps(row.details, sort_keys=True) == '{"format": "csv", "n": 2}'
