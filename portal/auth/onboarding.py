"""TOTP enrolment, invites (staff, auditors, admins) and password reset."""

from __future__ import annotations

from flask import flash, redirect, render_template, request, session, url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user
from markupsafe import Markup

from portal.audit import Action
from portal.auth import forms
from portal.auth.policy import fresh_auth, signed_in
from portal.auth.views import bp, complete_signin
from portal.extensions import db, limiter
from portal.models import User
from portal.models.notifications import NoticeKind
from portal.security import otp, qr
from portal.services import account_links, credentials, notices
from portal.services import signin as auth_service
from portal.services.errors import ServiceError
from portal.web.security import request_meta


def first_enrolment_user() -> User | None:
    """Return who enrols a first authenticator (after a password, invite or first pickup).

    None for an account that already has one: an enrolled factor is never
    replaced this way, so a password alone cannot enrol a factor for an
    enrolled account (NIST SP 800-63B 6.1.2.1).
    """
    user = db.session.get(User, session["enrol_uid"]) if "enrol_uid" in session else None
    if user is None or user.disabled or user.totp_enabled_at is not None:
        return None
    return user


def changing_user() -> User | None:
    """Return the signed-in user when this session started a change of authenticator app."""
    if current_user.is_authenticated and session.get("mfa_change"):
        user: User = current_user._get_current_object()  # flask_login is untyped
        return user
    return None


@bp.route("/mfa/enrol", methods=["GET", "POST"])
@limiter.limit("20/minute", methods=["POST"])
def enrol() -> ResponseReturnValue:
    """Show the QR code and secret; activate them once a correct code comes back."""
    changing = changing_user()
    if changing is not None:
        return _change(changing)
    user = first_enrolment_user()
    if user is None:
        return redirect(url_for("auth.signin"))
    secret, session["enrol_issue"] = auth_service.start_enrolment(
        db.session, user, session.get("enrol_issue")
    )
    form, error = forms.CodeForm(), None
    if form.validate_on_submit():
        try:
            codes = auth_service.finish_enrolment(
                db.session, user, form.code.data or "", request_meta(), session.get("enrol_issue")
            )
        except ServiceError as wrong:  # the wrong code counts: committed with the page
            error = str(wrong)
        else:
            return _enrolled(user, codes)
    return _enrol_page(user, secret, form, error)


def _change(user: User) -> ResponseReturnValue:
    """A change of authenticator app: the pending secret counts only once a code proves it."""
    secret = credentials.pending_mfa_secret(db.session, user)
    form, error = forms.CodeForm(), None
    if secret is not None and form.validate_on_submit():
        try:
            codes = credentials.finish_mfa_change(
                db.session, user, form.code.data or "", request_meta()
            )
        except credentials.ChangeExpired:
            secret = None
        except ServiceError as wrong:  # nothing was written: the old app still works
            error = str(wrong)
        else:
            return _enrolled(user, codes)
    if secret is None:
        session.pop("mfa_change", None)
        flash(credentials.CHANGE_EXPIRED, "error")
        return redirect(url_for("auth.account"))
    return _enrol_page(user, secret, form, error, changing=True)


def _enrol_page(
    user: User, secret: str, form: forms.CodeForm, error: str | None, changing: bool = False
) -> ResponseReturnValue:
    uri = otp.provisioning_uri(secret, user.email, _issuer())
    return render_template(
        "auth/enrol.html",
        form=form,
        error=error,
        secret=secret,
        changing=changing,
        qr=Markup(qr.qr_svg(uri)),  # noqa: S704 - SVG made by segno
    )


def _issuer() -> str:
    from flask import current_app

    return str(current_app.config["ORG_NAME"])


def _enrolled(user: User, codes: list[str]) -> ResponseReturnValue:
    session.pop("mfa_change", None)
    session.pop("enrol_uid", None)
    done = complete_signin(user)  # logs in on a fresh session id; honours "next"
    flash("Your authenticator app is set up.", "success")
    return render_template(
        "auth/recovery_codes.html",
        codes=codes,
        # mypy: complete_signin() returned a redirect here (checked by the
        #   branch), which has a location.
        next_url=done.location,  # type: ignore[union-attr]
    )


@bp.post("/account/mfa")
@signed_in
@fresh_auth
@limiter.limit("10/minute")
def change_mfa() -> ResponseReturnValue:
    """Start setting up a new authenticator app; the enrolled one works until the new one is
    proved, so walking away changes nothing."""
    try:
        credentials.start_mfa_change(db.session, current_user._get_current_object(), request_meta())
    except ServiceError as refused:
        flash(str(refused), "error")
        return redirect(url_for("auth.account"))
    session["mfa_change"] = True
    return redirect(url_for("auth.enrol"))


@bp.route("/invite/<token>", methods=["GET", "POST"])
@limiter.limit("30/minute")
def invite(token: str) -> ResponseReturnValue:
    """An emailed invite. GET only shows a button (mail scanners follow links); POST acts."""
    return _link_landing(token, "invite", "auth.welcome", "auth/invite.html")


def _link_landing(token: str, purpose: str, then: str, template: str) -> ResponseReturnValue:
    """Scanner-safe landing of an emailed one-time link: GET shows a Continue button; the
    POST moves the link's id (never the token) into a fresh session and goes on."""
    row = account_links.find(db.session, token, purpose)
    form = forms.ContinueForm()
    if row is None:
        return render_template("auth/link_invalid.html"), 404
    if form.validate_on_submit():
        session.clear()
        # mypy: Flask types `session` as SessionMixin; ours is the server-side session
        #   (portal.auth.sessions) that has regenerate() and end().
        session.regenerate()  # type: ignore[attr-defined]
        session[f"{purpose}_tid"] = row.id
        return redirect(url_for(then))
    return render_template(template, form=form, action=request.path)


@bp.route("/welcome", methods=["GET", "POST"])
def welcome() -> ResponseReturnValue:
    """Invite, step two: choose a password, then enrol the authenticator app."""
    row = account_links.valid_by_id(db.session, session.get("invite_tid"), "invite")
    if row is None:
        return render_template("auth/link_invalid.html"), 404
    user = db.session.get(User, row.user_id)
    form = forms.NewPasswordForm()
    if user is not None and form.validate_on_submit():
        try:
            auth_service.set_password(db.session, user, form.password.data or "", request_meta())
        except ServiceError as refused:
            form.password.errors = list(refused.messages)
        else:
            return _accept_invite(row, user)
    return render_template(
        "auth/new_password.html",
        form=form,
        hint=forms.CHOICE_HINT,
        title="Choose your password",
        back=None,
    )


def _accept_invite(row: object, user: User) -> ResponseReturnValue:
    # mypy: row is the AccountToken that account_links.landing() returned; the view keeps it as
    #   object.
    if not account_links.consume(db.session, row):  # type: ignore[arg-type]
        db.session.rollback()
        return render_template("auth/link_invalid.html"), 404
    account_links.record_invite_accepted(db.session, user, request_meta())
    session.pop("invite_tid", None)
    session["enrol_uid"] = user.id
    return redirect(url_for("auth.enrol"))


@bp.route("/reset", methods=["GET", "POST"])
@limiter.limit("5/minute;20/hour", methods=["POST"])
def reset_request() -> ResponseReturnValue:
    """Ask for a password reset link; the answer is the same whether the email exists or not."""
    form = forms.ResetRequestForm()
    if form.validate_on_submit():
        account_links.request_reset(db.session, form.email.data or "", request_meta())
        return render_template("auth/reset_sent.html")
    return render_template("auth/reset_request.html", form=form)


@bp.route("/reset/<token>", methods=["GET", "POST"])
@limiter.limit("30/minute")
def reset_landing(token: str) -> ResponseReturnValue:
    """An emailed reset link: GET shows a button, POST moves the link into the session."""
    return _link_landing(token, "reset", "auth.reset_new", "auth/reset_landing.html")


@bp.route("/reset/new", methods=["GET", "POST"])
@limiter.limit("10/minute", methods=["POST"])
def reset_new() -> ResponseReturnValue:
    """Choose a new password; the second factor is still required (a link alone is not enough)."""
    row = account_links.valid_by_id(db.session, session.get("reset_tid"), "reset")
    user = db.session.get(User, row.user_id) if row else None
    if row is None or user is None:
        return render_template("auth/link_invalid.html"), 404
    form = forms.ResetForm()
    if form.validate_on_submit():
        outcome = _try_reset(row, user, form)
        if outcome is not None:
            return outcome
    return render_template("auth/reset_new.html", form=form, hint=forms.CHOICE_HINT)


def _try_reset(row: object, user: User, form: forms.ResetForm) -> ResponseReturnValue | None:
    try:  # the same pause and 100-failure lock as sign-in; audits auth.reset
        auth_service.verify_code(
            db.session, user, form.code.data or "", request_meta(), action=Action.AUTH_RESET
        )
    except auth_service.SignInFailed as failed:  # counted: committed with the page
        form.code.errors = [str(failed)]
        return None
    try:
        auth_service.set_password(db.session, user, form.password.data or "", request_meta())
    except ServiceError as refused:
        db.session.rollback()
        form.password.errors = list(refused.messages)
        return None
    # mypy: row is the AccountToken that account_links.landing() returned; the view keeps it as
    #   object.
    if not account_links.consume(db.session, row):  # type: ignore[arg-type]
        db.session.rollback()  # a concurrent reset used this link first: change nothing
        return render_template("auth/link_invalid.html"), 404
    # ASVS 2.2.3: tell the account holder, with no personal details, that it changed.
    notices.enqueue(db.session, kind=NoticeKind.PASSWORD_CHANGED, recipient=user, url=None)
    session.clear()
    flash("Your password is changed. Sign in with it now.", "success")
    return redirect(url_for("auth.signin"))
