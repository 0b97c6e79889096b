"""Issue 13 item 4 over HTTP: the auditor's first page runs the same few statements whatever
the people and events, its count says "more than 10,000" past the bound, and a renamed
person shows under the new name at once."""

from __future__ import annotations

from datetime import date

from flask import Flask
from sqlalchemy import select, update

from portal.extensions import db
from portal.models import User
from portal.services import audit_query, keys
from tests.browser_client import Browser, enrolled_user
from tests.factories import make_user
from tests.support.audit_bulk import append_events
from tests.support.statements import counting

PASSWORD = "Correct horse battery staple 42"


def signed_in_auditor(app: Flask) -> Browser:
    _, secret, _ = enrolled_user(app, role="auditor", email="ada@example.org", name="Ada Auditor")
    browser = Browser(app)
    assert browser.sign_in("ada@example.org", PASSWORD, secret).status_code == 302
    return browser


def add_people_and_events(app: Flask, people: int, events: int, first: int = 0) -> list[str]:
    """``people`` staff and as many patients, ``events`` events naming them in turn; return
    the patients' public ids."""
    with app.app_context():
        s = db.session
        staff = [
            make_user(s, "staff", f"s{i}@example.org", f"Staff Number {i}")
            for i in range(first, first + people)
        ]
        patients = [
            make_user(
                s, "patient", f"p{i}@example.org", f"Patient Number {i}", dob=date(1970, 1, 1)
            )
            for i in range(first, first + people)
        ]
        append_events(
            s, events, actors=[(u.id, u.role) for u in staff], patient_ids=[p.id for p in patients]
        )
        s.commit()
        return [p.public_id for p in patients]


def first_page_statements(app: Flask, browser: Browser, url: str) -> tuple[int, str]:
    """Return the statements one GET of ``url`` ran and the page. The session store's touch
    (last seen, written at most every 30 seconds) is left out: it follows the clock."""
    with counting(app) as seen:
        page = browser.get(url)
    assert page.status_code == 200, page.get_data(as_text=True)[:300]
    ran = [sql for sql in seen.sql if not sql.startswith("UPDATE web_sessions")]
    return len(ran), page.get_data(as_text=True)


def test_first_page_statements_do_not_grow_with_people_or_events(app: Flask) -> None:
    browser = signed_in_auditor(app)
    patient = add_people_and_events(app, 2, 6)[0]
    urls = ("/audit/", "/audit/?action=message.view", f"/audit/?patient_id={patient}")
    few = {url: first_page_statements(app, browser, url)[0] for url in urls}
    add_people_and_events(app, 45, 900, first=2)
    for url in urls:
        count, page = first_page_statements(app, browser, url)
        assert count == few[url], url
        assert count <= 8, url  # the signed-in session, the page, and the search's own event
    assert page.count("Patient Number 0") >= 3  # the patient's page names them on each row
    many = first_page_statements(app, browser, "/audit/")[1]
    assert len({f"Staff Number {i}" for i in range(47) if f"Staff Number {i} <" in many}) > 40


def test_count_says_more_than_past_the_bound_and_exact_below(app: Flask) -> None:
    browser = signed_in_auditor(app)
    busy, quiet = add_people_and_events(app, 1, audit_query.COUNT_LIMIT + 1)[0], None
    with app.app_context():
        quiet = make_user(
            db.session, "patient", "q@example.org", "Quiet Patient", dob=date(1970, 1, 1)
        ).public_id
        db.session.commit()
    busy_page = browser.get(f"/audit/?patient_id={busy}").get_data(as_text=True)
    assert "More than 10,000 events" in busy_page
    quiet_page = browser.get(f"/audit/?patient_id={quiet}").get_data(as_text=True)
    assert "<h2>1 event</h2>" in quiet_page  # its user.create event
    with app.app_context():
        exact = audit_query.count(db.session, audit_query.AuditFilter())
    everything = browser.get("/audit/").get_data(as_text=True)
    assert f"<h2>{exact:,} events</h2>" in everything  # unfiltered: the trail's exact length
    assert exact > audit_query.COUNT_LIMIT


def test_a_renamed_person_shows_under_the_new_name(app: Flask) -> None:
    browser = signed_in_auditor(app)
    add_people_and_events(app, 2, 8)
    assert "Staff Number 1" in browser.get("/audit/").get_data(as_text=True)
    with app.app_context():
        user = db.session.scalar(select(User).where(User.email == "s1@example.org"))
        assert user is not None
        key = keys.unwrap(db.session, user.data_key_id)
        sealed = keys.seal_text(key, "users", "name", user.public_id, "Renamed Staffer")
        db.session.execute(update(User).where(User.id == user.id).values(name_sealed=sealed))
        db.session.commit()
    page = browser.get("/audit/").get_data(as_text=True)
    assert "Renamed Staffer" in page
    assert "Staff Number 1" not in page
