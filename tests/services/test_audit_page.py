"""Issue 13 item 4: an auditor's page is one statement whatever the people or events, its count
stops at a bound, and names come from a cache that never serves a changed or shredded one."""

from __future__ import annotations

import threading
from datetime import date, timedelta

import pytest
from flask import Flask
from sqlalchemy import update
from sqlalchemy.orm import Session

from portal import audit
from portal.audit import Action, Actor, Outcome
from portal.database import utcnow
from portal.extensions import db
from portal.models import DataKey, User
from portal.services import audit_names, audit_query, keys
from portal.services.audit_names import NameCache, SealedName
from portal.services.audit_query import AuditFilter
from tests.factories import PATIENT_NAME, make_patient, make_user
from tests.support.audit_bulk import append_events
from tests.support.statements import counting


def people(session: Session, count: int, role: str = "staff", first: int = 0) -> list[User]:
    """``count`` users named "<Role> Number <n>", n from ``first``."""
    extra = {"dob": date(1970, 1, 1)} if role == "patient" else {}
    return [
        make_user(session, role, f"{role}{i}@example.org", f"{role.title()} Number {i}", **extra)
        for i in range(first, first + count)
    ]


def trail(session: Session, staff: list[User], patients: list[User], events: int) -> None:
    """``events`` events, each naming a different actor and patient in turn."""
    append_events(
        session,
        events,
        actors=[(s.id, s.role) for s in staff],
        patient_ids=[p.id for p in patients],
    )
    session.commit()


def rename(session: Session, user: User, name: str) -> None:
    """Seal a new name for ``user`` (what an admin tool or another process would write)."""
    key = keys.unwrap(session, user.data_key_id)
    sealed = keys.seal_text(key, "users", "name", user.public_id, name)
    session.execute(update(User).where(User.id == user.id).values(name_sealed=sealed))
    session.commit()


def names_on(session: Session, flt: AuditFilter | None = None) -> set[str]:
    rows = audit_query.search(session, flt or AuditFilter(), limit=audit_query.MAX_LIMIT).rows
    session.rollback()
    return {r.actor_name for r in rows} | {r.patient_name for r in rows if r.patient_name}


FILTERS = [
    AuditFilter(),
    AuditFilter(action="message.view"),
    AuditFilter(action="message."),
    AuditFilter(outcome="success", client_ip="192.0.2.10"),
]


@pytest.mark.parametrize("cold", [True, False], ids=["cache-cold", "cache-warm"])
def test_first_page_is_one_statement_whatever_the_people_and_events(app: Flask, cold: bool) -> None:
    with app.app_context():
        s = db.session
        trail(s, people(s, 2), people(s, 2, "patient"), 5)
        for flt in FILTERS:
            with counting(app) as seen:
                assert len(audit_query.search(s, flt).rows) >= 5
            assert len(seen) == 1, seen.sql
            s.rollback()
        trail(s, people(s, 40, first=2), people(s, 40, "patient", first=2), 400)
        for flt in FILTERS:
            if cold:
                audit_names.name_cache().clear()
            with counting(app) as seen:
                page = audit_query.search(s, flt, limit=audit_query.MAX_LIMIT)
            assert len(seen) == 1, seen.sql
            assert len({r.actor_name for r in page.rows}) > 40
            assert len({r.patient_name for r in page.rows}) > 40
            s.rollback()


def test_later_pages_and_empty_pages_are_one_statement_too(app: Flask) -> None:
    with app.app_context():
        s = db.session
        staff = people(s, 2)
        trail(s, staff, [*people(s, 2, "patient")], 30)
        flt = AuditFilter(action="message.view")
        before = audit_query.search(s, flt, limit=10).next_before
        for after in (before, 1):  # a middle page, then one past the oldest event
            with counting(app) as seen:
                page = audit_query.search(s, flt, before_seq=after, limit=10)
            assert len(seen) == 1, seen.sql
            assert page.total == 30  # counted whatever the page, even an empty one
        assert page.rows == []
        assert page.next_before is None


def test_count_is_exact_up_to_the_bound_then_more_than(app: Flask) -> None:
    with app.app_context():
        s = db.session
        staff = people(s, 1)
        patient = make_patient(s)
        trail(s, staff, [patient], 6)
        flt = AuditFilter(patient_id=patient.id, action="message.view")
        for bound, expected in ((7, (6, False)), (6, (6, False)), (5, (5, True)), (1, (1, True))):
            page = audit_query.search(s, flt, limit=2, count_limit=bound)
            assert (page.total, page.more) == expected, bound
            assert audit_query.bounded_count(s, flt, bound) == expected
            assert len(page.rows) == 2
        assert audit_query.count(s, flt) == 6


def test_unfiltered_count_is_the_trails_exact_length_past_the_bound(app: Flask) -> None:
    with app.app_context():
        s = db.session
        staff = people(s, 2)
        trail(s, staff, people(s, 2, "patient"), 20)
        length = audit_query.count(s, AuditFilter())
        page = audit_query.search(s, AuditFilter(), limit=5, count_limit=3)
        assert (page.total, page.more) == (length, False)
        assert audit_query.bounded_count(s, AuditFilter(), 3) == (length, False)
        assert audit.verify(s).ok


def test_cached_names_serve_without_opening_and_a_rename_shows_at_once(app: Flask) -> None:
    with app.app_context():
        s = db.session
        staff, patient = people(s, 3), make_patient(s)
        trail(s, staff, [patient], 9)
        cache = audit_names.name_cache()
        opened = cache.opened
        assert names_on(s) >= {PATIENT_NAME, "Staff Number 0", "Staff Number 2"}
        assert cache.opened - opened == 4  # three staff and the patient, once each
        assert names_on(s) >= {PATIENT_NAME}
        assert cache.opened - opened == 4  # the second page opened nothing
        rename(s, staff[1], "Renamed Person")
        shown = names_on(s)
        assert "Renamed Person" in shown
        assert "Staff Number 1" not in shown
        assert cache.opened - opened == 5  # only the renamed one again


def test_a_shredded_user_is_unavailable_though_cached(app: Flask) -> None:
    with app.app_context():
        s = db.session
        staff = people(s, 2)
        trail(s, staff, people(s, 1, "patient"), 4)
        assert "Staff Number 1" in names_on(s)
        keys.destroy(s, staff[1].data_key_id)
        s.commit()
        shown = names_on(s)
        assert "Staff Number 1" not in shown
        assert audit_names.UNAVAILABLE_NAME in shown
        assert audit_names.name_cache().get(staff[1].id, _sealed(s, staff[1])) is None


def test_a_kek_gone_from_the_keyring_makes_cached_names_unavailable(app: Flask) -> None:
    with app.app_context():
        s = db.session
        staff = people(s, 1)
        trail(s, staff, people(s, 1, "patient"), 2)
        assert names_on(s) == {"system", "Staff Number 0", "Patient Number 0"}
        ring = keys.keyring()
        old = ring.active_version
        ring.add_version()
        ring.remove_version(old)  # an operator's mistake: keys are still wrapped by it
        assert names_on(s) == {"system", audit_names.UNAVAILABLE_NAME}


def test_an_altered_sealed_name_is_unavailable_and_not_cached(app: Flask) -> None:
    with app.app_context():
        s = db.session
        staff = people(s, 1)
        trail(s, staff, people(s, 1, "patient"), 2)
        assert "Staff Number 0" in names_on(s)
        other = make_user(s, "staff", "other@example.org", "Other Person")
        s.execute(  # another user's sealed name, moved here: its AAD names the other row
            update(User).where(User.id == staff[0].id).values(name_sealed=other.name_sealed)
        )
        s.commit()
        opened = audit_names.name_cache().opened
        for _ in range(2):
            shown = names_on(s, AuditFilter(actor_id=staff[0].id))
            assert shown == {audit_names.UNAVAILABLE_NAME, "Patient Number 0"}
        assert audit_names.name_cache().opened == opened


def test_unknown_and_system_actors(app: Flask) -> None:
    with app.app_context():
        s = db.session
        audit.record(s, Action.AUTH_SIGNIN_FAILED, outcome=Outcome.FAILURE, patient_id=999_999)
        audit.record(s, Action.MESSAGE_VIEW, actor=Actor(888_888, "staff"))
        s.commit()
        rows = audit_query.search(s, AuditFilter()).rows
        assert (rows[1].actor_name, rows[1].patient_name) == ("system", "(unknown)")
        assert (rows[0].actor_name, rows[0].actor_public_id) == ("(unknown)", None)


def test_an_action_prefix_is_literal_not_a_like_pattern(app: Flask) -> None:
    with app.app_context():
        s = db.session
        staff = [(people(s, 1)[0].id, "staff")]
        seqs = {
            action: append_events(s, 1, actors=staff, patient_ids=[None], action=action)
            for action in ("a_b.view", "aZb.view", "a%b.x", "a/b.x")
        }
        s.commit()
        for prefix, action in (("a_b.", "a_b.view"), ("a%b.", "a%b.x"), ("a/b.", "a/b.x")):
            page = audit_query.search(s, AuditFilter(action=prefix))
            assert [r.seq for r in page.rows] == [seqs[action]], prefix
            assert (page.total, audit_query.count(s, AuditFilter(action=prefix))) == (1, 1)


def test_time_bounds_of_any_offset_filter_alike(app: Flask) -> None:
    with app.app_context():
        s = db.session
        staff = people(s, 1)
        trail(s, staff, people(s, 1, "patient"), 10)
        now = utcnow()
        flt = audit_query.from_args(
            actor_id=staff[0].id,
            since=(now - timedelta(hours=1)).isoformat(),
            until=(now + timedelta(hours=1)).astimezone().isoformat(),
        )
        page = audit_query.search(s, flt)
        assert (len(page.rows), page.total) == (10, audit_query.count(s, flt)) == (10, 10)
        earlier = AuditFilter(actor_id=staff[0].id, until=now - timedelta(hours=1))
        assert audit_query.search(s, earlier).rows == []


def test_two_auditors_at_once_share_the_cache_safely(app: Flask) -> None:
    with app.app_context():
        staff = people(db.session, 30)
        trail(db.session, staff, people(db.session, 30, "patient"), 120)
    expected = {f"Staff Number {i}" for i in range(30)} | {f"Patient Number {i}" for i in range(30)}
    failures: list[BaseException] = []
    start = threading.Barrier(2)

    def auditor() -> None:
        try:
            with app.app_context():
                start.wait(timeout=30)
                for _ in range(15):
                    assert names_on(db.session) >= expected
                db.session.remove()
        except BaseException as error:  # reported below, in the test's thread
            failures.append(error)

    threads = [threading.Thread(target=auditor) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert failures == []


def test_name_cache_is_a_bounded_lru() -> None:
    cache = NameCache(size=2)
    sealed = {i: SealedName(f"p{i}", i, 1, b"w", bytes([i])) for i in range(4)}
    for i in (1, 2):
        cache.put(i, sealed[i], f"name {i}")
    assert cache.get(1, sealed[1]) == "name 1"  # 1 is now the most recent
    cache.put(3, sealed[3], "name 3")
    assert len(cache) == 2
    assert cache.get(2, sealed[2]) is None  # the least recently used went
    assert cache.get(1, sealed[1]) == "name 1"
    assert cache.get(1, SealedName("p1", 1, 1, b"w", b"renamed")) is None
    assert cache.get(1, SealedName("p1", 1, 2, b"w", bytes([1]))) is None  # rewrapped
    cache.forget(1)
    assert cache.get(1, sealed[1]) is None


def _sealed(session: Session, user: User) -> SealedName:
    key = session.get(DataKey, user.data_key_id)
    assert key is not None
    session.refresh(key)
    session.refresh(user)
    return SealedName(user.public_id, key.id, key.kek_version, key.wrapped, user.name_sealed)
