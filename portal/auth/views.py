"""Sign-in (both factors), sign-out, re-authentication and the account page."""

from __future__ import annotations

from flask import (
    Blueprint,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_login import current_user, login_user, logout_user

from portal.audit import Action
from portal.auth import forms
from portal.auth.policy import (
    fresh_auth,
    home_for,
    is_internal_path,
    mark_reauthenticated,
    signed_in,
)
from portal.database import utcnow
from portal.extensions import db, limiter, login_manager
from portal.models import User
from portal.security import keyed
from portal.services import accounts, credentials
from portal.services import signin as auth_service
from portal.services.errors import ServiceError
from portal.web.security import request_meta

bp = Blueprint("auth", __name__)
PENDING_SECONDS = 5 * 60  # a half-finished sign-in (password right, code pending) expires
# Per account, only a flood guard: the protection against guessing is the service's pause
# (ASVS 2.2.1), which the right password and code pass once it ends. An hour-long 429 per
# account would let anyone lock anyone out; this one clears within a minute of the flood.
ACCOUNT_FLOOD_LIMIT = "60/minute"


def _account_key() -> str:
    """Return the rate-limit key of the account named in the form: a keyed hash, never the
    address itself (Flask-Limiter logs keys, and Redis stores them)."""
    email = (request.form.get("email") or "").strip().lower()[:254]
    secret = keyed.derive_secret(current_app.config["SECRET_KEY"], keyed.RATE_LIMIT_ACCOUNT)
    return "acct:" + keyed.keyed_hash(secret, email)


@login_manager.user_loader
def load_user(user_id: str) -> User | None:
    """Return the signed-in user, or None when the account is unknown or disabled.

    None too while the request answers a database outage: its 503 page must render
    without the database (portal.web.errors.database_down).
    """
    if g.get("database_down"):
        return None
    # The session's row came with its user, in this request's transaction
    # (portal.auth.sessions): no second query, and the same answer as the look-up below.
    user: User | None = getattr(session, "user", None)
    if user is None or user.public_id != user_id:
        user = accounts.find_by_public_id(db.session, user_id)
    return user if user is not None and not user.disabled else None


@bp.get("/")
def index() -> ResponseReturnValue:
    """Send visitors to sign in, and signed-in users to their home page."""
    if current_user.is_authenticated:
        return redirect(url_for(home_for(current_user.role)))
    return redirect(url_for("auth.signin"))


@bp.route("/signin", methods=["GET", "POST"])
@limiter.limit("20/minute;200/hour", methods=["POST"])
@limiter.limit(ACCOUNT_FLOOD_LIMIT, methods=["POST"], key_func=_account_key)
def signin() -> ResponseReturnValue:
    """First factor: email and password."""
    if current_user.is_authenticated:
        return redirect(url_for(home_for(current_user.role)))
    form, error = forms.SignInForm(), None
    if form.validate_on_submit():
        try:
            first = auth_service.check_password(
                db.session, form.email.data or "", form.password.data or "", request_meta()
            )
        except auth_service.SignInFailed as failed:
            error = str(failed)  # the 401 commits its count and event (web.transaction)
        else:
            return _after_password(first)
    status = 401 if error else 200
    return render_template("auth/signin.html", form=form, error=error), status


def _after_password(first: auth_service.FirstFactor) -> ResponseReturnValue:
    return begin_second_factor(first, request.args.get("next"))


def begin_second_factor(first: auth_service.FirstFactor, target: str | None) -> ResponseReturnValue:
    """After a right password: a fresh session id, then the code (or enrolment) step, and
    afterwards ``target`` when it is an internal path."""
    session.clear()
    # mypy: Flask types `session` as SessionMixin; ours is the server-side session
    #   (portal.auth.sessions) that has regenerate() and end().
    session.regenerate()  # type: ignore[attr-defined]
    if is_internal_path(target):
        session["next"] = target
    if not first.enrolled:
        session["enrol_uid"] = first.user.id
        return redirect(url_for("auth.enrol"))
    session["pending_uid"], session["pending_at"] = first.user.id, utcnow().timestamp()
    return redirect(url_for("auth.code"))


def pending_user() -> User | None:
    """Return the user half-way through sign-in, if that is still within five minutes."""
    started = float(session.get("pending_at", 0))
    if utcnow().timestamp() - started > PENDING_SECONDS:
        return None
    user = db.session.get(User, session.get("pending_uid", -1))
    return user if user is not None and not user.disabled else None


@bp.route("/signin/code", methods=["GET", "POST"])
@limiter.limit("20/minute;200/hour", methods=["POST"])
def code() -> ResponseReturnValue:
    """Second factor: a TOTP code, or a recovery code."""
    user = pending_user()
    if user is None:
        session.clear()
        flash("Your sign-in timed out. Please start again.", "error")
        return redirect(url_for("auth.signin"))
    form, error = forms.CodeForm(), None
    if form.validate_on_submit():
        try:
            remaining = auth_service.second_factor(
                db.session, user, form.code.data or "", request_meta()
            )
        except auth_service.SignInFailed as failed:
            error = str(failed)
        else:
            return complete_signin(user, remaining)
    return render_template("auth/code.html", form=form, error=error)


def complete_signin(user: User, recovery_left: int | None = None) -> ResponseReturnValue:
    """Log ``user`` in on a fresh session id and send them on (to ``next`` if internal)."""
    target = session.get("next")
    session.clear()
    # mypy: Flask types `session` as SessionMixin; ours is the server-side session
    #   (portal.auth.sessions) that has regenerate() and end().
    session.regenerate()  # type: ignore[attr-defined]
    login_user(user)
    session["uid"] = user.id
    mark_reauthenticated()
    if recovery_left is not None:
        flash(
            f"You used a recovery code. {recovery_left} remain; create new ones on your "
            "account page if you are running low.",
            "info",
        )
    return redirect(target if is_internal_path(target) else url_for(home_for(user.role)))


@bp.post("/signout")
@signed_in
def signout() -> ResponseReturnValue:
    """End the session on the server, so a copied cookie stops working too."""
    credentials.record_signout(db.session, current_user, request_meta())
    logout_user()
    # mypy: Flask types `session` as SessionMixin; ours is the server-side session
    #   (portal.auth.sessions) that has regenerate() and end().
    session.end()  # type: ignore[attr-defined]
    flash("You are signed out.", "success")
    return redirect(url_for("auth.signin"))


@bp.route("/reauth", methods=["GET", "POST"])
@signed_in
@limiter.limit("20/minute", methods=["POST"])
def reauth() -> ResponseReturnValue:
    """Prove the second factor again before a sensitive action."""
    form, error = forms.ReauthForm(back=request.args.get("next")), None
    if form.validate_on_submit():
        try:  # wrong codes count and pause the account as at sign-in; audits auth.reauth
            auth_service.verify_code(
                db.session,
                current_user._get_current_object(),
                form.code.data or "",
                request_meta(),
                action=Action.AUTH_REAUTH,
            )
        except auth_service.SignInFailed as failed:
            error = str(failed)
        else:
            mark_reauthenticated()
            back = form.back.data
            return redirect(back if is_internal_path(back) else url_for("auth.account"))
    return render_template("auth/reauth.html", form=form, error=error)


@bp.get("/account")
@signed_in
def account() -> ResponseReturnValue:
    """The user's own account: name, role, recovery codes left, security actions."""
    left = credentials.recovery_codes_left(db.session, current_user)
    return render_template(
        "auth/account.html",
        name=accounts.display_name(db.session, current_user),
        recovery_left=left,
        form=forms.ContinueForm(),
    )


@bp.post("/account/recovery-codes")
@signed_in
@fresh_auth
def regenerate_codes() -> ResponseReturnValue:
    """Replace the recovery codes and show the new ones once."""
    codes = credentials.regenerate_recovery_codes(db.session, current_user, request_meta())
    return render_template(
        "auth/recovery_codes.html", codes=codes, next_url=url_for("auth.account")
    )


@bp.route("/account/password", methods=["GET", "POST"])
@signed_in
@fresh_auth
@limiter.limit("10/minute", methods=["POST"])
def change_password() -> ResponseReturnValue:
    """Change the password (the current one first, ASVS 2.1.6); every other session ends."""
    form, status = forms.ChangePasswordForm(), 200
    if form.validate_on_submit():
        refused = _try_password_change(form)
        if refused is None:
            # mypy: Flask types `session` as SessionMixin; ours is the server-side session
            #   (portal.auth.sessions) that has regenerate() and end().
            session.regenerate()  # type: ignore[attr-defined]
            flash("Your password is changed. Other sessions were signed out.", "success")
            return redirect(url_for("auth.account"))
        status = refused
    return render_template(
        "auth/new_password.html",
        form=form,
        hint=forms.CHOICE_HINT,
        title="Change your password",
        back=request.path,
    ), status


def _try_password_change(form: forms.ChangePasswordForm) -> int | None:
    """Change the password as the form asks; return None when done, else the page's status."""
    try:
        credentials.change_password(
            db.session,
            current_user._get_current_object(),
            form.current_password.data or "",
            form.password.data or "",
            request_meta(),
        )
    except auth_service.SignInFailed as failed:  # the 401 commits the count (ASVS 2.2.1)
        form.current_password.errors = [str(failed)]
        return 401
    except ServiceError as refused:
        db.session.rollback()
        form.password.errors = list(refused.messages)
        return 200
    return None
