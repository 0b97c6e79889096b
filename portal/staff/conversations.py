"""Staff pages of conversations: the team inbox, a thread, answer, assign, done, files.

Every route of one conversation loads it, checks that the member of staff is in its
care team (others get the 404 page and an ``access.denied`` event, committed with it),
then reads or acts and audits in the request's one commit. Pages that show PHI are
rendered first and audited last, so the audit trail's head is held only for the events.
Importing this module adds its routes to the staff blueprint (``portal.create_app``).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

from flask import Response, abort, flash, redirect, render_template, request, stream_with_context
from flask import url_for as flask_url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user
from sqlalchemy.exc import SQLAlchemyError

from portal.auth.policy import roles
from portal.crypto.errors import ContentDestroyed, ContentTampered
from portal.extensions import db
from portal.models import Attachment, Conversation, Role, User
from portal.security.content_types import inline_name, is_image, stored_name
from portal.services import conversations, messaging, pdf, team_inbox, teams
from portal.services.errors import NotFound, ServiceError
from portal.services.paging import PageError
from portal.services.uploads import UploadRefused, UploadTooLarge
from portal.staff import forms
from portal.staff.limits import STAFF_SENDS
from portal.staff.views import bp
from portal.web import downloads
from portal.web.errors import page, report_tampered
from portal.web.paging import bad_page, page_request
from portal.web.security import request_meta
from portal.web.transaction import commit_now
from portal.web.uploads import accepts_uploads, staged

NOTHING_HERE = (
    "There is no conversation here for your care teams. Check the link, or open your team "
    "inbox. To work on another team's conversations, ask an admin to add you to that team."
)
UNRECORDED = (
    "We could not record this access in the audit trail, so nothing was sent. "
    "Please try again in a few minutes."
)
BAD_FILTER = "That view of the inbox does not exist. Open the inbox again."


def _me() -> User:
    user: User = current_user._get_current_object()  # flask_login is untyped
    return user


def _nothing_here() -> ResponseReturnValue:
    return page(404, NOTHING_HERE)


def member_conversation(
    view: Callable[..., ResponseReturnValue],
) -> Callable[..., ResponseReturnValue]:
    """Hand the view the conversation at ``public_id`` if this member of staff is in its team.

    Otherwise the 404 page; for a real conversation of another team the refusal is audited
    (access.denied) and committed with the page, since the view returns rather than raises.
    """

    @functools.wraps(view)
    def wrapper(public_id: str, **kwargs: Any) -> ResponseReturnValue:
        conversation = conversations.find(db.session, public_id)
        if conversation is None:
            return _nothing_here()
        try:
            conversations.check_member(db.session, conversation, _me(), meta=request_meta())
        except NotFound:
            return _nothing_here()
        return view(conversation, **kwargs)

    return wrapper


def _page_url(conversation: Conversation, anchor: str = "") -> str:
    return flask_url_for("staff.conversation", public_id=conversation.public_id) + anchor


# --- The inbox -------------------------------------------------------------------------------


@bp.get("/inbox")
@roles(Role.STAFF)
def inbox() -> ResponseReturnValue:
    """The conversations of this member's teams: unread for them first, then the latest.

    ``team`` narrows it to one of their teams, ``show`` to open (default), done or all.
    Patients' names and subjects are PHI, so the page is audited (message.list).
    """
    me = _me()
    try:
        show = team_inbox.Show(request.args.get("show", team_inbox.Show.OPEN))
    except ValueError:
        return page(400, BAD_FILTER)
    try:
        team = team_inbox.inbox_team(db.session, me, request.args.get("team"), meta=request_meta())
    except NotFound:
        return _nothing_here()
    mine = teams.teams_of(db.session, me)
    try:
        listed = team_inbox.team_inbox(
            db.session, me, page_request(), team=team, show=show, reader_teams=mine
        )
    except PageError as refused:
        return bad_page(refused, flask_url_for("staff.inbox"))
    filters = {"team": team.public_id if team else None, "show": show.value}
    html = render_template("staff/inbox.html", page=listed, teams=mine, filters=filters)
    team_inbox.record_inbox_view(db.session, me, len(listed.rows), request_meta())
    return html


# --- One conversation ------------------------------------------------------------------------


@bp.get("/conversations/<public_id>")
@roles(Role.STAFF)
@member_conversation
def conversation(conversation: Conversation) -> ResponseReturnValue:
    """The thread, oldest first, with the answer, assignment and done forms.

    Reading it is audited (conversation.read, and reply.read for each patient message) and
    marks it read for this member up to the newest patient message shown.
    """
    return _thread_page(conversation, forms.AnswerForm(formdata=None))


def _thread_page(
    conversation: Conversation,
    answer: forms.AnswerForm,
    assign: forms.AssignForm | None = None,
    status: int = 200,
) -> ResponseReturnValue:
    me = _me()
    thread = team_inbox.load_thread(db.session, conversation, me)
    assign = assign or forms.AssignForm(formdata=None)
    assign.assignee.choices = [("", "Nobody")] + [(u.public_id, n) for u, n in thread.members]
    if assign.assignee.data is None and conversation.assigned_to_id is not None:
        assign.assignee.data = next(
            (u.public_id for u, _ in thread.members if u.id == conversation.assigned_to_id), ""
        )
    html = render_template(
        "staff/conversation.html",
        thread=thread,
        answer=answer,
        assign=assign,
        action=forms.ActionForm(),
        body_html=lambda e: pdf.render_body_html(e.body or "", e.body_format),
        filesize=pdf.format_size,
    )
    team_inbox.record_read(db.session, thread, me, request_meta())
    return html, status


def _in_team(public_id: str) -> bool:
    """Whether the conversation is one of this member's teams' (the upload gate's check: no
    audit; member_conversation audits the refusal)."""
    found = conversations.find(db.session, public_id)
    return found is not None and teams.is_member(db.session, _me(), found.team_id)


@bp.post("/conversations/<public_id>/answer")
@accepts_uploads(messaging.ATTACHMENTS, roles=[Role.STAFF], limit=STAFF_SENDS, access=_in_team)
@roles(Role.STAFF)
@STAFF_SENDS  # per member of staff, shared with compose (portal.staff.limits)
@member_conversation
def answer(conversation: Conversation) -> ResponseReturnValue:
    """Answer the patient in the thread; they get the PHI-free notice with a secure link."""
    form = forms.AnswerForm()
    if form.validate_on_submit():
        try:
            conversations.answer(
                db.session,
                conversation,
                sender=_me(),
                body=form.body.data or "",
                staged=staged(form.attachments.name),
                meta=request_meta(),
            )
        except ServiceError as refused:
            db.session.rollback()
            upload = isinstance(refused, UploadTooLarge | UploadRefused)
            (form.attachments if upload else form.body).errors = list(refused.messages)
        else:
            flash("Your answer was sent. The patient gets an email with a secure link.", "success")
            return redirect(_page_url(conversation, "#latest"))
    return _thread_page(conversation, form, status=400)


@bp.post("/conversations/<public_id>/assign")
@roles(Role.STAFF)
@member_conversation
def assign(conversation: Conversation) -> ResponseReturnValue:
    """Assign the conversation to a member of its team, or to nobody (audited)."""
    form = forms.AssignForm()
    if not form.validate_on_submit():
        abort(400)
    try:
        chosen = conversations.assign(
            db.session, conversation, form.assignee.data, actor=_me(), meta=request_meta()
        )
    except ServiceError as refused:
        db.session.rollback()
        form.assignee.errors = list(refused.messages)
        return _thread_page(conversation, forms.AnswerForm(formdata=None), form, 400)
    flash("Assigned." if chosen is not None else "Nobody is assigned now.", "success")
    return redirect(_page_url(conversation))


@bp.post("/conversations/<public_id>/done")
@roles(Role.STAFF)
@member_conversation
def done(conversation: Conversation) -> ResponseReturnValue:
    """Mark the conversation done; a new message from the patient reopens it."""
    return _move(conversation, conversations.mark_done, "Marked done.", "staff.inbox")


@bp.post("/conversations/<public_id>/reopen")
@roles(Role.STAFF)
@member_conversation
def reopen(conversation: Conversation) -> ResponseReturnValue:
    """Reopen a conversation marked done."""
    return _move(conversation, conversations.reopen, "Reopened.", None)


def _move(
    conversation: Conversation,
    change: Callable[..., None],
    done_text: str,
    then: str | None,
) -> ResponseReturnValue:
    if not forms.ActionForm().validate_on_submit():
        abort(400)
    try:
        change(db.session, conversation, actor=_me(), meta=request_meta())
    except ServiceError as refused:
        db.session.rollback()
        flash(str(refused), "error")
        return redirect(_page_url(conversation))
    flash(done_text, "success")
    return redirect(flask_url_for(then) if then else _page_url(conversation))


# --- Files -----------------------------------------------------------------------------------


_FILE = "/conversations/<public_id>/messages/<message_id>/attachments/<attachment_id>"


@bp.get(_FILE, defaults={"inline": False})
@bp.get(_FILE + "/inline", defaults={"inline": True})
@roles(Role.STAFF)
@member_conversation
def attachment(
    conversation: Conversation, message_id: str, attachment_id: str, inline: bool
) -> ResponseReturnValue:
    """Stream one of the thread's files, decrypted, as a download (audited first); a photo
    under ``/inline`` for the page's ``<img>`` (the same read, audited as a view)."""
    found = conversations.find_attachment(db.session, conversation, message_id, attachment_id)
    if found is None:
        return _nothing_here()
    return downloads.in_slot(lambda: _open(found, conversation, inline=inline))


def _open(found: Attachment, conversation: Conversation, *, inline: bool) -> ResponseReturnValue:
    media_type = found.content_type or "application/octet-stream"
    shown = inline and is_image(media_type)  # PDFs: downloads, under /inline too
    try:
        name, chunks = conversations.open_attachment(
            db.session, found, conversation, _me(), request_meta(), inline=shown
        )
    except ContentDestroyed:
        return page(410, "This file was deleted.")
    except SQLAlchemyError:
        return _unrecorded()
    try:
        commit_now()  # streamed: the audit event lands before a byte leaves
    except SQLAlchemyError:
        # mypy: chunks is typed Iterator; the generator behind it has close(), which releases the
        #   blob file.
        chunks.close()  # type: ignore[attr-defined]
        return _unrecorded()
    response = Response(
        stream_with_context(_guarded(chunks)), mimetype=media_type, direct_passthrough=True
    )
    disposition = (
        _disposition(inline_name(media_type), "inline")
        if shown
        else _disposition(stored_name(name, media_type))
    )
    response.headers.update(
        {
            "Content-Length": str(found.size),
            "Content-Disposition": disposition,
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": downloads.IMAGE_CSP,  # as the patient's photos
        }
    )
    return response


def _unrecorded() -> ResponseReturnValue:
    db.session.rollback()
    return page(503, UNRECORDED)


def _guarded(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Yield ``chunks``; a segment failing authentication mid-stream is audited and the body
    cut (as the patient's downloads do)."""
    try:
        yield from chunks
    except ContentTampered:
        report_tampered("mid_stream")
        raise
    finally:
        # mypy: chunks is typed Iterator; the generator behind it has close(), which releases the
        #   blob file.
        chunks.close()  # type: ignore[attr-defined]


def _disposition(filename: str, kind: str = "attachment") -> str:
    """``kind`` (attachment, inline) with an ASCII ``filename`` and the RFC 5987 ``filename*``."""
    fallback = unicodedata.normalize("NFKD", filename).encode("ascii", "ignore").decode()
    fallback = re.sub(r"[^A-Za-z0-9._ -]", "_", fallback).strip(" .") or "document"
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"
