"""The patient's inbox and access history as list pages (issue 13 item 1): a bounded number
of statements whatever the number of rows, only subjects and names unsealed, each data key
unwrapped once per request, keyset pages beyond 200 rows, bad page parameters refused."""

from __future__ import annotations

import re
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import event, select, update

from portal.audit import Action, RequestMeta, actor_of, event_hash, record
from portal.database import utcnow
from portal.extensions import db
from portal.models import Attachment, AuditEvent, Message, User
from portal.models.messages import MessageState
from portal.services import keys, patient_lists
from portal.services.names import DELETED_ACCOUNT
from portal.services.paging import BAD_PAGE, PAGE_SIZE
from portal.services.patient_lists import DELETED_SUBJECT
from tests.factories import FILENAME, make_message
from tests.support.lists import (
    crypto_calls,
    fill_inbox,
    link_named,
    listed_messages,
    page_links,
    without_sessions,
)
from tests.support.pickup import STAFF_EMAIL, chain_ok, enrolled_patient, events, signed_in
from tests.support.statements import counting


def measured(app: Flask, browser: Any, url: str) -> tuple[list[str], str]:
    """The statements of one GET of ``url`` (after a warm-up), without the session row's."""
    assert browser.get(url).status_code == 200
    with counting(app) as seen:
        page = browser.get(url)
    assert page.status_code == 200, page.get_data(as_text=True)[:300]
    return without_sessions(seen), page.get_data(as_text=True)


def test_inbox_runs_the_same_statements_for_3_and_60_messages(
    app: Flask, senders: list[str]
) -> None:
    _, few_secret = enrolled_patient(app, "few@example.org", "Fay Few")
    _, many_secret = enrolled_patient(app, "many@example.org", "Manny Many")
    fill_inbox(app, "few@example.org", 3, senders[:1])
    fill_inbox(app, "many@example.org", 60, senders)  # three senders in turn
    few, few_html = measured(app, signed_in(app, "few@example.org", few_secret), "/inbox")
    many_browser = signed_in(app, "many@example.org", many_secret)
    many, many_html = measured(app, many_browser, "/inbox")
    assert len(listed_messages(few_html)) == 3
    assert len(listed_messages(many_html)) == PAGE_SIZE  # a full page: 50 rows shown
    assert len(many) == len(few), "\n".join(many)
    # The budget, spelled out: the page (with its keys, attachment counts, senders and the
    # senders' keys: no query of its own for the names), then the audit event (head, event,
    # head); the user comes with the session's row, left out here (see the test below).
    assert len(few) <= 4, "\n".join(few)
    assert [s for s in few if s.startswith("SELECT")] == [few[0]], "\n".join(few)
    older = link_named(many_html, "next")
    assert older is not None
    second, second_html = measured(app, many_browser, older)
    assert len(listed_messages(second_html)) == 10
    assert len(second) == len(few) + 1  # the cursor's row, looked up within the patient's own


def test_a_signed_in_inbox_request_reads_its_session_and_user_in_one_statement(
    app: Flask, senders: list[str]
) -> None:
    """The fixed cost of a signed-in page (README "Inbox"): one connection of the app's pool
    and one transaction, the session's row and its user in one statement (the old code
    checked out a second connection for the session's own transaction, then loaded the
    user again by public id), then the page with its senders, and the audit event (on the
    audit group appender's own connection, portal.audit_group): five statements in all
    (six before the senders joined the page's query)."""
    _, secret = enrolled_patient(app, "few@example.org", "Fay Few")
    fill_inbox(app, "few@example.org", 3, senders)
    browser = signed_in(app, "few@example.org", secret)
    assert browser.get("/inbox").status_code == 200  # warm-up: the row was touched at sign-in
    checkouts: list[object] = []
    engine = app.extensions["engine"]

    def checked_out(*_args: object) -> None:
        checkouts.append(_args)

    event.listen(engine, "checkout", checked_out)
    try:
        with counting(app) as seen:
            page = browser.get("/inbox")
    finally:
        event.remove(engine, "checkout", checked_out)
    assert page.status_code == 200
    assert len(listed_messages(page.get_data(as_text=True))) == 3
    assert len(checkouts) == 1
    assert "FROM web_sessions LEFT OUTER JOIN users" in seen.sql[0], seen.sql[0]
    user_reads = [s for s in seen.sql if re.search(r"FROM users WHERE users\.(id|public_id) =", s)]
    assert user_reads == []  # the user loader found the session's user: no second look-up
    assert len(seen) <= 5, "\n".join(seen.sql)
    assert len(seen.touching("audit_events")) == 1  # the view's event, still written
    assert events(app, Action.MESSAGE_LIST)[-1].details == '{"count":3}'


def test_inbox_unseals_only_subjects_and_names_each_key_once(
    app: Flask, senders: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, secret = enrolled_patient(app, "many@example.org", "Manny Many")
    fill_inbox(app, "many@example.org", 30, senders)
    browser = signed_in(app, "many@example.org", secret)
    assert browser.get("/inbox").status_code == 200
    with crypto_calls(monkeypatch) as calls:
        page = browser.get("/inbox")
    assert page.status_code == 200
    assert calls.opened == {"messages.subject": 30, "users.name": 3}
    assert set(calls.unwrapped.values()) == {1}  # every data key unwrapped once
    assert sum(calls.unwrapped.values()) == 30 + 3  # the messages' and the senders'
    assert calls.keyring_loads == 0  # the file did not change
    assert calls.keyring_stats <= 1  # one stat of the keyring for the whole page


def test_inbox_names_shredded_senders_and_messages_from_its_one_query(
    app: Flask, senders: list[str]
) -> None:
    """The senders' names come with the page's own rows now: a sender whose data key was
    shredded is "(deleted account)" on every row of theirs, a shredded message is
    "(deleted)" without a link, and the other rows are untouched."""
    _, secret = enrolled_patient(app, "many@example.org", "Manny Many")
    made = fill_inbox(app, "many@example.org", 6, senders)  # sam, ada, bo in turn
    with app.app_context():
        ada = db.session.scalar(select(User).where(User.email == "ada@example.org"))
        shredded = db.session.scalar(select(Message).where(Message.public_id == made[0]))
        assert ada is not None
        assert shredded is not None
        keys.destroy(db.session, ada.data_key_id)
        keys.destroy(db.session, shredded.data_key_id)
        db.session.commit()
    page = signed_in(app, "many@example.org", secret).get("/inbox")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert html.count(f"<td>{DELETED_ACCOUNT}</td>") == 2  # ada sent messages 1 and 4
    assert html.count("<td>Sam Staffer</td>") == 2
    assert "Letter 0" not in html
    assert f"<td>{DELETED_SUBJECT}</td>" in html
    assert made[0] not in listed_messages(html)  # no link to a shredded message
    assert set(listed_messages(html)) == set(made[1:])
    assert all(f"Letter {n}</a>" in html for n in range(1, 6))


def test_inbox_shows_the_callers_own_unflushed_changes(app: Flask, senders: list[str]) -> None:
    """Regression (issue 13 review): the inbox's rows are read on the session's connection,
    which never autoflushes, so a message revoked earlier in the same transaction (not yet
    flushed) was listed as available, with its link."""
    enrolled_patient(app, "many@example.org", "Manny Many")
    made = fill_inbox(app, "many@example.org", 2, senders)
    with app.app_context():
        patient = db.session.scalar(select(User).where(User.email == "many@example.org"))
        revoked = db.session.scalar(select(Message).where(Message.public_id == made[0]))
        assert patient is not None
        assert revoked is not None
        revoked.revoked_at = utcnow()  # pending in the session, not flushed
        rows = {row.public_id: row.state for row in patient_lists.inbox(db.session, patient).rows}
        db.session.rollback()
    assert rows[made[0]] == MessageState.REVOKED
    assert rows[made[1]] == MessageState.AVAILABLE


def test_inbox_views_still_chain_their_audit_events(app: Flask, senders: list[str]) -> None:
    """The audit event is inserted with a Core statement now (no ORM flush): each view's
    message.list event is stored, in the chain, and the chain verifies."""
    _, secret = enrolled_patient(app, "few@example.org", "Fay Few")
    fill_inbox(app, "few@example.org", 3, senders)
    browser = signed_in(app, "few@example.org", secret)
    before = len(events(app, Action.MESSAGE_LIST))
    for _ in range(3):
        assert browser.get("/inbox").status_code == 200
    listed = events(app, Action.MESSAGE_LIST)
    assert len(listed) == before + 3
    assert [e.details for e in listed[-3:]] == ['{"count":3}'] * 3
    assert all(e.hash == event_hash(e) for e in listed)
    assert chain_ok(app)


def test_inbox_never_decrypts_bodies_or_file_names(app: Flask, senders: list[str]) -> None:
    """Ruined body and file-name ciphertext leaves the inbox untouched: a list that opened
    them would fail authentication (the old inbox unsealed both for every row)."""
    _, secret = enrolled_patient(app)
    with app.app_context():
        sender = db.session.scalar(select(User).where(User.email == STAFF_EMAIL))
        patient = db.session.scalar(select(User).where(User.email == "zq@example.org"))
        assert sender is not None
        assert patient is not None
        for n in range(3):
            make_message(db.session, sender, patient, subject=f"Scan {n}")
        db.session.execute(update(Message).values(body_sealed=b"\x01" + b"\x00" * 40))
        db.session.execute(update(Attachment).values(filename_sealed=b"\x01" + b"\x00" * 40))
        db.session.commit()
    page = signed_in(app, "zq@example.org", secret).get("/inbox")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert all(f"Scan {n}" in html for n in range(3))
    assert FILENAME not in html
    assert html.count("<td>1</td>") == 3  # one attachment each, counted in SQL


def test_pages_walk_past_200_messages_without_gaps_or_repeats(
    app: Flask, senders: list[str]
) -> None:
    _, secret = enrolled_patient(app, "many@example.org", "Manny Many")
    made = fill_inbox(app, "many@example.org", 230, senders)
    with app.app_context():  # the oddest order: every message sent in the same microsecond
        db.session.execute(update(Message).values(created_at=utcnow()))
        db.session.commit()
        newest_first = list(
            db.session.scalars(
                select(Message.public_id).order_by(Message.created_at.desc(), Message.id.desc())
            )
        )
    assert sorted(newest_first) == sorted(made)
    browser = signed_in(app, "many@example.org", secret)
    pages, url = [], "/inbox"
    while url:
        html = browser.get(url).get_data(as_text=True)
        pages.append(listed_messages(html))
        assert all(
            re.fullmatch(r"/inbox\?(after|before)=[0-9a-f]{32}", link) for link in page_links(html)
        )
        url = link_named(html, "next")
    assert [len(p) for p in pages] == [50, 50, 50, 50, 30]
    assert [m for p in pages for m in p] == newest_first  # every message once, in order
    back, url = [], link_named(html, "prev")
    while url:
        html = browser.get(url).get_data(as_text=True)
        back.append(listed_messages(html))
        url = link_named(html, "prev")
    assert back == pages[-2::-1]  # the same pages again, up to the first
    assert "Newest messages" not in html  # the first page says it is the first


BAD_QUERIES = [
    "after=not-a-cursor",
    "after=",
    "before=" + "f" * 65,
    "after=" + "a" * 32 + "&before=" + "b" * 32,
    "after=" + "a" * 32 + "&after=" + "b" * 32,
    "after=" + "0" * 32,  # well formed, but no message of this patient's
    "after=" + "é" * 10,
    "after=" + "a" * 10_000,
]


def test_bad_page_parameters_are_a_clear_400_that_records_nothing(
    app: Flask, senders: list[str]
) -> None:
    _, secret = enrolled_patient(app)
    fill_inbox(app, "zq@example.org", 3, senders[:1])
    browser = signed_in(app, "zq@example.org", secret)
    listed_before = len(events(app, "message.list"))
    for query in BAD_QUERIES:
        page = browser.get(f"/inbox?{query}")
        html = page.get_data(as_text=True)
        assert page.status_code == 400, query
        assert BAD_PAGE in html
        assert 'href="/inbox"' in html  # the way back to the first page
        assert "Traceback" not in html
        assert "Letter" not in html  # no row shown
    assert len(events(app, "message.list")) == listed_before  # nothing recorded
    assert browser.get("/inbox").status_code == 200  # and the first page still works


def test_a_patient_cannot_page_through_another_patients_messages(
    app: Flask, senders: list[str]
) -> None:
    _, mine = enrolled_patient(app)
    _, theirs = enrolled_patient(app, "other@example.org", "Otto Other")
    fill_inbox(app, "zq@example.org", 3, senders[:1], subject="Mine")
    other_ids = fill_inbox(app, "other@example.org", 60, senders, subject="Theirs")
    browser = signed_in(app, "zq@example.org", mine)
    for cursor in (other_ids[0], other_ids[30], other_ids[-1]):
        for direction in ("after", "before"):
            page = browser.get(f"/inbox?{direction}={cursor}")
            assert page.status_code == 400
            assert "Theirs" not in page.get_data(as_text=True)
    # Their own pages still work for them, and never show the first patient's rows.
    other = signed_in(app, "other@example.org", theirs)
    html = other.get("/inbox").get_data(as_text=True)
    second = other.get(link_named(html, "next") or "").get_data(as_text=True)
    assert "Mine" not in html + second
    assert len(listed_messages(second)) == 10


def staff_read_every_message(app: Flask, patient_email: str) -> None:
    """Each sender opens each message they sent the patient: an event per message in the
    patient's history, naming three people across the messages."""
    with app.app_context():
        patient = db.session.scalar(select(User).where(User.email == patient_email))
        assert patient is not None
        for message in db.session.scalars(
            select(Message).where(Message.recipient_id == patient.id)
        ):
            sender = db.session.get(User, message.sender_id)
            assert sender is not None
            record(
                db.session,
                Action.MESSAGE_VIEW,
                actor=actor_of(sender),
                meta=RequestMeta("192.0.2.7"),
                patient_id=patient.id,
                message_id=message.id,
            )
        db.session.commit()


def test_history_runs_the_same_statements_for_few_and_many_events(
    app: Flask, senders: list[str]
) -> None:
    _, few_secret = enrolled_patient(app, "few@example.org", "Fay Few")
    _, many_secret = enrolled_patient(app, "many@example.org", "Manny Many")
    fill_inbox(app, "few@example.org", 3, senders)
    fill_inbox(app, "many@example.org", 60, senders)
    staff_read_every_message(app, "few@example.org")
    staff_read_every_message(app, "many@example.org")
    few, few_html = measured(app, signed_in(app, "few@example.org", few_secret), "/history")
    many_browser = signed_in(app, "many@example.org", many_secret)
    many, html = measured(app, many_browser, "/history")
    # Each staff read names its message by subject ("Letter N (date)"); nothing else does.
    assert few_html.count("Letter ") == 3
    assert html.count("<tr>") == PAGE_SIZE + 1  # a full page of events, and the header
    assert len(many) == len(few), "\n".join(many)
    reads, older = html.count("Letter "), link_named(html, "next")
    assert older is not None
    assert re.fullmatch(r"/history\?after=\d+", older)
    while older:
        rest = many_browser.get(older).get_data(as_text=True)
        reads, older = reads + rest.count("Letter "), link_named(rest, "next")
    assert reads == 60


def test_history_refuses_another_patients_event_as_a_cursor(app: Flask, senders: list[str]) -> None:
    _, secret = enrolled_patient(app)
    enrolled_patient(app, "other@example.org", "Otto Other")
    fill_inbox(app, "other@example.org", 2, senders[:1], subject="Theirs")
    with app.app_context():
        other = db.session.scalar(select(User).where(User.email == "other@example.org"))
        assert other is not None
        theirs = db.session.scalar(
            select(AuditEvent.seq).where(AuditEvent.patient_id == other.id).limit(1)
        )
    browser = signed_in(app, "zq@example.org", secret)
    for query in (f"after={theirs}", f"before={theirs}", "after=abc", "after=" + "9" * 30):
        page = browser.get(f"/history?{query}")
        assert page.status_code == 400, query
        assert BAD_PAGE in page.get_data(as_text=True)
