"""Odd file names and multipart edge cases on the streaming upload path: each gets a clear
answer, no stack trace, and nothing stored (issue 13 item 3)."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from werkzeug.test import TestResponse

from portal.extensions import db
from portal.models import Message
from portal.services import messages
from tests.factories import MINIMAL_PDF
from tests.support.uploads import (
    NOTHING_STORED,
    Composer,
    Multipart,
    Part,
    attachments_plaintext,
    compose_body,
    staff_composer,
    stored,
)

MALFORMED = "The form could not be read"
NAMELESS = "A file was sent without a file name"
NOT_HERE = "This page does not take files."


@pytest.fixture
def composer(app: Flask) -> Composer:
    return staff_composer(app)


def send(app: Flask, composer: Composer, body: Multipart | bytes, **kwargs: Any) -> TestResponse:
    """POST a raw body through the test client (no temp file: the body is in memory)."""
    client = app.test_client()
    name, _, value = composer.cookie.partition("=")
    client.set_cookie(name, value)
    data = body.data() if isinstance(body, Multipart) else body
    content_type = kwargs.pop("content_type", None) or (
        body.content_type if isinstance(body, Multipart) else "multipart/form-data"
    )
    return client.post(kwargs.pop("path", composer.path), data=data, content_type=content_type)


def refused(response: TestResponse, status: int, text: str) -> None:
    page = response.get_data(as_text=True)
    assert response.status_code == status, page[:300]
    assert text in page
    assert "Traceback" not in page


def stored_names(app: Flask) -> list[str]:
    with app.app_context():
        message = db.session.query(Message).one()
        return sorted(messages.read(db.session, message).filenames.values())


ODD_NAMES = {
    "../../etc/passwd.pdf": "passwd.pdf",
    # Backslashes escaped as quoted pairs, which Werkzeug unescapes.
    "C:\\\\Users\\\\sam\\\\scan.pdf": "scan.pdf",
    "\u202eevil\u202dfdp.pdf": "evilfdp.pdf",  # bidirectional overrides dropped
    "...": "document.pdf",
    "a" * 5000 + ".pdf": "a" * 255,
    "Résumé ✓ 2026.pdf": "Résumé ✓ 2026.pdf",
    "nul\x00byte.pdf": "nulbyte.pdf",
    "<script>x</script>.pdf": "script.pdf",
}


def test_odd_file_names_are_kept_safe(app: Flask, composer: Composer) -> None:
    files = [(sent_as, MINIMAL_PDF) for sent_as in ODD_NAMES]
    response = send(app, composer, compose_body(composer.csrf, files))
    assert response.status_code == 302, response.get_data(as_text=True)[:300]
    assert stored_names(app) == sorted(ODD_NAMES.values())


def test_an_empty_file_input_is_no_file(app: Flask, composer: Composer) -> None:
    body = compose_body(composer.csrf, [("report.pdf", MINIMAL_PDF)])
    body.parts.insert(
        4, Part("attachments", b"", filename="", content_type="application/octet-stream")
    )
    assert send(app, composer, body).status_code == 302
    assert stored(app) == {"messages": 1, "attachments": 1, "blobs": 1, "partial": 0}


def test_a_file_without_a_name_is_refused(app: Flask, composer: Composer) -> None:
    for part in (
        Part("attachments", MINIMAL_PDF),  # a field, not a file: no filename parameter at all
        Part("attachments", MINIMAL_PDF, filename=""),  # content, but an empty name
    ):
        body = compose_body(composer.csrf, [])
        body.parts.insert(4, part)
        refused(send(app, composer, body), 400, NAMELESS)
        assert stored(app) == NOTHING_STORED


def test_a_file_in_another_field_is_refused(app: Flask, composer: Composer) -> None:
    body = compose_body(composer.csrf, [("report.pdf", MINIMAL_PDF)])
    body.parts[4].name = "photos"
    refused(send(app, composer, body), 400, NOT_HERE)
    assert stored(app) == NOTHING_STORED


def test_a_page_that_takes_no_files_refuses_one_unstored(app: Flask, composer: Composer) -> None:
    body = Multipart(
        [
            Part("csrf_token", composer.csrf.encode()),
            Part("intent", b"find"),
            Part("email", b"zq@example.org"),
            Part("photo", MINIMAL_PDF * 1000, filename="x.pdf"),
        ]
    )
    refused(send(app, composer, body, path="/staff/patients"), 400, NOT_HERE)
    assert stored(app) == NOTHING_STORED


def test_more_files_than_a_message_takes_are_refused(app: Flask, composer: Composer) -> None:
    files = [(f"page-{n}.pdf", MINIMAL_PDF) for n in range(21)]
    refused(send(app, composer, compose_body(composer.csrf, files)), 413, "at most 20 files")
    assert stored(app) == NOTHING_STORED


def test_twenty_files_are_taken(app: Flask, composer: Composer) -> None:
    files = [(f"page-{n:02}.pdf", MINIMAL_PDF) for n in range(20)]
    assert send(app, composer, compose_body(composer.csrf, files)).status_code == 302
    assert stored_names(app) == [f"page-{n:02}.pdf" for n in range(20)]
    assert stored(app)["partial"] == 0


def test_many_parts_are_refused(app: Flask, composer: Composer) -> None:
    body = compose_body(composer.csrf, [])
    body.parts += [Part(f"x{n}", b"1") for n in range(1000)]  # Flask's MAX_FORM_PARTS: 1000
    refused(send(app, composer, body), 413, "larger than this portal accepts")
    assert stored(app) == NOTHING_STORED


def test_a_huge_part_header_is_refused(app: Flask, composer: Composer) -> None:
    body = compose_body(composer.csrf, [("report.pdf", MINIMAL_PDF)])
    body.parts[4].headers = b"X-Padding: " + b"p" * 600_000 + b"\r\n"  # over 500 kB of header
    refused(send(app, composer, body), 413, "larger than this portal accepts")
    assert stored(app) == NOTHING_STORED


def test_a_field_over_the_form_memory_limit_is_refused(app: Flask, composer: Composer) -> None:
    body = compose_body(composer.csrf, [], body="x" * 600_000)
    refused(send(app, composer, body), 413, "larger than this portal accepts")
    assert stored(app) == NOTHING_STORED


def malformed_bodies(csrf: str) -> dict[str, tuple[bytes, str]]:
    good = compose_body(csrf, [("report.pdf", MINIMAL_PDF)])
    raw = good.data()
    kind = good.content_type
    closing = b"--" + good.boundary + b"--\r\n"
    no_disposition = raw.replace(
        b'Content-Disposition: form-data; name="subject"\r\n', b"X-Other: 1\r\n", 1
    )
    bad_header = raw.replace(b'name="subject"', b'name="subj\xff\xfeect"', 1)
    return {
        "no-boundary": (raw, "multipart/form-data"),
        "truncated": (raw[: len(raw) // 2], kind),
        "no-closing-boundary": (raw[: -len(closing)], kind),
        "no-disposition": (no_disposition, kind),
        "undecodable-header": (bad_header, kind),
        "garbage": (b"\x00\x01 not multipart at all", kind),
    }


def test_a_malformed_body_is_refused(app: Flask, composer: Composer) -> None:
    for case, (raw, kind) in malformed_bodies(composer.csrf).items():
        response = send(app, composer, raw, content_type=kind)
        assert response.status_code == 400, case
        assert MALFORMED in response.get_data(as_text=True), case
        assert "Traceback" not in response.get_data(as_text=True)
        assert stored(app) == NOTHING_STORED, case


def test_files_encrypted_before_the_message_open_with_its_key(
    app: Flask, composer: Composer
) -> None:
    """A request's files are encrypted as they arrive, under the key the message then gets."""
    files = [("a.pdf", MINIMAL_PDF), ("b.pdf", MINIMAL_PDF + b"%second\n")]
    assert send(app, composer, compose_body(composer.csrf, files)).status_code == 302
    found = attachments_plaintext(app)
    assert [(name, data) for name, data, _, _ in found] == [
        ("a.pdf", MINIMAL_PDF),
        ("b.pdf", MINIMAL_PDF + b"%second\n"),
    ]
    assert all(sha256 == actual for _, _, sha256, actual in found)


def test_files_of_a_form_that_fails_its_checks_are_not_kept(app: Flask, composer: Composer) -> None:
    """The files arrived (encrypted, as temporary blobs) before the form was judged."""
    no_subject = compose_body(composer.csrf, [("report.pdf", MINIMAL_PDF)], subject="")
    response = send(app, composer, no_subject)
    assert response.status_code == 200
    assert "Enter a subject" in response.get_data(as_text=True)
    assert stored(app) == NOTHING_STORED
    bad_token = compose_body("not-the-token", [("report.pdf", MINIMAL_PDF)])
    refused(send(app, composer, bad_token), 400, "This form has expired")
    assert stored(app) == NOTHING_STORED
