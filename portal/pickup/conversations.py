"""The signed-in patient's conversations: the list, writing first to a care team, a thread.

Every thread request loads the conversation and checks that it is the signed-in
patient's (anyone else: 404 and ``access.denied``, committed by the blueprint's NotFound
handler). Writing is rate limited per patient (``portal.pickup.limits``: keyed on the
account, not the address), with a 429 page that says what to do. Files stream into the
encrypted store under the same upload policy (inspectors, size) as staff attachments
(``messaging.ATTACHMENTS``).
"""

from __future__ import annotations

from flask import flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_limiter import RateLimitExceeded
from flask_login import current_user

from portal.auth.policy import roles
from portal.extensions import db
from portal.models import CareTeam, Conversation, Role, User
from portal.pickup import bp, forms
from portal.pickup.limits import PATIENT_STARTS, PATIENT_WRITES
from portal.services import conversations as threads
from portal.services import messaging, patient_conversations, pdf
from portal.services.errors import ServiceError
from portal.services.paging import PageError
from portal.services.uploads import UploadRefused, UploadTooLarge
from portal.web.errors import page
from portal.web.paging import bad_page, page_request
from portal.web.security import request_meta
from portal.web.uploads import accepts_uploads, staged

# Limits: portal.pickup.limits (follow-ups here and replies to a message share one).
TOO_MANY = (
    "You have sent several messages in a short time, so this one was not sent. Please wait "
    "an hour before you write again. If it is urgent, call the practice or, in an "
    "emergency, your local emergency number."
)
WRITING = ("pickup.start_conversation", "pickup.write", "pickup.reply")


def _user() -> User:
    user: User = current_user._get_current_object()  # flask_login is untyped
    return user


def _can_start() -> bool:
    """Whether the signed-in patient has a team to write to (the upload gate's check)."""
    return bool(patient_conversations.with_team(db.session, _user()))


def _is_theirs(public_id: str) -> bool:
    """Whether the conversation is the signed-in patient's (the upload gate's check: no audit;
    find_for_patient audits the refusal)."""
    found = threads.find(db.session, public_id)
    return found is not None and found.patient_id == _user().id


@bp.errorhandler(RateLimitExceeded)
def _too_many(error: RateLimitExceeded) -> ResponseReturnValue:
    """The 429 page: what to do for a patient's message, the generic one elsewhere."""
    return page(429, TOO_MANY if request.endpoint in WRITING else None)


@bp.get("/conversations")
@roles(Role.PATIENT)
def conversations() -> ResponseReturnValue:
    """The patient's conversations, latest first, each with its messages grouped under it.

    Subjects are PHI, so the page is audited (message.list), after it is rendered.
    """
    user = _user()
    try:
        listed = patient_conversations.threads(db.session, user, page_request())
    except PageError as refused:
        return bad_page(refused, url_for("pickup.conversations"))
    html = render_template(
        "pickup/conversations.html",
        page=listed,
        can_start=bool(patient_conversations.with_team(db.session, user)),
    )
    patient_conversations.record_list_view(db.session, user, len(listed.rows), request_meta())
    return html


@bp.route("/conversations/new", methods=["GET", "POST"])
@accepts_uploads(
    messaging.ATTACHMENTS, roles=[Role.PATIENT], limit=PATIENT_STARTS, access=_can_start
)
@roles(Role.PATIENT)
@PATIENT_STARTS
def start_conversation() -> ResponseReturnValue:
    """Write to a care team that takes patients' messages; its members get a PHI-free notice."""
    user, form = _user(), forms.StartConversationForm()
    open_teams = patient_conversations.with_team(db.session, user)
    form.team.choices = [("", "Choose a care team")] + [(t.public_id, t.name) for t in open_teams]
    if not form.validate_on_submit():
        return _start_page(form, open_teams, 400 if request.method == "POST" else 200)
    try:
        team = patient_conversations.writable_team(
            db.session, user, form.team.data, meta=request_meta()
        )
    except patient_conversations.TeamNotOpen as refused:
        form.team.errors = list(refused.messages)  # not rolled back: a refusal is audited
        return _start_page(form, open_teams, 400)
    return _start(form, user, team, open_teams)


def _start(
    form: forms.StartConversationForm, user: User, team: CareTeam, open_teams: list[CareTeam]
) -> ResponseReturnValue:
    try:
        started = patient_conversations.start(
            db.session,
            patient=user,
            team=team,
            subject=form.subject.data or "",
            body=form.body.data or "",
            staged=staged(form.attachments.name),
            meta=request_meta(),
        )
    except ServiceError as refused:
        db.session.rollback()
        _show_refusal(form, refused)
        return _start_page(form, open_teams, 400)
    flash(f"Your message was sent to {team.name}.", "success")
    return redirect(url_for("pickup.conversation", public_id=started.public_id))


def _show_refusal(
    form: forms.StartConversationForm | forms.WriteForm, refused: ServiceError
) -> None:
    upload = isinstance(refused, UploadTooLarge | UploadRefused)
    (form.attachments if upload else form.body).errors = list(refused.messages)


def _start_page(
    form: forms.StartConversationForm, open_teams: list[CareTeam], status: int
) -> ResponseReturnValue:
    return render_template("pickup/start_conversation.html", form=form, teams=open_teams), status


@bp.get("/conversations/<public_id>")
@roles(Role.PATIENT)
def conversation(public_id: str) -> ResponseReturnValue:
    """One conversation: the team's messages (still available) and the patient's, oldest
    first, and a form to write again. Each of the team's messages shown is audited."""
    found = patient_conversations.find_for_patient(
        db.session, public_id, _user(), meta=request_meta()
    )
    return _thread_page(found, forms.WriteForm(formdata=None))


def _thread_page(
    conversation: Conversation, form: forms.WriteForm, status: int = 200
) -> ResponseReturnValue:
    user = _user()
    thread = patient_conversations.load_thread(db.session, conversation, user)
    html = render_template(
        "pickup/conversation.html",
        thread=thread,
        form=form,
        body_html=lambda e: pdf.render_body_html(e.body or "", e.body_format),
        filesize=pdf.format_size,
    )
    patient_conversations.record_read(db.session, thread, user, request_meta())
    return html, status


@bp.post("/conversations/<public_id>/write")
@accepts_uploads(
    messaging.ATTACHMENTS, roles=[Role.PATIENT], limit=PATIENT_WRITES, access=_is_theirs
)
@roles(Role.PATIENT)
@PATIENT_WRITES
def write(public_id: str) -> ResponseReturnValue:
    """Write again in the conversation; the team is told with a PHI-free notice."""
    user = _user()
    found = patient_conversations.find_for_patient(db.session, public_id, user, meta=request_meta())
    form = forms.WriteForm()
    if form.validate_on_submit():
        try:
            patient_conversations.write(
                db.session,
                found,
                patient=user,
                body=form.body.data or "",
                staged=staged(form.attachments.name),
                meta=request_meta(),
            )
        except ServiceError as refused:
            db.session.rollback()
            _show_refusal(form, refused)
        else:
            flash("Your message was sent.", "success")
            return redirect(url_for("pickup.conversation", public_id=public_id) + "#latest")
    return _thread_page(found, form, 400)
