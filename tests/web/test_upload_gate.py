"""A request every upload route will refuse (signed out, wrong role, another team's or
patient's conversation, past the rate limit, no valid CSRF token before its files) never
makes the portal stage its files: no temporary blob, no encryption, no scan and no
``upload.scanned`` event; the route still answers as it always did (issue 14 review,
defect 1; the CSRF token and the staff rate limit: the review's second round)."""

from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass
from typing import Any, cast

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
    from portal.web.uploads import PARSE_CHUNK

    boundary, body = _bodies()[name]
    _compare(body, PARSE_CHUNK, boundary)


# --- ... and writes the bulk of a file past Werkzeug's decoder, changing no byte ---------------

BOUNDARY = b"----parity-7d1e"
HOLD = len(b"\r\n--" + BOUNDARY)  # the bytes the shortcut leaves to the decoder (K)
# Werkzeug's delimiter (its MultipartDecoder.boundary_re), the boundary in group 1.
_DELIMITER = re.compile(rb"(?:\r\n|\n|\r)(--%s)(?:--|[ \t]*(?:\r\n|\n|\r))" % BOUNDARY)


def _read_sizes() -> list[int]:
    from portal.web.uploads import PARSE_CHUNK

    return [1, 2, 3, HOLD - 1, HOLD, HOLD + 1, 7, 64, 4096, PARSE_CHUNK]


def _file(name: str, filename: str, content: bytes, lb: bytes = b"\r\n") -> bytes:
    disposition = b'Content-Disposition: form-data; name="%s"; filename="%s"' % (
        name.encode(),
        filename.encode(),
    )
    return disposition + lb + b"Content-Type: application/octet-stream" + lb + lb + content


def _field(name: str, value: bytes, lb: bytes = b"\r\n") -> bytes:
    return b'Content-Disposition: form-data; name="%s"' % name.encode() + lb + lb + value


def _body(
    parts: list[bytes],
    *,
    lb: bytes = b"\r\n",
    preamble: bytes = b"",
    epilogue: bytes = b"",
    closing: bytes = b"--",
) -> bytes:
    """A multipart body of ``parts`` (each a part's headers, blank line and content), every
    delimiter's line break ``lb``; ``closing``: what follows the last boundary."""
    body = preamble + (lb if preamble else b"")
    for part in parts:
        body += b"--" + BOUNDARY + lb + part + lb
    return body + b"--" + BOUNDARY + closing + lb + epilogue


def _tricky(seed: int, size: int, *, delimiters: bool = False) -> bytes:
    """File data made of what a delimiter is made of: line breaks, dashes, the boundary whole
    and cut short, blanks, plain and random bytes, in a random order (``seed``). Those pieces
    can make a real delimiter (which ends the part there): only when ``delimiters``."""
    rng = random.Random(seed)
    pieces = [
        b"\r",
        b"\n",
        b"\r\n",
        b"-",
        b"--",
        b" ",
        b"\t",
        b"x",
        BOUNDARY,
        b"--" + BOUNDARY,
        b"\r\n--" + BOUNDARY + b"x",  # a boundary line that is no delimiter (Werkzeug's rule)
        b"\n--" + BOUNDARY[:-1],
        b"\r\n--" + BOUNDARY[: rng.randrange(len(BOUNDARY))],
        b"\r--" + BOUNDARY[:5] + b"\r\n",
    ]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(pieces) if rng.random() < 0.6 else rng.randbytes(rng.randrange(1, 40))
    del out[size:]
    while not delimiters and (found := _DELIMITER.search(out)):
        out[found.end(1) : found.end(1)] = b"x"  # "--boundaryx" delimits nothing
    return bytes(out)


def _small_bodies() -> dict[str, bytes]:
    bodies = {
        "file-of-delimiter-bits": _body(
            [_field("csrf_token", b"t"), _file("f", "a.bin", _tricky(1, 3000))]
        ),
        "several-files-and-fields": _body(
            [
                _field("csrf_token", b"t"),
                _file("f", "a.bin", _tricky(2, 1500)),
                _field("between", b"\r\n--" + BOUNDARY[:4]),
                _file("f", "b.bin", _tricky(3, 1200)),
                _file("f", "", b""),
                _file("g", "c.bin", b"\r\n" * 300),
                _field("after", b"x"),
            ]
        ),
        "empty-file": _body([_file("f", "e.bin", b""), _field("after", b"y")]),
        "file-ends-with-line-breaks": _body([_file("f", "a.bin", b"abc" * 100 + b"\r\n\r")]),
        "file-ends-with-dashes": _body([_file("f", "a.bin", b"z" * 300 + b"\r\n--")]),
        "bare-lf-delimiters": _body(
            [_field("csrf_token", b"t"), _file("f", "a.bin", _tricky(4, 2000), b"\n")], lb=b"\n"
        ),
        "bare-cr-delimiters": _body([_file("f", "a.bin", b"q" * 700 + b"\n\n", b"\r")], lb=b"\r"),
        "preamble-and-epilogue": _body(
            [_file("f", "a.bin", _tricky(5, 1000))],
            preamble=b"This is a preamble.",
            epilogue=b"and an epilogue\r\n--" + BOUNDARY + b"\r\n",
        ),
        "padded-delimiters": _body([_file("f", "a.bin", _tricky(6, 900))], closing=b"--  \t"),
        # A delimiter inside what looks like file data ends the part there.
        "early-close": _body([_file("f", "a.bin", b"w" * 500 + b"\r\n--" + BOUNDARY + b"--")]),
    }
    for seed in range(12):
        rng = random.Random(100 + seed)
        parts = [
            _file(
                "f", f"{i}.bin", _tricky(200 + seed * 10 + i, rng.randrange(2500), delimiters=True)
            )
            if rng.random() < 0.7
            else _field(f"v{i}", _tricky(300 + seed * 10 + i, rng.randrange(60), delimiters=True))
            for i in range(rng.randrange(1, 4))
        ]
        bodies[f"random-{seed}"] = _body(parts)
    good = bodies["several-files-and-fields"]
    bodies["no-closing-boundary"] = good[: -len(b"--" + BOUNDARY + b"--\r\n")]
    bodies["cut-in-a-file"] = good[: len(good) // 3]
    bodies["cut-after-a-file"] = good[: good.index(b'name="between"') - 10]
    bodies["no-headers-end"] = b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data"
    bodies["no-disposition"] = b"--" + BOUNDARY + b"\r\nX: y\r\n\r\nz\r\n--" + BOUNDARY + b"--\r\n"
    return bodies


def _compare(body: bytes, read_size: int, boundary: bytes = BOUNDARY) -> None:
    """The portal's parser and Werkzeug's make the same of ``body`` read ``read_size`` bytes
    at a time (fields, files, or the kind of error), and the portal's told each field as it
    ended, in order, files left out."""
    from werkzeug.formparser import MultiPartParser

    from portal.web.uploads import _MultiPartParser

    options: dict[str, Any] = {
        "max_form_memory_size": 500_000,
        "max_form_parts": 20,
        "buffer_size": read_size,
    }
    seen: list[tuple[str, str]] = []
    ours = _parse(_MultiPartParser(lambda n, v: seen.append((n, v)), **options), boundary, body)
    theirs = _parse(MultiPartParser(**options), boundary, body)
    assert ours == theirs, f"read size {read_size}"
    if isinstance(ours, tuple):
        assert seen == ours[0]


@pytest.mark.parametrize("name", sorted(_small_bodies()))
def test_files_and_fields_are_werkzeugs_whatever_the_read_size(name: str) -> None:
    body = _small_bodies()[name]
    for size in _read_sizes():
        _compare(body, size)


def test_a_body_werkzeug_fails_fails_the_same_way() -> None:
    """The malformed bodies above fail as Werkzeug's do (ValueError: the 400), at every size."""
    bodies = _small_bodies()
    for name in ("no-closing-boundary", "cut-in-a-file", "no-headers-end", "no-disposition"):
        from werkzeug.formparser import MultiPartParser

        assert _parse(MultiPartParser(), BOUNDARY, bodies[name]) is ValueError, name
        for size in _read_sizes():
            _compare(bodies[name], size)


@pytest.mark.parametrize("read_size", [HOLD - 1, HOLD, HOLD + 1, 7, 64])
def test_every_split_of_a_delimiter_across_reads_is_werkzeugs(read_size: int) -> None:
    """Each byte of every delimiter, and of the boundary-like bytes before it, falls on a read's
    edge in one of these bodies (the file grows a byte at a time). Werkzeug's own quirk comes
    out the same: a read ending just after ``\\r\\n--boundary-`` leaves a CR in the file."""
    tail = b"\r\n--" + BOUNDARY[:3] + b"\r\r\n\n--" + BOUNDARY + b" \r\n-"
    for pad in range(read_size + HOLD + 2):
        content = b"p" * (read_size + pad) + tail
        body = _body([_file("f", "a.bin", content), _file("f", "b.bin", content)])
        _compare(body, read_size)
        _compare(_body([_file("f", "a.bin", content, b"\n")], lb=b"\n"), read_size)


def test_large_files_are_werkzeugs_at_the_parsers_read_size() -> None:
    """Files of several reads (the shortcut's case), binary and boundary-like, among fields."""
    rng = random.Random(7)
    body = _body(
        [
            _field("csrf_token", b"t"),
            _file("f", "big.bin", rng.randbytes(700_000)),
            _file("f", "tricky.bin", _tricky(8, 600_000)),
            _field("note", b"n"),
            _file("f", "lines.bin", b"\r\n" * 200_000),
        ]
    )
    for size in (64, 4096, HOLD + 1, *_read_sizes()[-1:]):
        _compare(body, size)


def test_the_bulk_of_a_file_reaches_its_stream_uncopied() -> None:
    """The file's bytes are written as views of the body's own reads, not copies of them
    (Werkzeug's decoder copies each byte about four times on its way)."""
    from portal.web.uploads import PARSE_CHUNK, _MultiPartParser

    content = random.Random(9).randbytes(4 * PARSE_CHUNK)
    body = _body([_field("csrf_token", b"t"), _file("f", "a.bin", content)])
    reads: list[bytes] = []
    written: list[object] = []

    class Recording(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            data = super().read(size)
            reads.append(data)
            return data

    class Sink(io.BytesIO):
        def write(self, data: Any) -> int:
            written.append(data)
            return super().write(data)

    parser = _MultiPartParser(
        lambda n, v: None, stream_factory=lambda **_: Sink(), buffer_size=PARSE_CHUNK
    )
    _, files = parser.parse(Recording(body), BOUNDARY, len(body))
    assert files["f"].stream.read() == content
    uncopied = [d for d in written if isinstance(d, memoryview) and any(d.obj is r for r in reads)]
    assert sum(len(d) for d in uncopied) >= len(content) - 2 * PARSE_CHUNK


def test_werkzeugs_decoder_is_the_one_the_shortcut_was_written_for() -> None:
    """Pins what ``_write_through`` relies on in Werkzeug's ``MultipartDecoder``: should this
    fail, read the shortcut's docstring again against the new decoder before changing this.

    Its state is ``decoder.state``, ``State.DATA`` inside a part; the bytes it holds back in
    ``decoder.buffer``, a bytearray, are at most a delimiter's length, and it reads that
    buffer afresh at each step (the shortcut puts the tail it leaves there)."""
    from werkzeug.sansio.multipart import Data, File, MultipartDecoder, NeedData, Preamble, State

    decoder = MultipartDecoder(BOUNDARY)
    assert decoder.state is State.PREAMBLE
    assert isinstance(decoder.buffer, bytearray)
    head = b"--" + BOUNDARY + b"\r\n" + _file("f", "a.bin", b"")
    decoder.receive_data(head + b"0123456789\r\n--" + BOUNDARY[:3])
    events = []
    while not isinstance(event := decoder.next_event(), NeedData):
        events.append(event)
    assert [type(e) for e in events] == [Preamble, File, Data]
    assert decoder.state is State.DATA
    assert events[2] == Data(data=b"0123456789", more_data=True)
    assert decoder.buffer == b"\r\n--" + BOUNDARY[:3]  # held back: at most HOLD bytes
    decoder.buffer[:] = b"ABCDEF" + b"\r\n--" + BOUNDARY[:3]  # as _write_through leaves it
    decoder.receive_data(BOUNDARY[3:] + b"--\r\n")
    assert decoder.next_event() == Data(data=b"ABCDEF", more_data=False)
    assert decoder.state is State.EPILOGUE


def test_a_read_past_the_memory_limit_is_refused_as_werkzeug_refuses_it() -> None:
    """Werkzeug's decoder refuses a read that, with what it holds, passes its
    max_form_memory_size (413), also inside a file; the shortcut leaves such a read to it."""
    from werkzeug.exceptions import RequestEntityTooLarge
    from werkzeug.formparser import MultiPartParser

    from portal.web.uploads import _MultiPartParser

    body = _body([_field("csrf_token", b"t"), _file("f", "a.bin", b"\0" * 300_000)])

    class ShortFirst(io.BytesIO):
        """Its first read short (as a socket's may be), the next as long as asked."""

        first = True

        def read(self, size: int | None = -1) -> bytes:
            if self.first:
                self.first = False
                return super().read(1000)
            return super().read(size)

    options: dict[str, Any] = {"max_form_memory_size": 100_000, "buffer_size": 200_000}
    for parser in (MultiPartParser(**options), _MultiPartParser(lambda n, v: None, **options)):
        with pytest.raises(RequestEntityTooLarge):
            parser.parse(ShortFirst(body), BOUNDARY, len(body))


@pytest.mark.parametrize("buffer_size", [995, 1000])
def test_a_memory_limit_just_above_the_read_size_is_werkzeugs(buffer_size: int) -> None:
    """After the shortcut the decoder holds what it would itself have held (usually
    nothing), not the last ``len("\r\n--" + boundary)`` bytes of every read: with
    max_form_memory_size between the read size and that much more, it refused every file
    longer than a read with 413 where Werkzeug takes it."""
    from werkzeug.formparser import MultiPartParser

    from portal.web.uploads import _MultiPartParser

    data = bytes(range(1, 256)).replace(b"\n", b"").replace(b"\r", b"") * 80  # 20 kB
    body = _body([_field("csrf_token", b"t"), _file("f", "a.bin", data)])
    options: dict[str, Any] = {"max_form_memory_size": 1000, "buffer_size": buffer_size}
    theirs = _parse(MultiPartParser(**options), BOUNDARY, body)
    ours = _parse(_MultiPartParser(lambda n, v: None, **options), BOUNDARY, body)
    assert theirs == ours
    assert theirs[1][0][3] == data


# --- the body is read without LimitedStream's copies, its limits and errors the same ----------


class _Server:
    """A server's body stream without ``readinto`` (gunicorn's): ``read`` answers from
    ``pieces`` (bytes given as they are, or an exception raised), then b"" (a hang-up)."""

    def __init__(self, *pieces: bytes | Exception) -> None:
        self.pieces = list(pieces)
        self.returned: list[bytes] = []

    def read(self, size: int) -> bytes:
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if isinstance(piece, Exception):
            raise piece
        head, rest = piece[:size], piece[size:]
        if rest:
            self.pieces.insert(0, rest)
        self.returned.append(head)
        return head


def _outcome(stream: Any, sizes: list[int]) -> list[object]:
    """What each read of ``stream`` gives: its bytes, or the type of what it raised."""
    got: list[object] = []
    for size in sizes:
        try:
            got.append(stream.read(size))
        except Exception as error:  # the kind of error is what is compared
            got.append(type(error))
            break
    return got


@pytest.mark.parametrize(
    ("pieces", "limit", "is_max", "sizes"),
    [
        ((b"a" * 100, b"b" * 50), 150, False, [64, 64, 64, 64]),  # the whole body
        ((b"a" * 100,), 150, False, [64, 64, 64]),  # the client hangs up early: 400
        ((b"a" * 100,), 150, True, [64, 64, 64]),  # ... under a maximum: the end
        ((b"a" * 200,), 150, True, [100, 100, 100]),  # past the maximum: 413
        ((b"a" * 200,), 150, False, [100, 100, 100]),  # past the length: not read
        ((b"a" * 10, OSError("reset")), 150, False, [10, 10]),  # a broken connection: 400
        ((b"a" * 10, ValueError("closed")), 150, True, [10, 10]),
        ((b"a" * 100,), 150, False, [0, -1]),
    ],
)
def test_the_body_reads_as_werkzeugs_limited_stream_reads_it(
    pieces: tuple[bytes | Exception, ...], limit: int, is_max: bool, sizes: list[int]
) -> None:
    from werkzeug.wsgi import LimitedStream

    from portal.web.uploads import _uncopied, _UncopiedBody

    server = _Server(*pieces)
    ours = _uncopied(cast(Any, LimitedStream(cast(Any, server), limit, is_max=is_max)))
    assert isinstance(ours, _UncopiedBody)
    theirs = LimitedStream(cast(Any, _Server(*pieces)), limit, is_max=is_max)
    got = _outcome(ours, sizes)
    assert got == _outcome(theirs, sizes)
    assert ours.tell() == theirs.tell()
    for data in got:  # the server's own bytes, not copies of them
        if isinstance(data, bytes) and data:
            assert any(data is returned for returned in server.returned)


def test_the_request_stream_werkzeug_gives_is_the_one_read_uncopied() -> None:
    """Pins what ``_uncopied`` relies on in Werkzeug: a request with a body is read through a
    LimitedStream, whose state is ``_stream``, ``_pos``, ``limit`` and ``_limit_is_max``
    (should this fail, the body is read through LimitedStream again, copies and all)."""
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request
    from werkzeug.wsgi import LimitedStream

    from portal.web.uploads import _uncopied, _UncopiedBody

    environ = EnvironBuilder(method="POST", data=b"0123456789").get_environ()
    environ["wsgi.input_terminated"] = True  # as gunicorn says
    got = Request(environ)
    got.max_content_length = 64
    stream = got.stream
    assert type(stream) is LimitedStream
    assert stream._stream is environ["wsgi.input"]
    assert (stream.limit, stream._limit_is_max, stream._pos) == (64, True, 0)
    assert stream.read(4) == b"0123"
    assert stream._pos == 4
    ours = _uncopied(stream)
    assert isinstance(ours, _UncopiedBody)
    assert ours.read(100) == b"456789"
    assert ours.read(100) == b""
    plain = io.BytesIO(b"x")
    assert _uncopied(plain) is plain
