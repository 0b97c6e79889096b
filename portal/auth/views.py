"""Sign-in views."""

from __future__ import annotations

from flask import Blueprint, redirect, render_template, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import select

from portal.auth.forms import SignInForm
from portal.extensions import db, login_manager
from portal.models import User

bp = Blueprint("auth", __name__)


@bp.get("/")
def index() -> ResponseReturnValue:
    """Send visitors to sign in."""
    return redirect(url_for("auth.signin"))


@bp.route("/signin", methods=["GET", "POST"])
def signin() -> ResponseReturnValue:
    """Show the sign-in form; check the first factor."""
    form = SignInForm()
    error = None
    if form.validate_on_submit():
        error = "The email or password is not right."
    return render_template("auth/signin.html", form=form, error=error)


@login_manager.user_loader
def load_user(user_id: str) -> User | None:
    """Return the signed-in user, or None when the account is unknown or disabled."""
    user = db.session.scalar(select(User).where(User.public_id == user_id))
    return user if user is not None and not user.disabled else None
