"""A request every upload route will refuse (signed out, wrong role, another team's or
patient's conversation, past the rate limit, no valid CSRF token before its files) never
makes the portal stage its files: no temporary blob, no encryption, no scan and no
``upload.scanned`` event; the route still answers as it always did (issue 14 review,
defect 1; the CSRF token and the staff rate limit: the review's second round)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import pytest
from flask import Flask, request
from flask.testing import FlaskClient
from flask_login import login_user
from limits import parse_many

from portal.extensions import db, limiter
from portal.pickup.limits import PATIENT_STARTS, PATIENT_WRITES
from portal.services import accounts
from portal.staff.limits import STAFF_SENDS
from portal.web.errors import CSRF_MESSAGE
from portal.web.limits import SharedLimit
from tests.browser_client import Browser
from tests.support.clamd import Clamd
from tests.support.conversations import (
    OPEN_TEAM,
    PATIENT,
    PEOPLE,
    World,
    public_id_of,
    team_public_id,
    thread_url,
)
from tests.support.scanning import scan_events, scan_with, stored_files
from tests.support.teams import TEST_TEAM
from tests.support.uploads import Multipart, Part

# Big enough that staging it would be seen (several pipeline pieces, a scan that takes time).
LARGE = b"%PDF-1.4\n" + bytes(range(256)) * (16 * 1024)  # 4 MiB


@dataclass(frozen=True)
class Refused:
    """One upload route, someone it refuses, and the answer they get today."""

    route: str
    who: str  # a World browser, or "anonymous"
    status: int
    spent: SharedLimit | None = None  # the limit this caller has used up first


CASES = {
    "compose-anonymous": Refused("compose", "anonymous", 302),
    "compose-patient": Refused("compose", "patient", 403),
    "compose-unknown-patient": Refused("compose-nobody", "sam", 404),
    "compose-rate-limited": Refused("compose", "sam", 429, STAFF_SENDS),
    "answer-rate-limited": Refused("answer", "sam", 429, STAFF_SENDS),
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


def key_of(app: Flask, limit: SharedLimit, email: str) -> str:
    """The key ``limit``'s own key function gives ``email`` when signed in."""
    with app.test_request_context():
        user = accounts.find_by_email(db.session, email)
        assert user is not None
        login_user(user)
        key = limit.key()
    assert public_id_of(app, email) in key
    return key


def use_up(app: Flask, limit: SharedLimit, email: str) -> None:
    """Count ``limit`` to its end for ``email``, as their requests would have."""
    key = key_of(app, limit, email)
    with app.app_context():
        for item in parse_many(limit.value):
            for _ in range(item.amount):
                limiter.limiter.hit(item, *limit.names(key))


def post_large(world: World, case: Refused) -> tuple[Any, Any, int | None]:
    """POST the large file as ``case.who``; (response, the request's staging, files dropped)."""
    client, token = client_and_token(world, case.who)
    if case.spent is not None:
        use_up(world.app, case.spent, PEOPLE[case.who])
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


# --- the CSRF token comes before the files ---------------------------------------------------

# Each upload route and a caller it takes: only the CSRF token differs from a good request.
ALLOWED = {"compose": "sam", "answer": "sam", "start": "patient", "write": "patient"}
# How the token is wrong: the body's parts in order (a file between fields), or no token.
TOKENS = ["bad-token", "missing-token", "another-session's-token", "token-after-the-file"]


def raw_post(world: World, route: str, how: str) -> tuple[Any, Any, int | None]:
    """POST ``route``'s form as ``ALLOWED[route]``, its parts in the order given by ``how``
    ("good": token first, as every form of the portal sends it); (response, staging,
    files dropped)."""
    client, token = client_and_token(world, ALLOWED[route])
    tokens = {
        "good": token,
        "bad-token": "not-a-token",
        "another-session's-token": Browser(world.app).token("/signin"),
        "token-after-the-file": token,
    }
    fields = [Part(name, value.encode()) for name, value in fields_of(world, route).items()]
    upload = Part(
        "attachments", LARGE, filename="Quagmire_letter.pdf", content_type="application/pdf"
    )
    csrf = [Part("csrf_token", tokens[how].encode())] if how in tokens else []
    parts = [*fields, upload, *csrf] if how == "token-after-the-file" else [*csrf, *fields, upload]
    body = Multipart(parts)
    with client:
        response = client.post(
            url_of(world, route), data=body.data(), content_type=body.content_type
        )
        return (
            response,
            getattr(request, "upload_staging", None),
            getattr(request, "dropped_files", None),
        )


@pytest.mark.parametrize("how", TOKENS)
@pytest.mark.parametrize("route", sorted(ALLOWED))
def test_no_file_is_staged_before_a_valid_csrf_token(
    world: World, clamd: Clamd, route: str, how: str
) -> None:
    """Regression: the token is in the body, and Flask-WTF checks it only once the whole body
    is parsed; the files of a forged request (a cross-site page posting with a signed-in
    member's cookie) were staged, encrypted, scanned and their verdict audited first."""
    scan_with(world.app, str(clamd.socket_path))
    before = stored_files(world.app)
    response, staging, dropped = raw_post(world, route, how)
    page = response.get_data(as_text=True)
    assert response.status_code == 400, page[:300]
    assert CSRF_MESSAGE in page
    assert staging is None  # no temporary blob begun, nothing encrypted nor sent to clamd
    assert stored_files(world.app) == before
    assert scan_events(world.app) == []
    assert dropped == 1


@pytest.mark.parametrize("route", sorted(ALLOWED))
def test_a_token_before_the_files_still_has_them_staged_and_scanned(
    world: World, clamd: Clamd, route: str
) -> None:
    """The control: each form of the portal, in the order its page sends it (token first)."""
    scan_with(world.app, str(clamd.socket_path))
    response, staging, dropped = raw_post(world, route, "good")
    assert staging is not None
    assert not dropped
    assert [e["details"]["verdict"] for e in scan_events(world.app)] == ["clean"]
    assert response.status_code in {302, 400}  # sent, or refused as not a PDF: scanned first
    assert CSRF_MESSAGE not in response.get_data(as_text=True)


# --- staff sending is rate limited per member of staff ---------------------------------------


def test_the_staff_limit_counts_per_member_of_staff(world: World, clamd: Clamd) -> None:
    """sam past the limit gets 429 with nothing staged; ada, in the same team, answers the same
    conversation with a file, staged and scanned, as if sam had sent nothing."""
    scan_with(world.app, str(clamd.socket_path))
    use_up(world.app, STAFF_SENDS, PEOPLE["sam"])
    refused, staging, dropped = post_large(world, Refused("answer", "sam", 429))
    assert refused.status_code == 429
    assert staging is None
    assert dropped == 1
    assert scan_events(world.app) == []
    response, staging, dropped = post_large(world, Refused("answer", "ada", 302))
    assert response.status_code in {302, 400}, response.get_data(as_text=True)[:300]
    assert staging is not None
    assert not dropped
    assert [e["details"]["verdict"] for e in scan_events(world.app)] == ["clean"]


def test_the_staff_limit_is_counted_by_the_views_on_post_only(world: World) -> None:
    """Each compose or answer POST counts once against one allowance; a GET counts nothing."""
    key = key_of(world.app, STAFF_SENDS, PEOPLE["sam"])
    hourly = parse_many(STAFF_SENDS.value)[0]

    def used() -> int:
        with world.app.app_context():
            window = limiter.limiter.get_window_stats(hourly, *STAFF_SENDS.names(key))
            return hourly.amount - window.remaining

    assert world.sam.get(url_of(world, "compose")).status_code == 200
    assert used() == 0
    client, token = client_and_token(world, "sam")
    fields = {"csrf_token": token, **fields_of(world, "compose")}
    assert client.post(url_of(world, "compose"), data=fields).status_code == 302
    answer = {"csrf_token": token, "body": "Thank you."}
    assert client.post(url_of(world, "answer"), data=answer).status_code == 302
    assert used() == 2


# --- the parser that reads the token first is Werkzeug's -------------------------------------


def _parse(parser: Any, boundary: bytes, body: bytes) -> Any:
    """What ``parser`` makes of ``body``: its fields and files, or the kind of error it raised."""
    try:
        form, files = parser.parse(io.BytesIO(body), boundary, len(body))
    except Exception as error:  # the kind of error is what is compared
        return type(error)
    return (
        list(form.items(multi=True)),
        [(n, f.filename, f.content_type, f.stream.read()) for n, f in files.items(multi=True)],
    )


def _bodies() -> dict[str, tuple[bytes, bytes]]:
    parts = [
        Part("csrf_token", b"t"),
        Part("body", "Résumé ✓".encode()),
        Part("latin", "café".encode("iso-8859-1"), content_type="text/plain; charset=iso-8859-1"),
        Part("attachments", LARGE, filename="a.pdf", content_type="application/pdf"),
        Part("attachments", b"", filename=""),
        Part("after", b"x"),
    ]
    good = Multipart(parts)
    raw, closing = good.data(), b"--" + good.boundary + b"--\r\n"
    big = Multipart([Part("body", b"x" * 600_000)])
    many = Multipart([Part(f"f{i}", b"x") for i in range(30)])
    return {
        "fields-and-files": (good.boundary, raw),
        "no-closing-boundary": (good.boundary, raw[: -len(closing)]),
        "cut-in-a-file": (good.boundary, raw[: len(raw) // 2]),
        "field-past-the-memory-limit": (big.boundary, big.data()),
        "too-many-parts": (many.boundary, many.data()),
        "empty": (good.boundary, b""),
    }


@pytest.mark.parametrize("name", sorted(_bodies()))
def test_the_parser_reads_every_body_as_werkzeugs_does(name: str) -> None:
    from werkzeug.formparser import MultiPartParser

    from portal.web.uploads import PARSE_CHUNK, _MultiPartParser

    boundary, body = _bodies()[name]
    options: dict[str, Any] = {
        "max_form_memory_size": 500_000,
        "max_form_parts": 20,
        "buffer_size": PARSE_CHUNK,
    }
    seen: list[tuple[str, str]] = []
    ours = _parse(_MultiPartParser(lambda n, v: seen.append((n, v)), **options), boundary, body)
    assert ours == _parse(MultiPartParser(**options), boundary, body)
    if isinstance(ours, tuple):  # each field told as it ended, in order, files left out
        assert seen == ours[0]
