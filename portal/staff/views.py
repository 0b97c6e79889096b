"""Staff pages: find or register patients, compose, the sent list, status, revoke, resend.

Every page that shows PHI (names, subjects) writes an audit event; per-message pages
are for the members of the message's care team (see portal.staff.access).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user

from portal.audit import actor_of
from portal.auth.policy import fresh_auth, roles
from portal.crypto.errors import ContentDestroyed
from portal.extensions import db
from portal.models import CareTeam, Message, Role, User
from portal.services import accounts, conversations, messages, messaging, staff_lists, teams
from portal.services.errors import ServiceError
from portal.services.paging import PageError
from portal.staff import access, forms
from portal.staff.limits import STAFF_SENDS
from portal.web.paging import bad_page, page_request
from portal.web.security import request_meta
from portal.web.uploads import accepts_uploads, staged

bp = Blueprint("staff", __name__, url_prefix="/staff")


def _patient(public_id: str | None) -> User:
    user = accounts.find_by_public_id(db.session, public_id, role=Role.PATIENT)
    if user is None:
        abort(404)
    return user


def _safe_read(message: Message) -> messages.Readable | None:
    try:
        return messages.read(db.session, message)
    except ContentDestroyed:
        return None


@bp.get("/")
@roles(Role.STAFF)
def index() -> ResponseReturnValue:
    """The messages this member of staff sent, newest first, with their state.

    Patients' names and subjects are PHI, so the listing is audited (message.list).
    """
    try:
        listed = staff_lists.sent(db.session, current_user, page_request())
    except PageError as refused:
        return bad_page(refused, url_for("staff.index"))
    html = render_template("staff/index.html", page=listed)
    # Last, so the trail's head is held from here to the commit only (see pickup's inbox).
    messaging.record_sent_list(db.session, current_user, len(listed.rows), request_meta())
    return html


@bp.get("/patients")
@roles(Role.STAFF)
def patients() -> ResponseReturnValue:
    """The forms to find a patient by email or register one (no patient shown: no PHI)."""
    return _patients_page()


@bp.post("/patients")
@roles(Role.STAFF)
def patients_post() -> ResponseReturnValue:
    """Find a patient (``intent=find``) or register one.

    A POST, so the address travels in the body, never in a URL (browser history,
    proxy and server logs); results link to the patient's opaque public id.
    """
    if request.form.get("intent") == "find":
        return _find(forms.FindPatientForm())
    register = forms.RegisterPatientForm()
    if not register.validate():
        return _patients_page(register=register)
    return _register(register)


def _patients_page(
    find: forms.FindPatientForm | None = None,
    register: forms.RegisterPatientForm | None = None,
    found: User | None = None,
) -> ResponseReturnValue:
    return render_template(
        "staff/patients.html",
        find=find or forms.FindPatientForm(formdata=None),
        register=register or forms.RegisterPatientForm(formdata=None),
        found=found,
        found_name=accounts.display_name(db.session, found) if found else None,
    )


def _find(find: forms.FindPatientForm) -> ResponseReturnValue:
    if not find.validate():
        return _patients_page(find=find)
    found = messaging.lookup_patient(
        db.session, find.email.data or "", actor=actor_of(current_user), meta=request_meta()
    )
    register = forms.RegisterPatientForm(formdata=None)
    if found is None:
        flash("No patient has that email address. Register them below.", "info")
        register.email.data = find.email.data
    return _patients_page(find=find, register=register, found=found)


def _register(form: forms.RegisterPatientForm) -> ResponseReturnValue:
    try:
        created = accounts.create_user(
            db.session,
            role=Role.PATIENT,
            email=form.email.data or "",
            name=form.name.data or "",
            dob=form.dob.data,
            issue_access_code=bool(form.access_code.data),
            actor=actor_of(current_user),
            meta=request_meta(),
        )
    except ServiceError as refused:
        db.session.rollback()
        form.email.errors = list(refused.messages)
        return _patients_page(register=form)
    return render_template(
        "staff/registered.html", patient=created.user, access_code=created.access_code
    )


def _may_send_to() -> bool:
    """Whether this member of staff may send to the patient named (the upload gate's check:
    a team to send from, a patient to send to; nothing read is audited)."""
    patient = accounts.find_by_public_id(db.session, request.args.get("to"), role=Role.PATIENT)
    return patient is not None and bool(teams.teams_of(db.session, current_user))


@bp.route("/messages/new", methods=["GET", "POST"])
@accepts_uploads(messaging.ATTACHMENTS, roles=[Role.STAFF], limit=STAFF_SENDS, access=_may_send_to)
@roles(Role.STAFF)
@STAFF_SENDS  # per member of staff, shared with answers (portal.staff.limits)
def compose() -> ResponseReturnValue:
    """Write and send a message from one of the sender's care teams (chosen when they are
    in several; staff in no team cannot send); attachments stream from the body to the
    encrypted store."""
    patient = _patient(request.args.get("to"))
    mine = teams.teams_of(db.session, current_user)
    if not mine:  # the patient is not named: nothing read, nothing to audit
        return render_template("staff/compose.html", no_team=str(teams.NoTeam())), 403
    form = forms.ComposeForm()
    form.team.choices = [("", "Choose a care team"), *((t.public_id, t.name) for t in mine)]
    if form.validate_on_submit():
        team = _chosen_team(form)
        if team is not None:
            try:
                sent = _send(form, patient, team)
            except ServiceError as refused:
                db.session.rollback()  # a refused upload's scan verdict is audited still
                form.attachments.errors = list(refused.messages)
                return _compose_page(form, patient, mine, 400)
            else:
                flash("Message sent. The patient will get an email with a secure link.", "success")
                return redirect(url_for("staff.status", public_id=sent.message.public_id))
    return _compose_page(form, patient, mine)


def _chosen_team(form: forms.ComposeForm) -> CareTeam | None:
    """The team the message is from, or None with the reason under the team field."""
    try:
        return teams.sending_team(db.session, current_user, form.team.data or None)
    except ServiceError as refused:
        form.team.errors = list(refused.messages)
        return None


def _compose_page(
    form: forms.ComposeForm, patient: User, mine: list[CareTeam], status: int = 200
) -> ResponseReturnValue:
    # The page names the patient: a read of PHI, audited like any other.
    messaging.record_patient_view(db.session, patient, actor_of(current_user), request_meta())
    return render_template(
        "staff/compose.html",
        form=form,
        patient=patient,
        patient_name=accounts.display_name(db.session, patient),
        teams=mine,
    ), status


def _send(form: forms.ComposeForm, patient: User, team: CareTeam) -> messaging.Sent:
    return messaging.send(
        db.session,
        sender=current_user,
        recipient=patient,
        subject=form.subject.data or "",
        body=form.body.data or "",
        body_format=form.body_format.data or "text",
        staged=staged(form.attachments.name),  # encrypted as they arrived (portal.web.uploads)
        expires_in=timedelta(days=form.expires_days.data or 7),
        team=team,
        meta=request_meta(),
    )


@bp.get("/messages/<public_id>")
@roles(Role.STAFF)
@access.staff_message
def status(message: Message) -> ResponseReturnValue:
    """A message's state: notices, first opened, downloads; revoke and resend."""
    readable = _safe_read(message)
    patient = db.session.get(User, message.recipient_id)
    messaging.record_status_view(db.session, message, actor_of(current_user), request_meta())
    locked = messaging.locked_at(db.session, message)
    return render_template(
        "staff/status.html",
        message=message,
        readable=readable,
        locked=locked,
        patient_name=accounts.display_name(db.session, patient) if patient else "",
        team=db.session.get(CareTeam, message.team_id or 0),
        conversation=conversations.of_message(db.session, message),
        timeline=messaging.status(db.session, message),
        form=forms.ActionForm(),
    )


@bp.post("/messages/<public_id>/revoke")
@roles(Role.STAFF)
@access.staff_message  # before fresh_auth: no password prompt for what they may not do
@fresh_auth
def revoke(message: Message) -> ResponseReturnValue:
    """Stop the message and its links at once (re-authentication required)."""
    return _act(message, messaging.revoke, "Message revoked. Its link no longer works.")


@bp.post("/messages/<public_id>/resend")
@roles(Role.STAFF)
@access.staff_message
def resend(message: Message) -> ResponseReturnValue:
    """Send a fresh link; the old one stops working."""
    return _act(message, messaging.resend, "A new link is on its way to the patient.")


def _act(message: Message, action: Callable[..., object], done: str) -> ResponseReturnValue:
    if not forms.ActionForm().validate_on_submit():
        abort(400)
    try:
        action(db.session, message, actor=actor_of(current_user), meta=request_meta())
    except ServiceError as refused:
        db.session.rollback()
        flash(str(refused), "error")
    else:
        flash(done, "success")
    return redirect(url_for("staff.status", public_id=message.public_id))
