"""Uploads stream from the request body into the encrypted store: no plaintext on any disk
(issue 13 item 3), over a real HTTP server on both databases.

Werkzeug's form parser used to spool every file over 500 KiB to an unlinked plaintext file in
the temp folder. The tests send a PDF that repeats a random canary on every line, stop halfway
and search every open file of this process (the server runs in it, so /proc/self/fd), the
private temp folder, the instance and the blob store; then again once the message is sent. The
same search finds the canary in Werkzeug's own spool (the control test), so it can fail.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flask
import pytest
from flask import Flask

from portal.services import content
from tests.support.uploads import (
    MIB,
    NOTHING_STORED,
    CanaryPdf,
    LiveServer,
    Multipart,
    attachments_plaintext,
    compose_body,
    files_holding,
    new_canary,
    open_files_holding,
    post,
    staff_composer,
    stored,
)

UPLOAD = 3 * MIB  # past Werkzeug's 500 KiB spool threshold, and many encryption segments
Serve = Callable[[Flask], LiveServer]


def disks(app: Flask, private_tmp: Path) -> list[Path]:
    """Everywhere the process writes: the temp folder, the instance (database, keyring, logs),
    the blob store (ciphertext and temporary blobs)."""
    with app.app_context():
        blobs = content.blob_store().root
    return [private_tmp, Path(app.instance_path), blobs]


def partial_blobs(app: Flask) -> list[Path]:
    """The temporary blobs (``.part``) in the store now (written behind: maybe still empty)."""
    with app.app_context():
        return list((content.blob_store().root / "tmp").iterdir())


class Midway:
    """A ``pause`` for ``post``: once ``at`` body bytes are out and the server has read all but
    its last read's worth, run ``check`` once (the upload is then halfway through)."""

    def __init__(self, server: LiveServer, at: int, check: Callable[[], None]) -> None:
        self.server, self.at, self.check, self.ran = server, at, check, False

    def __call__(self, sent: int) -> None:
        if not self.ran and sent >= self.at:
            self.server.monitor.wait_read(sent - 128 * 1024)
            self.check()
            self.ran = True


def test_an_upload_leaves_no_plaintext_on_any_disk(
    make_app: Callable[..., Flask], live: Serve, private_tmp: Path
) -> None:
    app = make_app()
    composer = staff_composer(app)
    server = live(app)
    canary = new_canary()
    body = compose_body(composer.csrf, [("results.pdf", CanaryPdf(UPLOAD, canary))])
    seen: dict[str, Any] = {}

    def halfway() -> None:
        seen["open"] = open_files_holding(canary)
        seen["disk"] = files_holding(canary, *disks(app, private_tmp))
        seen["parts"] = partial_blobs(app)

    midway = Midway(server, len(body) // 2, halfway)
    answer = post(server.port, composer.path, body, cookie=composer.cookie, pause=midway)
    assert answer.status == 302, answer.text[:500]
    assert midway.ran
    assert seen["open"] == []
    assert seen["disk"] == []
    assert len(seen["parts"]) == 1  # the upload was on its way into the store, encrypted
    assert open_files_holding(canary) == []
    assert files_holding(canary, *disks(app, private_tmp)) == []
    [(name, data, sha256, actual)] = attachments_plaintext(app)
    assert (name, len(data), sha256) == ("results.pdf", len(CanaryPdf(UPLOAD, canary)), actual)
    assert canary in data  # the search looked for what was really sent
    assert stored(app) == {"messages": 1, "attachments": 1, "blobs": 1, "partial": 0}


def test_the_search_finds_the_plaintext_werkzeugs_own_spool_writes(
    make_app: Callable[..., Flask], live: Serve, private_tmp: Path
) -> None:
    """The control: with Flask's stock request class the upload is spooled in plaintext to
    an unlinked file of the temp folder, and the same search finds it."""
    app = make_app()
    app.request_class = flask.Request
    composer = staff_composer(app)
    server = live(app)
    canary = new_canary()
    body = compose_body(composer.csrf, [("results.pdf", CanaryPdf(UPLOAD, canary))])
    seen: list[str] = []
    midway = Midway(server, len(body) // 2, lambda: seen.extend(open_files_holding(canary)))
    answer = post(server.port, composer.path, body, cookie=composer.cookie, pause=midway)
    assert answer.status < 500
    assert seen, "Werkzeug's spool file held the canary"
    assert all(path.startswith(str(private_tmp)) for path in seen), seen


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_file_over_the_limit_is_refused_as_it_streams(
    make_app: Callable[..., Flask], live: Serve, chunked: bool
) -> None:
    app = make_app(MAX_UPLOAD=MIB)  # a request may still carry MAX_UPLOAD + 1 MiB
    composer = staff_composer(app)
    server = live(app)
    body = compose_body(composer.csrf, [("big.pdf", CanaryPdf(MIB + MIB // 2, new_canary()))])
    answer = post(
        server.port,
        composer.path,
        body,
        cookie=composer.cookie,
        chunked=chunked,
        stop_after=len(body) - 256 * 1024,
    )
    assert answer.status == 413
    assert "larger than this portal accepts (at most 1 MiB)" in answer.text
    assert "Traceback" not in answer.text
    server.monitor.wait_done(1)
    assert stored(app) == NOTHING_STORED


def test_a_body_over_the_request_limit_is_refused_before_it_is_read(
    make_app: Callable[..., Flask], live: Serve
) -> None:
    app = make_app(MAX_UPLOAD=MIB)
    composer = staff_composer(app)
    server = live(app)
    body = compose_body(composer.csrf, [("big.pdf", CanaryPdf(3 * MIB, new_canary()))])
    answer = post(server.port, composer.path, body, cookie=composer.cookie, stop_after=0)
    assert answer.status == 413
    server.monitor.wait_done(1)
    assert stored(app) == NOTHING_STORED


def test_a_client_that_hangs_up_mid_upload_leaves_nothing(
    make_app: Callable[..., Flask], live: Serve
) -> None:
    app = make_app()
    composer = staff_composer(app)
    server = live(app)
    body = compose_body(composer.csrf, [("results.pdf", CanaryPdf(UPLOAD, new_canary()))])
    parts: list[Path] = []
    midway = Midway(server, len(body) // 2, lambda: parts.extend(partial_blobs(app)))
    answer = post(
        server.port,
        composer.path,
        body,
        cookie=composer.cookie,
        pause=midway,
        hang_up_after=len(body) // 2 + 256 * 1024,
    )
    assert answer.status == 0
    assert len(parts) == 1  # there was a temporary blob to clean up
    server.monitor.wait_done(1)
    assert stored(app) == NOTHING_STORED


@pytest.mark.parametrize(
    ("make_file", "error"),
    [
        (lambda canary: canary * 100_000, "bad.pdf: This file is not a PDF file."),
        (
            lambda canary: CanaryPdf(UPLOAD, canary).data()[: UPLOAD // 2] + b"garbage",
            "bad.pdf: This file could not be read as a PDF; it may be damaged.",
        ),
    ],
    ids=["not-a-pdf", "truncated"],
)
def test_an_invalid_pdf_gets_a_clear_error_and_nothing_is_stored(
    make_app: Callable[..., Flask],
    live: Serve,
    private_tmp: Path,
    make_file: Callable[[bytes], bytes],
    error: str,
) -> None:
    app = make_app()
    composer = staff_composer(app)
    server = live(app)
    canary = new_canary()
    good = CanaryPdf(MIB, canary)
    body = compose_body(composer.csrf, [("good.pdf", good), ("bad.pdf", make_file(canary))])
    answer = post(server.port, composer.path, body, cookie=composer.cookie)
    assert answer.status == 400
    assert error in answer.text
    assert "Traceback" not in answer.text
    assert canary.decode() not in answer.text
    server.monitor.wait_done(1)
    assert stored(app) == NOTHING_STORED
    assert files_holding(canary, *disks(app, private_tmp)) == []


def test_two_uploads_at_once(
    make_app: Callable[..., Flask], live: Serve, private_tmp: Path
) -> None:
    app = make_app()
    composer = staff_composer(app)
    server = live(app)
    canaries = [new_canary(), new_canary()]
    bodies = [
        compose_body(composer.csrf, [(f"r{n}.pdf", CanaryPdf(UPLOAD, c))])
        for n, c in enumerate(canaries)
    ]
    both_halfway = threading.Barrier(2, timeout=60)
    answers: dict[int, int] = {}

    def upload(n: int) -> None:
        # Each waits halfway for the other, so both are being parsed and encrypted at once.
        midway = Midway(server, len(bodies[n]) // 2, both_halfway.wait)
        answers[n] = post(
            server.port, composer.path, bodies[n], cookie=composer.cookie, pause=midway
        ).status

    threads = [threading.Thread(target=upload, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert answers == {0: 302, 1: 302}
    files = {
        name: data for name, data, sha256, actual in attachments_plaintext(app) if sha256 == actual
    }
    assert set(files) == {"r0.pdf", "r1.pdf"}
    for n, canary in enumerate(canaries):
        assert canary in files[f"r{n}.pdf"]
        assert canaries[1 - n] not in files[f"r{n}.pdf"]
        assert files_holding(canary, *disks(app, private_tmp)) == []
    assert stored(app)["partial"] == 0


def test_a_signed_out_visitors_files_are_dropped_unstored(
    make_app: Callable[..., Flask], live: Serve
) -> None:
    app = make_app()
    composer = staff_composer(app)
    server = live(app)
    canary = new_canary()
    body = compose_body(composer.csrf, [("results.pdf", CanaryPdf(UPLOAD, canary))])
    seen: list[Path] = []
    midway = Midway(server, len(body) // 2, lambda: seen.extend(partial_blobs(app)))
    answer = post(server.port, composer.path, body, pause=midway)  # no session cookie
    assert answer.status == 400  # the form's token belongs to a session this visitor lacks
    assert "This form has expired" in answer.text
    assert seen == []  # read and dropped: not even a temporary blob
    assert stored(app) == NOTHING_STORED


def test_the_raw_client_sends_a_form_the_portal_reads(
    make_app: Callable[..., Flask], live: Serve
) -> None:
    """The raw client's own check: a compose body it builds is what the portal parses."""
    app = make_app()
    composer = staff_composer(app)
    server = live(app)
    body = compose_body(composer.csrf, [])
    assert isinstance(body, Multipart)
    answer = post(server.port, composer.path, body, cookie=composer.cookie)
    assert answer.status == 302
    assert stored(app)["messages"] == 1
