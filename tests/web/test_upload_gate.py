"""A request every upload route will refuse (signed out, wrong role, another team's or
patient's conversation, past the rate limit) never makes the portal stage its files: no
temporary blob, no encryption, no scan and no ``upload.scanned`` event; the route still
answers as it always did (issue 14 review, defect 1)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import pytest
from flask import Flask, request
from flask.testing import FlaskClient
from limits import parse_many

from portal.extensions import limiter
from portal.pickup.limits import PATIENT_STARTS, PATIENT_WRITES
from portal.web.limits import SharedLimit
from tests.browser_client import Browser
from tests.support.clamd import Clamd
from tests.support.conversations import (
    OPEN_TEAM,
    PATIENT,
    World,
    public_id_of,
    team_public_id,
    thread_url,
)
from tests.support.scanning import scan_events, scan_with, stored_files
from tests.support.teams import TEST_TEAM

# Big enough that staging it would be seen (several pipeline pieces, a scan that takes time).
LARGE = b"%PDF-1.4\n" + bytes(range(256)) * (16 * 1024)  # 4 MiB


@dataclass(frozen=True)
class Refused:
    """One upload route, someone it refuses, and the answer they get today."""

    route: str
    who: str  # a World browser, or "anonymous"
    status: int
    spent: SharedLimit | None = None  # the limit this patient has used up first


CASES = {
    "compose-anonymous": Refused("compose", "anonymous", 302),
    "compose-patient": Refused("compose", "patient", 403),
    "compose-unknown-patient": Refused("compose-nobody", "sam", 404),
    "answer-other-team": Refused("answer", "olive", 404),
    "answer-patient": Refused("answer", "patient", 403),
    "start-staff": Refused("start", "sam", 403),
    "start-rate-limited": Refused("start", "patient", 429, PATIENT_STARTS),
    "write-other-patient": Refused("write", "other_patient", 404),
    "write-staff": Refused("write", "sam", 403),
    "write-rate-limited": Refused("write", "patient", 429, PATIENT_WRITES),
    "write-anonymous": Refused("write", "anonymous", 302),
}


def url_of(world: World, route: str) -> str:
    return {
        "compose": f"/staff/messages/new?to={public_id_of(world.app, PATIENT)}",
        "compose-nobody": "/staff/messages/new?to=" + "0" * 32,
        "answer": thread_url(world.conversation) + "/answer",
        "start": "/conversations/new",
        "write": f"/conversations/{world.conversation}/write",
    }[route]


def fields_of(world: World, route: str) -> dict[str, str]:
    """Every field a caller allowed on ``route`` would send, so only the caller differs."""
    if route.startswith("compose"):
        return {
            "subject": "Results",
            "body": "See the attached letter.",
            "body_format": "text",
            "expires_days": "7",
            "team": team_public_id(world.app, TEST_TEAM),
        }
    if route == "start":
        return {"team": team_public_id(world.app, OPEN_TEAM), "subject": "A rash", "body": "B"}
    return {"body": "See the attached letter."}


def client_and_token(world: World, who: str) -> tuple[FlaskClient, str]:
    """A client signed in as ``who`` (or not signed in), and a CSRF token of its session."""
    if who == "anonymous":
        browser = Browser(world.app)
        return browser.client, browser.token("/signin")
    browser = world.browser(who)
    page = "/staff/patients" if who in {"sam", "ada", "olive"} else "/conversations/new"
    return browser.client, browser.token(page)


def use_up(app: Flask, limit: SharedLimit, email: str) -> None:
    """Count ``limit`` to its end for the patient ``email``, as their requests would have."""
    key = "patient:" + public_id_of(app, email)
    with app.app_context():
        for item in parse_many(limit.value):
            for _ in range(item.amount):
                limiter.limiter.hit(item, *limit.names(key))


def post_large(world: World, case: Refused) -> tuple[Any, Any, int | None]:
    """POST the large file as ``case.who``; (response, the request's staging, files dropped)."""
    client, token = client_and_token(world, case.who)
    if case.spent is not None:
        use_up(world.app, case.spent, PATIENT)
    data: dict[str, Any] = {
        "csrf_token": token,
        **fields_of(world, case.route),
        "attachments": (io.BytesIO(LARGE), "Quagmire_letter.pdf"),
    }
    with client:  # keeps the request's context, so its staging can be looked at
        response = client.post(
            url_of(world, case.route), data=data, content_type="multipart/form-data"
        )
        return (
            response,
            getattr(request, "upload_staging", None),
            getattr(request, "dropped_files", None),
        )


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_refused_caller_gets_no_file_staged_scanned_or_audited(
    world: World, clamd: Clamd, name: str
) -> None:
    case = CASES[name]
    scan_with(world.app, str(clamd.socket_path))
    before = stored_files(world.app)
    response, staging, dropped = post_large(world, case)
    assert response.status_code == case.status, response.get_data(as_text=True)[:300]
    assert staging is None  # no temporary blob begun, nothing encrypted nor sent to clamd
    assert stored_files(world.app) == before
    assert scan_events(world.app) == []
    assert dropped == 1  # the file part was read, and dropped


def test_an_allowed_caller_still_has_the_file_staged_scanned_and_audited(
    world: World, clamd: Clamd
) -> None:
    """The control: the same request from the conversation's own team is staged and scanned."""
    scan_with(world.app, str(clamd.socket_path))
    response, staging, dropped = post_large(world, Refused("answer", "sam", 400))
    assert staging is not None
    assert not dropped
    assert [e["details"]["verdict"] for e in scan_events(world.app)] == ["clean"]
    assert response.status_code in {302, 400}  # sent, or refused as not a PDF: scanned first


@pytest.mark.parametrize("name", ["start-rate-limited", "write-rate-limited"])
def test_the_rate_limit_peek_counts_under_the_prefix_the_limiter_kept(
    make_app: Any, clamd: Clamd, name: str
) -> None:
    """Regression: an earlier app of the process gave the limiter a key prefix, which
    Flask-Limiter keeps for every later app; the gate looked under this app's (empty) prefix,
    found the limit unspent where the view found it spent, or the reverse, and answered 409."""
    from tests.support.conversations import build_world

    make_app(RATELIMIT_KEY_PREFIX="pp-an-earlier-app")
    app = make_app()
    with app.app_context():
        limiter.reset()
    world = build_world(app)
    case = CASES[name]
    scan_with(world.app, str(clamd.socket_path))
    response, staging, dropped = post_large(world, case)
    assert response.status_code == 429
    assert staging is None
    assert dropped == 1
    assert scan_events(world.app) == []
