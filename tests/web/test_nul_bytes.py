"""Nothing a user types produces a 500: NUL bytes in every route's path and query.

PostgreSQL text cannot hold NUL, so an id or filter carrying one used to reach a
query and fail as a DataError (a 500 on PostgreSQL only). Every GET route of the
app is tried by every signed-in role, with NUL in each path variable and in the
query parameters the routes read.
"""

from __future__ import annotations

import re

import pytest
from flask import Flask
from sqlalchemy import select

from portal.extensions import db
from portal.models import AuditEvent
from tests.browser_client import Browser, enrolled_user

PASSWORD = "Correct horse battery staple 42"
ROLES = ("patient", "staff", "auditor", "admin")
QUERY_NAMES = (
    "message",
    "patient_id",
    "actor_id",
    "to",
    "before",
    "since",
    "until",
    "action",
    "outcome",
    "ip",
    "head",
    "next",
    "page",
)
NUL = "a\x00b"


def signed_in(app: Flask) -> dict[str, Browser]:
    """One signed-in browser per role."""
    browsers = {}
    for role in ROLES:
        email = f"{role}@example.org"
        _, secret, _ = enrolled_user(app, role=role, email=email, name=f"{role.title()} One")
        browser = Browser(app)
        assert browser.sign_in(email, PASSWORD, secret).status_code == 302
        browsers[role] = browser
    return browsers


def get_urls(app: Flask) -> list[str]:
    """Every GET rule with its variables replaced by a NUL-carrying value."""
    urls = []
    for rule in app.url_map.iter_rules():
        if "GET" not in (rule.methods or set()) or rule.endpoint == "static":
            continue
        urls.append(re.sub(r"<[^>]+>", "a%00b", rule.rule))
    return urls


def test_nul_in_any_path_or_query_is_never_a_500(app: Flask) -> None:
    browsers = signed_in(app)
    crashed = []
    for url in get_urls(app):
        for role, browser in browsers.items():
            for name in QUERY_NAMES:
                status = browser.get(url, query_string={name: NUL}).status_code
                if status >= 500:
                    crashed.append((role, url, name, status))
            if browser.get(url).status_code >= 500:
                crashed.append((role, url, "-", 500))
    assert not crashed, crashed[:10]


@pytest.mark.parametrize(
    "url", ["/audit/?message=a%00b", "/audit/?patient_id=%00", "/staff/messages/new?to=%00"]
)
def test_nul_is_refused_with_400(app: Flask, url: str) -> None:
    browsers = signed_in(app)
    role = "staff" if url.startswith("/staff") else "auditor"
    assert browsers[role].get(url).status_code == 400


def test_nul_in_a_form_is_refused_with_400(app: Flask) -> None:
    browser = Browser(app)
    answer = browser.submit("/signin", {"email": "a\x00b@example.org", "password": "x"})
    assert answer.status_code == 400


def test_control_characters_in_the_user_agent_are_not_stored(app: Flask) -> None:
    agent = "evil\x00agent\x07" + "x" * 999
    answer = Browser(app).submit(
        "/signin",
        {"email": "nobody@example.org", "password": "x" * 12},
        headers={"User-Agent": agent},
    )
    assert answer.status_code < 500
    with app.app_context():
        stored = db.session.scalars(select(AuditEvent.user_agent)).all()
    assert stored, "the failed sign-in is audited"
    assert all(s and s.startswith("evilagentx") and len(s) <= 256 for s in stored)
