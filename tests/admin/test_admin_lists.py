"""The admin's account lists as list pages (issue 13 item 1): the same statements for a few
accounts and many, names unsealed in one batch, each list paged on its own parameters."""

from __future__ import annotations

import re

from flask import Flask
from sqlalchemy import select, update

from portal.extensions import db
from portal.models import User
from portal.services.paging import BAD_PAGE, PAGE_SIZE
from tests.browser_client import Browser, enrolled_user
from tests.support.lists import add_people, link_named, without_sessions
from tests.support.statements import counting

PASSWORD = "Correct horse battery staple 42"
_ROW = re.compile(r"<td>[^<]*</td><td>([^<]+@example\.org)</td>")
_LOCKED = '<h2 id="locked-heading">'


def admin(app: Flask) -> Browser:
    _, secret, _ = enrolled_user(app, role="admin", email="al@example.org", name="Al Admin")
    browser = Browser(app)
    assert browser.sign_in("al@example.org", PASSWORD, secret=secret).status_code == 302
    return browser


def accounts_and_locked(html: str) -> tuple[list[str], list[str]]:
    """The addresses in the accounts table, then in the locked accounts table."""
    accounts, _, locked = html.partition(_LOCKED)
    return _ROW.findall(accounts), _ROW.findall(locked)


def measured(app: Flask, browser: Browser, url: str) -> tuple[list[str], str]:
    assert browser.get(url).status_code == 200  # warm-up
    with counting(app) as seen:
        page = browser.get(url)
    assert page.status_code == 200
    return without_sessions(seen), page.get_data(as_text=True)


def lock(app: Flask, addresses: list[str]) -> None:
    with app.app_context():
        db.session.execute(update(User).where(User.email.in_(addresses)).values(must_reset=True))
        db.session.commit()


def test_accounts_page_runs_the_same_statements_for_few_and_many_accounts(app: Flask) -> None:
    browser = admin(app)
    lock(app, add_people(app, "staff", [f"s{n:02}@example.org" for n in range(3)])[:1])
    lock(app, add_people(app, "patient", ["p00@example.org"]))
    few, few_html = measured(app, browser, "/admin/users")
    assert [len(t) for t in accounts_and_locked(few_html)] == [4, 2]
    lock(app, add_people(app, "staff", [f"s{n:02}@example.org" for n in range(3, 60)])[:40])
    lock(app, add_people(app, "patient", [f"p{n:02}@example.org" for n in range(1, 30)]))
    many, many_html = measured(app, browser, "/admin/users")
    assert [len(t) for t in accounts_and_locked(many_html)] == [PAGE_SIZE, PAGE_SIZE]
    assert len(many) == len(few), "\n".join(many)
    assert len(few) <= 5, "\n".join(few)  # user; per list: page, names + their keys


def test_account_lists_page_on_their_own(app: Flask) -> None:
    browser = admin(app)
    staff = add_people(app, "staff", [f"s{n:03}@example.org" for n in range(120)])
    patients = add_people(app, "patient", [f"p{n:03}@example.org" for n in range(70)])
    lock(app, patients)
    walked, url = [], "/admin/users"
    while url:
        html = browser.get(url).get_data(as_text=True)
        accounts, locked = accounts_and_locked(html)
        assert locked == patients[:PAGE_SIZE]  # the other list stays on its first page
        walked += accounts
        url = link_named(html.partition(_LOCKED)[0], "next")  # the accounts table's pager
    assert walked == ["al@example.org", *staff]  # oldest first, each once
    first = browser.get("/admin/users").get_data(as_text=True)
    later = re.search(r'href="(/admin/users\?locked_after=[0-9a-f]{32})"', first)
    assert later is not None
    accounts, locked = accounts_and_locked(browser.get(later.group(1)).get_data(as_text=True))
    assert locked == patients[PAGE_SIZE:]
    assert accounts == ["al@example.org", *staff[: PAGE_SIZE - 1]]


def test_bad_account_cursors_are_refused(app: Flask) -> None:
    browser = admin(app)
    made = add_people(app, "staff", ["s1@example.org"])
    with app.app_context():
        unlocked = db.session.scalar(select(User.public_id).where(User.email == made[0]))
    assert unlocked is not None
    not_locked_cursor = f"locked_after={unlocked}"  # an account, but not a locked one
    for query in (
        "after=nope!",
        "locked_before=" + "0" * 32,
        "after=a&before=b",
        not_locked_cursor,
    ):
        page = browser.get(f"/admin/users?{query}")
        assert page.status_code == 400, query
        assert BAD_PAGE in page.get_data(as_text=True)
        assert "s1@example.org" not in page.get_data(as_text=True)
