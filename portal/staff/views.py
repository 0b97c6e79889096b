"""Staff pages: find or register patients, compose, the sent list, status, revoke, resend."""

from __future__ import annotations

from datetime import timedelta

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user
from sqlalchemy import select

from portal import audit
from portal.audit import Action
from portal.auth.policy import fresh_auth, roles
from portal.crypto.errors import ContentDestroyed
from portal.extensions import db
from portal.models import Message, PickupLink, Role, User
from portal.services import accounts, messages, messaging
from portal.services.errors import ServiceError
from portal.services.messages import Upload
from portal.services.signin import actor_of
from portal.staff import forms
from portal.web.security import request_meta

bp = Blueprint("staff", __name__, url_prefix="/staff")


def _message(public_id: str) -> Message:
    message = db.session.scalar(select(Message).where(Message.public_id == public_id))
    if message is None or message.in_reply_to_id is not None:
        abort(404)
    return message


def _patient(public_id: str | None) -> User:
    user = db.session.scalar(select(User).where(User.public_id == (public_id or ""),
                                                User.role == Role.PATIENT))
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
    """The messages this member of staff sent, newest first, with their state."""
    rows = []
    for message in messaging.sent_by(db.session, current_user):
        patient = db.session.get(User, message.recipient_id)
        readable = _safe_read(message)
        rows.append((message, accounts.display_name(db.session, patient) if patient else "",
                     readable.subject if readable else "(deleted)"))
    return render_template("staff/index.html", rows=rows)


@bp.route("/patients", methods=["GET", "POST"])
@roles(Role.STAFF)
def patients() -> ResponseReturnValue:
    """Find a patient by email, or register a new one."""
    find = forms.FindPatientForm(request.args)
    register = forms.RegisterPatientForm()
    found = None
    if request.args.get("email") and find.validate():
        found = accounts.find_by_email(db.session, find.email.data or "")
        found = found if found is not None and found.role == Role.PATIENT else None
        if found is None:
            flash("No patient has that email address. Register them below.", "info")
            register.email.data = find.email.data
    if register.validate_on_submit():
        return _register(register)
    name = accounts.display_name(db.session, found) if found else None
    return render_template("staff/patients.html", find=find, register=register, found=found,
                           found_name=name)


def _register(form: forms.RegisterPatientForm) -> ResponseReturnValue:
    try:
        created = accounts.create_user(
            db.session, role=Role.PATIENT, email=form.email.data or "", name=form.name.data or "",
            dob=form.dob.data, issue_access_code=bool(form.access_code.data),
            actor=actor_of(current_user), meta=request_meta())
    except ServiceError as refused:
        db.session.rollback()
        form.email.errors = list(refused.messages)
        return render_template("staff/patients.html", find=forms.FindPatientForm(),
                               register=form, found=None, found_name=None)
    db.session.commit()
    return render_template("staff/registered.html", patient=created.user,
                           access_code=created.access_code)


@bp.route("/messages/new", methods=["GET", "POST"])
@roles(Role.STAFF)
def compose() -> ResponseReturnValue:
    """Write and send a message; attachments stream to the encrypted store."""
    patient = _patient(request.args.get("to"))
    form = forms.ComposeForm()
    if form.validate_on_submit():
        try:
            sent = _send(form, patient)
        except ServiceError as refused:
            db.session.rollback()
            form.attachments.errors = list(refused.messages)
        else:
            db.session.commit()
            flash("Message sent. The patient will get an email with a secure link.", "success")
            return redirect(url_for("staff.status", public_id=sent.message.public_id))
    return render_template("staff/compose.html", form=form, patient=patient,
                           patient_name=accounts.display_name(db.session, patient))


def _send(form: forms.ComposeForm, patient: User) -> messaging.Sent:
    uploads = [Upload(f.filename or "document.pdf", f.stream)
               for f in request.files.getlist(form.attachments.name) if f.filename]
    return messaging.send(
        db.session, sender=current_user, recipient=patient, subject=form.subject.data or "",
        body=form.body.data or "", body_format=form.body_format.data or "text",
        uploads=uploads, expires_in=timedelta(days=form.expires_days.data or 7),
        meta=request_meta())


@bp.get("/messages/<public_id>")
@roles(Role.STAFF)
def status(public_id: str) -> ResponseReturnValue:
    """A message's state: notices, first opened, downloads; revoke and resend."""
    message = _message(public_id)
    readable = _safe_read(message)
    patient = db.session.get(User, message.recipient_id)
    audit.record(db.session, Action.MESSAGE_VIEW, actor=actor_of(current_user),
                 meta=request_meta(), target_type="message", target_id=message.public_id,
                 patient_id=message.recipient_id, message_id=message.id,
                 details={"page": "staff_status"})
    db.session.commit()
    locked = db.session.scalar(select(PickupLink.locked_at).where(
        PickupLink.message_id == message.id, PickupLink.locked_at.is_not(None)).limit(1))
    return render_template(
        "staff/status.html", message=message, readable=readable, locked=locked,
        patient_name=accounts.display_name(db.session, patient) if patient else "",
        timeline=messaging.status(db.session, message), form=forms.ActionForm())


@bp.post("/messages/<public_id>/revoke")
@roles(Role.STAFF)
@fresh_auth
def revoke(public_id: str) -> ResponseReturnValue:
    """Stop the message and its links at once (re-authentication required)."""
    return _act(public_id, messaging.revoke, "Message revoked. Its link no longer works.")


@bp.post("/messages/<public_id>/resend")
@roles(Role.STAFF)
def resend(public_id: str) -> ResponseReturnValue:
    """Send a fresh link; the old one stops working."""
    return _act(public_id, messaging.resend, "A new link is on its way to the patient.")


def _act(public_id: str, action: object, done: str) -> ResponseReturnValue:
    if not forms.ActionForm().validate_on_submit():
        abort(400)
    message = _message(public_id)
    try:
        action(db.session, message, actor=actor_of(current_user),  # type: ignore[operator]
               meta=request_meta())
    except ServiceError as refused:
        db.session.rollback()
        flash(str(refused), "error")
    else:
        db.session.commit()
        flash(done, "success")
    return redirect(url_for("staff.status", public_id=public_id))
