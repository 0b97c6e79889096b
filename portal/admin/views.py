"""Admin pages: list, invite, disable/enable, unlock accounts, reset MFA; key status."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user

from portal.admin.forms import NewAccountForm
from portal.audit import actor_of
from portal.auth.forms import ContinueForm
from portal.auth.policy import fresh_auth, roles
from portal.extensions import db
from portal.models import Role, User
from portal.services import accounts, admin
from portal.services import keys as key_service
from portal.services.errors import ServiceError
from portal.services.paging import PageError
from portal.web.paging import bad_page, page_request
from portal.web.security import request_meta

bp = Blueprint("admin", __name__, url_prefix="/admin")


def _user(public_id: str) -> User:
    user = accounts.find_by_public_id(db.session, public_id)
    if user is None:
        abort(404)
    return user


@bp.get("/users")
@roles(Role.ADMIN)
def users() -> ResponseReturnValue:
    """Every account that is not a patient's, with its state; then every locked account of
    any role (patients included), so an admin can find and unlock it. Each list is paged on
    its own (``after``/``before``, ``locked_after``/``locked_before``)."""
    try:
        named = admin.staff_accounts(db.session, page_request())
        locked = admin.locked_accounts(db.session, page_request("locked_"))
    except PageError as refused:
        return bad_page(refused, url_for("admin.users"))
    return render_template("admin/users.html", users=named, locked=locked, form=ContinueForm())


@bp.route("/users/new", methods=["GET", "POST"])
@roles(Role.ADMIN)
def new_user() -> ResponseReturnValue:
    """Invite staff, an auditor or an admin: they get a one-time link by email."""
    form = NewAccountForm()
    if form.validate_on_submit():
        try:
            admin.invite(
                db.session,
                role=form.role.data or "",
                email=form.email.data or "",
                name=form.name.data or "",
                actor=actor_of(current_user),
                meta=request_meta(),
            )
        except ServiceError as refused:
            db.session.rollback()
            form.email.errors = list(refused.messages)
        else:
            flash("Invitation sent. The link works for 72 hours.", "success")
            return redirect(url_for("admin.users"))
    return render_template("admin/new_user.html", form=form)


@bp.post("/users/<public_id>/<any(disable, enable):change>")
@roles(Role.ADMIN)
@fresh_auth
def toggle(public_id: str, change: str) -> ResponseReturnValue:
    """Disable (ends their sessions at once) or enable an account."""
    if not ContinueForm().validate_on_submit():
        abort(400)
    try:
        admin.set_disabled(
            db.session,
            _user(public_id),
            change == "disable",
            actor=actor_of(current_user),
            meta=request_meta(),
        )
    except ServiceError as refused:
        flash(str(refused), "error")
        return redirect(url_for("admin.users"))
    flash(f"Account {change}d.", "success")
    return redirect(url_for("admin.users"))


@bp.post("/users/<public_id>/reset-mfa")
@roles(Role.ADMIN)
@fresh_auth
def reset_mfa(public_id: str) -> ResponseReturnValue:
    """Reset someone who lost both phone and recovery codes: they get a new invite."""
    if not ContinueForm().validate_on_submit():
        abort(400)
    admin.reset_mfa(db.session, _user(public_id), actor=actor_of(current_user), meta=request_meta())
    flash(
        "Sign-in reset. They have been emailed a link to set a password and enrol again.", "success"
    )
    return redirect(url_for("admin.users"))


@bp.post("/users/<public_id>/unlock")
@roles(Role.ADMIN)
@fresh_auth
def unlock(public_id: str) -> ResponseReturnValue:
    """Lift the lock after too many failed attempts; password and authenticator stay."""
    if not ContinueForm().validate_on_submit():
        abort(400)
    try:
        admin.unlock(db.session, _user(public_id), actor_of(current_user), request_meta())
    except ServiceError as refused:
        flash(str(refused), "error")
        return redirect(url_for("admin.users"))
    flash("Account unlocked. They can sign in with their password and code.", "success")
    return redirect(url_for("admin.users"))


@bp.get("/keys")
@roles(Role.ADMIN)
@fresh_auth  # key pages need a code from the last 5 minutes, as the README promises
def keys() -> ResponseReturnValue:
    """Key-encryption keys and how many data keys each wraps (rotate with `portal keys`)."""
    ring = key_service.keyring()
    return render_template(
        "admin/keys.html",
        counts=key_service.status(db.session),
        versions=ring.versions(),
        active=ring.active_version,
    )
