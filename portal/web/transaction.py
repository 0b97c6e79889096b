"""One transaction per request, committed in one place ("every request commits
once, at its boundary, by mechanism; services flush").

The model is indico's ``RH.process`` and notifications-api's ``@transactional``:
views and services only add to the request's session; this module ends it.

The rule, decided once for every view:

- A view that *returns* a response commits, whatever the status. A wrong password
  is answered 401, and its failure counter and ``auth.signin.failed`` event must
  still land (ASVS 2.2.1, NIST SP 800-63B 5.2.2); a 400 page that showed PHI has
  its read audited. So the status code never decides; the control flow does.
- An exception that escapes a view or a ``before_request`` hook (``abort()``, a
  ServiceError left to an error handler, a bug) rolls back *everything* the
  request did: no row, no audit event, no blob (the blob store deletes files
  written in a transaction that rolls back). Error handlers run after that
  decision, so a handler that must record something (a denial, tampered
  content) commits it itself with :func:`commit_now`.
- A view that must commit *before* its response is built calls :func:`commit_now`
  explicitly: a streamed download (its audit event lands before the first byte),
  a read that must fail closed with its own page when the event cannot be
  written, or a long export that must release the trail's head first.

The commit runs in ``after_request``, before the server-side session is saved
(its own short transaction) and before a byte of the body is sent, so a commit
that fails turns the response into the generic 500 page: nothing the request
promised is shown as done.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, g

from portal.extensions import db
from portal.web import outage

_FAILED = "transaction_failed"  # g: an exception escaped; the boundary rolls back


class TransactionalFlask(Flask):
    """Flask that tells the request's transaction when an exception escaped a view.

    Every exception raised by a view or a request hook passes through
    ``handle_user_exception`` (handled ones) or ``handle_exception`` (the rest,
    and failures of ``after_request`` itself), so no error handler, present or
    future, needs to remember to roll back.
    """

    def handle_user_exception(self, e: Exception) -> Any:
        """Mark the request's transaction for rollback, then let Flask handle ``e``."""
        g.setdefault(_FAILED, True)
        return super().handle_user_exception(e)

    def handle_exception(self, e: Exception) -> Response:
        """Mark the request's transaction for rollback, then answer Flask's 500."""
        g.setdefault(_FAILED, True)
        return super().handle_exception(e)


def init_app(app: Flask) -> None:
    """End every request's transaction at its boundary: commit, or roll back on an exception."""
    app.after_request(_boundary)


def _boundary(response: Response) -> Response:
    if not db.in_transaction():
        return response  # nothing open: a static file, or already committed or rolled back
    if g.get(_FAILED):
        db.session.rollback()
        return response
    try:
        db.session.commit()  # the one commit of a request that returned normally
        g.committed = True  # a later failure (saving the session) must not say nothing was saved
    except outage.DATABASE_DOWN as error:  # gone, or SQLite's disk full: nothing was saved
        if not outage.is_outage(error):
            raise
        from portal.web.errors import database_down_response

        database_down_response(response, error)
    return response


def rolls_back() -> bool:
    """Whether an exception escaped this request's view: the boundary will roll it back."""
    return bool(g.get(_FAILED))


def commit_now() -> None:
    """Commit the request's work *now*, ahead of the boundary, and carry on in a new transaction.

    Only for the cases the boundary cannot serve, each named at its call site:
    a streamed body (the audit event must be durable before the first byte
    leaves: the boundary would commit in time, but a reader of the view must
    not have to know that), a read that fails closed with its own page when its
    event cannot be written, an error handler recording a denial or tampered
    content after the request's own work was rolled back, and a long export that
    must release the audit trail's head before streaming.

    Returns None. Raises SQLAlchemyError when the commit fails (the caller decides
    whether to answer 503 or let the request fail).
    """
    db.session.commit()
    g.committed = True
