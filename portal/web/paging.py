"""The page of a list a request asks for (``?after=`` or ``?before=``), and the answer to a
bad one: 400 with a fixed message, nothing recorded, nothing of any row shown."""

from __future__ import annotations

from flask import render_template, request
from flask.typing import ResponseReturnValue

from portal.services.paging import PageError, PageRequest


def page_request(prefix: str = "") -> PageRequest:
    """Return the page this request asks for of the list whose parameters start ``prefix``.

    Raises PageError for a cursor given twice, both directions at once, or a malformed one.
    """
    after = request.args.getlist(prefix + "after")
    before = request.args.getlist(prefix + "before")
    if len(after) > 1 or len(before) > 1:
        raise PageError
    return PageRequest.of(after[0] if after else None, before[0] if before else None)


def bad_page(refused: PageError, first_page: str) -> ResponseReturnValue:
    """The 400 page for a page that cannot be shown, linking to the list's first page."""
    return render_template(
        "error.html", code=400, title="Page not available", text=str(refused), back=first_page
    ), 400
