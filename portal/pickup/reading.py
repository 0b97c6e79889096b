"""The signed-in patient's pages: inbox, message, attachments, Download as PDF, reply, history.

Every request loads the message, checks that the signed-in user is its
recipient and that it is still available (revoked or expired messages stop at
once, also in an open session), then reads and audits in one commit. A read
whose audit event cannot be written serves nothing (fail closed).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterator
from urllib.parse import quote

from flask import (
    Response,
    abort,
    flash,
    make_response,
    redirect,
    render_template,
    stream_with_context,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_login import current_user
from sqlalchemy.exc import SQLAlchemyError

from portal.audit import actor_of
from portal.auth.policy import roles, signed_in
from portal.crypto.errors import ContentTampered
from portal.extensions import db
from portal.models import Attachment, Message, Role, User
from portal.pickup import bp, forms
from portal.pickup.forms import DisclosureRangeForm
from portal.pickup.limits import PATIENT_WRITES
from portal.security.content_types import inline_name, is_image, stored_name
from portal.services import disclosures, patient_lists, pdf, pickup
from portal.services.errors import NotFound, ServiceError
from portal.services.paging import PageError
from portal.web import downloads
from portal.web.errors import database_down, page, report_tampered
from portal.web.outage import DATABASE_DOWN, is_outage
from portal.web.paging import bad_page, page_request
from portal.web.security import request_meta
from portal.web.transaction import commit_now

log = logging.getLogger(__name__)
# Shown inline under a sandbox: no script, no plugins but the PDF itself, never framed.
VIEW_CSP = "sandbox; default-src 'none'; object-src 'self'; frame-ancestors 'none'"
UNRECORDED = (
    "We could not record this access in the audit trail, so nothing was sent. "
    "Please try again in a few minutes."
)


def _user() -> User:
    user: User = current_user._get_current_object()  # flask_login is untyped
    return user


@bp.errorhandler(pickup.Unavailable)
def _unavailable(gone: pickup.Unavailable) -> ResponseReturnValue:
    return _record_denial() or (render_template("pickup/gone.html", reason=gone.reason), 410)


@bp.errorhandler(NotFound)
def _not_theirs(_refused: NotFound) -> ResponseReturnValue:
    return _record_denial() or page(404)


def _record_denial() -> ResponseReturnValue | None:
    """Commit the access.denied event the service wrote as it refused; the 503 page if the
    database is gone (None when recorded).

    The exception would make the boundary roll back, so the event is committed here. The
    refusal is each view's first step, so nothing else is pending in the transaction.
    """
    try:
        commit_now()
    except DATABASE_DOWN as error:
        if not is_outage(error):
            raise
        return database_down(error)
    return None


def _unrecorded() -> Response:
    db.session.rollback()
    log.error("audit event not written; read refused", extra={"event": "audit_failed"})
    return make_response(page(503, UNRECORDED))


def _message(message_id: str) -> Message:
    message = pickup.find_message(db.session, message_id)
    if message is None:
        abort(404)
    pickup.check_access(db.session, message, _user(), request_meta())
    return message


def _attachment(message_id: str, attachment_id: str) -> Attachment:
    attachment = pickup.find_attachment(_message(message_id), attachment_id)
    if attachment is None:
        abort(404)
    return attachment


@bp.get("/inbox")
@roles(Role.PATIENT)
def inbox() -> ResponseReturnValue:
    """The patient's messages, a page at a time, newest first, unread ones marked (subjects
    are PHI: audited).

    The page is rendered before its audit event is written, and returned only once the
    event is committed: by the app's group appender, with other requests' reads under one
    hold of the trail's head (``portal.audit_group``).
    """
    user = _user()
    try:
        listed = patient_lists.inbox(db.session, user, page_request())
    except PageError as refused:
        return bad_page(refused, url_for("pickup.inbox"))
    # The messages' link built once for the page, each row's public id (hex: nothing to
    # quote) appended in the template: not a url_for per row (README "Inbox").
    message_path = url_for("pickup.message", message_id="-").removesuffix("-")
    html = render_template("pickup/inbox.html", page=listed, message_path=message_path)
    patient_lists.record_inbox_view(db.session, user, len(listed.rows), request_meta())
    return html


@bp.get("/messages/<message_id>")
@signed_in
def message(message_id: str) -> ResponseReturnValue:
    """One message: sender, date, subject, body, attachments, and the patient's replies."""
    shown = pickup.view_message(db.session, _message(message_id), _user(), request_meta())
    return _render(shown, forms.ReplyForm())


def _render(shown: pickup.Shown, form: forms.ReplyForm, status: int = 200) -> ResponseReturnValue:
    readable = shown.readable
    files = [(a, readable.filenames[a.id]) for a in shown.message.attachments]
    body = pdf.render_body_html(readable.body, readable.body_format)
    return render_template(
        "pickup/message.html",
        shown=shown,
        body=body,
        files=files,
        form=form,
        filesize=pdf.format_size,
    ), status


def content_disposition(kind: str, filename: str) -> str:
    """Return a Content-Disposition value: an ASCII ``filename`` and RFC 5987 ``filename*``."""
    fallback = unicodedata.normalize("NFKD", filename).encode("ascii", "ignore").decode()
    fallback = re.sub(r"[^A-Za-z0-9._ -]", "_", fallback).strip(" .") or "document.pdf"
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _stream(attachment: Attachment, *, inline: bool) -> ResponseReturnValue:
    # One of the worker's download slots for as long as the body streams (portal.web.downloads):
    # slow readers cannot take the threads that pages and health checks need.
    return downloads.in_slot(lambda: _open_stream(attachment, inline=inline))


def _open_stream(attachment: Attachment, *, inline: bool) -> ResponseReturnValue:
    try:
        name, chunks = pickup.open_attachment(
            db.session, attachment, _user(), request_meta(), inline=inline
        )
    except SQLAlchemyError:
        return _unrecorded()
    try:
        commit_now()  # streamed: the audit event lands before a byte leaves
    except SQLAlchemyError:
        # mypy: chunks is typed Iterator; the generator behind it has close(), which releases the
        #   blob file.
        chunks.close()  # type: ignore[attr-defined]
        return _unrecorded()
    return _file_response(_tamper_guarded(chunks), attachment, name, inline)


def _tamper_guarded(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Yield ``chunks``; a segment failing authentication after the headers went out is
    audited and alerted (content.tampered), then re-raised so the server aborts the body:
    a cut connection, never a complete-looking file (the first segment was checked before)."""
    try:
        yield from chunks
    except ContentTampered:
        report_tampered("mid_stream")
        raise
    finally:
        # mypy: chunks is typed Iterator; the generator behind it has close(), which releases the
        #   blob file.
        chunks.close()  # type: ignore[attr-defined]


def _file_response(
    chunks: Iterator[bytes], attachment: Attachment, name: str, inline: bool
) -> Response:
    """The stored file as its stored type (a photo is a re-encoded JPEG or PNG), never sniffed."""
    media_type = attachment.content_type or "application/pdf"
    response = Response(stream_with_context(chunks), mimetype=media_type, direct_passthrough=True)
    headers = response.headers
    headers["Content-Length"] = str(attachment.size)
    photo = inline and is_image(media_type)  # shown on the page: a name of our own
    headers["Content-Disposition"] = content_disposition(
        "inline" if inline else "attachment",
        inline_name(media_type) if photo else stored_name(name, media_type),
    )
    headers["Cache-Control"] = "no-store"
    headers["X-Content-Type-Options"] = "nosniff"
    if inline:
        headers["Content-Security-Policy"] = downloads.IMAGE_CSP if photo else VIEW_CSP
    return response


@bp.get("/messages/<message_id>/attachments/<attachment_id>/download")
@signed_in
def download(message_id: str, attachment_id: str) -> ResponseReturnValue:
    """Stream the decrypted attachment as a download (constant memory)."""
    return _stream(_attachment(message_id, attachment_id), inline=False)


@bp.get("/messages/<message_id>/attachments/<attachment_id>/view")
@signed_in
def view(message_id: str, attachment_id: str) -> ResponseReturnValue:
    """Stream the decrypted attachment inline under a sandbox CSP: a PDF for the browser's
    viewer, a photo (stored re-encoded) for the message page's ``<img>``."""
    return _stream(_attachment(message_id, attachment_id), inline=True)


@bp.get("/messages/<message_id>/pdf")
@signed_in
def message_pdf(message_id: str) -> ResponseReturnValue:
    """Download the message itself as a PDF letter."""
    message = _message(message_id)
    try:
        document = pickup.message_pdf(db.session, message, _user(), request_meta())
        commit_now()  # fail closed with our own 503 page if the event cannot be written
    except SQLAlchemyError:
        return _unrecorded()
    response = Response(document, mimetype="application/pdf")
    response.headers["Content-Disposition"] = content_disposition(
        "attachment", f"message-{message.created_at:%Y-%m-%d}.pdf"
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/messages/<message_id>/reply")
@signed_in
@PATIENT_WRITES  # per patient, shared with follow-ups in a conversation (portal.pickup.limits)
def reply(message_id: str) -> ResponseReturnValue:
    """Answer the message; the reply is stored encrypted and the sender gets a PHI-free notice."""
    original, form = _message(message_id), forms.ReplyForm()
    if form.validate_on_submit():
        try:
            pickup.reply(db.session, original, _user(), form.body.data or "", request_meta())
        except ServiceError as refused:
            db.session.rollback()
            form.body.errors = list(refused.messages)
        else:
            flash("Your reply was sent.", "success")
            return redirect(url_for("pickup.message", message_id=message_id) + "#replies")
    shown = pickup.view_message(db.session, original, _user(), request_meta())
    return _render(shown, form, 400)


@bp.get("/history")
@roles(Role.PATIENT)
def history() -> ResponseReturnValue:
    """Every audited access to the patient's data: who, when, what, which message, from where.

    The page shows subjects and staff names, so reading it is itself audited (fail closed).
    """
    return _history_page(DisclosureRangeForm())


def _history_page(form: DisclosureRangeForm, status: int = 200) -> ResponseReturnValue:
    user = _user()
    try:
        listed = patient_lists.history(db.session, user, page_request())
    except PageError as refused:
        return bad_page(refused, url_for("pickup.history"))
    html = render_template("pickup/history.html", page=listed, form=form)
    try:
        patient_lists.record_history_view(db.session, user, len(listed.rows), request_meta())
        commit_now()  # fail closed with our own 503 page if the event cannot be written
    except SQLAlchemyError:
        return _unrecorded()
    return html, status


def _valid_period(form: DisclosureRangeForm) -> bool:
    """Validate the posted period; a reversed one gets an error under its last day."""
    if not form.validate_on_submit():
        return False
    # mypy: DayField data is a date once validate() passed (checked above); WTForms types it Any
    #   | None.
    if form.until.data < form.since.data:  # type: ignore[operator]
        form.until.errors = ["The last day is before the first."]
        return False
    return True


@bp.post("/history/disclosures.pdf")
@roles(Role.PATIENT)
def disclosures_pdf() -> ResponseReturnValue:
    """The patient's own accounting of disclosures for a period, as a PDF (audited)."""
    form = DisclosureRangeForm()
    user = _user()
    if not _valid_period(form):
        return _history_page(form, 400)  # the form's own messages, under its fields
    # mypy: DayField data is a date once validate() passed (checked above); WTForms types it Any
    #   | None.
    body = disclosures.report_pdf(
        db.session,
        user,
        form.since.data,  # type: ignore[arg-type]
        form.until.data,  # type: ignore[arg-type]
        actor=actor_of(user),
        meta=request_meta(),
    )
    return Response(
        body,
        mimetype="application/pdf",
        headers={
            "Content-Disposition": 'attachment; filename="my-accesses.pdf"',
            "Cache-Control": "no-store",
        },
    )
