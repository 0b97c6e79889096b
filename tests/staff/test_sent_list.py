"""The staff's sent list as a list page (issue 13 item 1): bounded statements, only subjects
and names unsealed, keyset pages, another member of staff's messages never reachable."""

from __future__ import annotations

import re

import pytest
from flask import Flask
from sqlalchemy import update

from portal.audit import NO_REQUEST, SYSTEM
from portal.extensions import db
from portal.models import Message
from portal.services import content
from portal.services.paging import BAD_PAGE, PAGE_SIZE
from tests.browser_client import Browser, enrolled_user
from tests.support.lists import (
    add_people,
    crypto_calls,
    link_named,
    page_links,
    store_messages,
)
from tests.support.lists import without_sessions as statements_of
from tests.support.pickup import enrolled_patient, signed_in
from tests.support.statements import counting

PASSWORD = "Correct horse battery staple 42"
PATIENTS = ["p1@example.org", "p2@example.org", "p3@example.org"]
_STATUS_LINK = re.compile(r'href="/staff/messages/([0-9a-f]{32})"')


def signed_in_staff(app: Flask, email: str) -> Browser:
    _, secret, _ = enrolled_user(app, email=email, name=f"Staff {email[:3]}")
    browser = Browser(app)
    assert browser.sign_in(email, PASSWORD, secret=secret).status_code == 302
    return browser


def sent_ids(html: str) -> list[str]:
    return _STATUS_LINK.findall(html)


def measured(app: Flask, browser: Browser, url: str) -> tuple[list[str], str]:
    assert browser.get(url).status_code == 200  # warm-up
    with counting(app) as seen:
        page = browser.get(url)
    assert page.status_code == 200
    return statements_of(seen), page.get_data(as_text=True)


def test_sent_list_runs_the_same_statements_for_3_and_60_messages(app: Flask) -> None:
    patients = add_people(app, "patient", PATIENTS)
    few_browser = signed_in_staff(app, "few@example.org")
    many_browser = signed_in_staff(app, "many@example.org")
    store_messages(app, ["few@example.org"], patients[:1], 3)
    store_messages(app, ["many@example.org"], patients, 60)
    few, few_html = measured(app, few_browser, "/staff/")
    many, many_html = measured(app, many_browser, "/staff/")
    assert len(sent_ids(few_html)) == 3
    assert len(sent_ids(many_html)) == PAGE_SIZE
    assert len(many) == len(few), "\n".join(many)
    assert len(few) <= 6, "\n".join(few)  # user, page + keys, patients + keys, audit (3)
    older = link_named(many_html, "next")
    assert older is not None
    assert re.fullmatch(r"/staff/\?after=[0-9a-f]{32}", older)
    rest, rest_html = measured(app, many_browser, older)
    assert len(sent_ids(rest_html)) == 10
    assert len(rest) == len(few) + 1  # the cursor's row
    assert set(sent_ids(many_html)).isdisjoint(sent_ids(rest_html))


def test_sent_list_unseals_subjects_and_names_only(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    patients = add_people(app, "patient", PATIENTS)
    browser = signed_in_staff(app, "many@example.org")
    store_messages(app, ["many@example.org"], patients, 20)
    with app.app_context():  # ruined bodies: a list that opened them would fail
        db.session.execute(update(Message).values(body_sealed=b"\x01" + b"\x00" * 40))
        db.session.commit()
    assert browser.get("/staff/").status_code == 200
    with crypto_calls(monkeypatch) as calls:
        page = browser.get("/staff/")
    assert page.status_code == 200
    assert "Letter 19" in page.get_data(as_text=True)
    assert calls.opened == {"messages.subject": 20, "users.name": 3}
    assert set(calls.unwrapped.values()) == {1}


def test_another_members_message_is_no_cursor(app: Flask) -> None:
    patients = add_people(app, "patient", PATIENTS)
    mine = signed_in_staff(app, "mine@example.org")
    signed_in_staff(app, "theirs@example.org")
    store_messages(app, ["mine@example.org"], patients, 3, subject="Mine")
    theirs = store_messages(app, ["theirs@example.org"], patients, 60, subject="Theirs")
    for query in (f"after={theirs[10]}", f"before={theirs[10]}", "after=x-y", "before="):
        page = mine.get(f"/staff/?{query}")
        html = page.get_data(as_text=True)
        assert page.status_code == 400, query
        assert BAD_PAGE in html
        assert "Theirs" not in html
        assert "Mine" not in html
    html = mine.get("/staff/").get_data(as_text=True)
    assert page_links(html) == []  # three messages: one page, no links
    assert "Theirs" not in html


def test_a_patient_cannot_open_the_sent_list(app: Flask) -> None:
    _, secret = enrolled_patient(app)
    page = signed_in(app, "zq@example.org", secret).get("/staff/?after=" + "a" * 32)
    assert page.status_code == 403


def test_deleted_messages_are_listed_without_unsealing(app: Flask) -> None:
    patients = add_people(app, "patient", PATIENTS)
    browser = signed_in_staff(app, "many@example.org")
    store_messages(app, ["many@example.org"], patients, 4)
    with app.app_context():
        for message in db.session.query(Message).all()[:2]:
            content.shred(db.session, message, actor=SYSTEM, meta=NO_REQUEST)
        db.session.commit()
    html = browser.get("/staff/").get_data(as_text=True)
    assert html.count("(deleted)") == 2
    assert html.count("Deleted</span>") == 2
