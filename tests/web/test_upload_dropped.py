"""A view that takes a request whose files the upload gate dropped refuses it (409): the
message is not sent without its attachment.

The gate decides when the body starts; the view decides once the whole body has arrived.
Between the two the answer can change (a team membership added, another tab using the
last write of the hour), and the view would then accept a request whose files were never
stored. Which change wins depends on timing, so the defence is checked where it lives,
in :func:`portal.web.uploads.staged`, and through the app's own error page (issue 14
review: no test failed when the check was deleted).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import pytest
from flask import Flask, request
from werkzeug.test import encode_multipart

from portal.web import uploads
from tests.support.conversations import World


def test_staged_refuses_a_request_whose_files_were_dropped(app: Flask) -> None:
    with app.test_request_context("/", method="POST"):
        request.dropped_files = 1  # type: ignore[attr-defined]  # as the gate leaves it
        with pytest.raises(uploads.UploadDropped) as refused:
            uploads.staged("attachments")
    assert refused.value.code == 409


def test_staged_takes_a_request_with_nothing_dropped(app: Flask) -> None:
    with app.test_request_context("/", method="POST"):
        assert uploads.staged("attachments") is None  # no files: nothing staged, no refusal


def test_the_refusal_is_answered_with_its_page_and_no_stack_trace(app: Flask) -> None:
    """The 409 reaches the caller as a page that says what to do, through the handler."""
    with app.test_request_context("/", method="POST"):
        request.dropped_files = 2  # type: ignore[attr-defined]
        try:
            uploads.staged("attachments")
        except uploads.UploadDropped as error:
            response = app.make_response(app.handle_user_exception(error))
        else:
            pytest.fail("staged() took dropped files")
    assert response.status_code == 409
    page = response.get_data(as_text=True)
    assert "could not be taken just now, so nothing was sent" in page
    assert "Traceback" not in page


def _post_as_patient_of_another(world: World, attachment: tuple[io.BytesIO, str]) -> int:
    """POST to the conversation as the other patient (refused by the gate: 404); return how
    many file parts the request counted as dropped."""
    browser = world.other_patient
    token = browser.token("/conversations/new")
    with browser.client:
        response = browser.client.post(
            f"/conversations/{world.conversation}/write",
            data={"csrf_token": token, "body": "Hello", "attachments": attachment},
            content_type="multipart/form-data",
        )
        assert response.status_code == 404
        return int(request.dropped_files)  # type: ignore[attr-defined]


def test_a_dropped_part_counts_only_when_it_is_a_file(world: World) -> None:
    """Regression (issue 14 review): the empty part a browser sends for "no file chosen"
    counted as a dropped file, so a view taking the request would have told someone who sent
    no file that their files could not be taken."""
    assert _post_as_patient_of_another(world, (io.BytesIO(b""), "")) == 0
    assert _post_as_patient_of_another(world, (io.BytesIO(b"%PDF-1.4 x"), "")) == 1  # bytes
    assert _post_as_patient_of_another(world, (io.BytesIO(b""), "empty.pdf")) == 1  # a name


def test_a_gate_whose_check_failed_asks_again_rather_than_let_files_through(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 14 review): the gate marked itself asked before its check ran, so
    when the check raised (the limiter's store down) a second parse of the body staged the
    files of a caller it would have refused."""
    calls: list[int] = []
    real = uploads.Uploaders.refusal

    def flaky(self: uploads.Uploaders, view_args: Mapping[str, Any]) -> int | None:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("the limiter's store is down")
        return real(self, view_args)

    monkeypatch.setattr(uploads.Uploaders, "refusal", flaky)
    boundary, body = encode_multipart(
        {"body": "B", "attachments": (io.BytesIO(b"%PDF-1.4 x"), "a.pdf")}
    )
    with app.test_request_context(
        "/conversations/" + "0" * 32 + "/write",
        method="POST",
        data=body,
        content_type=f"multipart/form-data; boundary={boundary}",
    ):
        assert isinstance(request, uploads.StreamingRequest)
        with pytest.raises(ConnectionError):
            request._load_form_data()
        request._load_form_data()  # a second parse (an error page reading the form, say)
        assert len(calls) == 2  # asked again: signed out, so refused
        assert request.upload_refusal == 401
        assert request.upload_staging is None
