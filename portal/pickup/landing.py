"""The emailed link and the first-pickup steps: landing, Continue, identity, password.

GET (and HEAD) of a link only shows a page, because mail scanners fetch every
link and some submit forms too: nothing counts as a pickup until the recipient
has passed password and TOTP. The POST moves the link's *id* (never the token)
into the server-side session and redirects to ``/pickup``, a URL without it.
"""

from __future__ import annotations

import hashlib

from flask import abort, make_response, redirect, render_template, request, session, url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user

from portal.auth.views import begin_second_factor
from portal.extensions import db, limiter
from portal.models import Message, PickupLink, User
from portal.models.messages import LinkState
from portal.pickup import bp, forms
from portal.services import pickup
from portal.services import signin as auth_service
from portal.services.errors import ServiceError
from portal.web.errors import page
from portal.web.security import request_meta

LINK_KEY = "pickup_link"  # session: id of the link being followed
VERIFIED_KEY = "pickup_verified"  # session: id of the link whose recipient proved identity


def _not_renew() -> bool:
    return request.form.get("intent") != "renew"


def _link_key() -> str:
    token = str((request.view_args or {}).get("token", ""))
    return "renew:" + hashlib.sha256(token.encode()).hexdigest()


def _invalid(renewed: bool = False) -> ResponseReturnValue:
    # One page for unknown, expired, revoked and malformed links: nothing tells which.
    page = render_template("pickup/link_invalid.html", form=forms.RenewForm(), renewed=renewed)
    return page, 200 if renewed else 404


@bp.route("/p/<token>", methods=["GET", "POST"])
@limiter.limit("60/minute")
@limiter.limit("10/hour", methods=["POST"], exempt_when=_not_renew)
@limiter.limit("3/hour", methods=["POST"], key_func=_link_key, exempt_when=_not_renew)
def link(token: str) -> ResponseReturnValue:
    """A pickup link: GET/HEAD show a Continue button (audited link.open); POST acts."""
    if request.method == "POST":
        return _renew(token) if request.form.get("intent") == "renew" else _continue(token)
    found = pickup.link_opened(db.session, token, request_meta())
    if found is None:
        return _invalid()
    return _landing(found)


def _landing(found: PickupLink, error: str | None = None) -> ResponseReturnValue:
    """The link's page. A returning recipient signs in right here (password, then code),
    which saves a screen; anyone else gets Continue. Either way a GET changes nothing."""
    recipient = db.session.get(User, found.recipient_id)
    if (
        not current_user.is_authenticated
        and recipient is not None
        and pickup.is_enrolled(recipient)
    ):
        return render_template(
            "pickup/landing.html", form=forms.LinkSignInForm(), sign_in=True, error=error
        ), 401 if error else 200
    return render_template("pickup/landing.html", form=forms.ContinueForm(), sign_in=False)


def _renew(token: str) -> ResponseReturnValue:
    if forms.RenewForm().validate_on_submit():
        pickup.renew(db.session, token, request_meta())
    return _invalid(renewed=True)


def _continue(token: str) -> ResponseReturnValue:
    found = pickup.find_link(db.session, token)
    usable = found is not None and pickup.link_state(db.session, found) == LinkState.USABLE
    if not usable or not forms.ContinueForm().validate_on_submit():
        return _invalid()
    assert found is not None
    if "password" in request.form and not current_user.is_authenticated:
        return _sign_in_from_link(found)
    if not current_user.is_authenticated:
        session.clear()
        # mypy: Flask types `session` as SessionMixin; ours is the server-side session
        #   (portal.auth.sessions) that has regenerate() and end().
        session.regenerate()  # type: ignore[attr-defined]
    session[LINK_KEY] = found.id
    return redirect(url_for("pickup.start"))


def _sign_in_from_link(found: PickupLink) -> ResponseReturnValue:
    """The password typed on the link's page: the first factor for the link's recipient only."""
    form = forms.LinkSignInForm()
    recipient = db.session.get(User, found.recipient_id)
    if recipient is None or not form.validate_on_submit():
        return _landing(found, "Enter your password.")
    try:
        first = auth_service.check_password(
            db.session, recipient.email, form.password.data or "", request_meta()
        )
    except auth_service.SignInFailed as failed:  # counted: committed with the 401 page
        return _landing(found, str(failed))
    message = db.session.get(Message, found.message_id)
    assert message is not None
    return begin_second_factor(first, url_for("pickup.message", message_id=message.public_id))


def _session_link() -> PickupLink:
    found = pickup.usable_link(db.session, session.get(LINK_KEY))
    if found is None:
        abort(make_response(render_template("pickup/session_expired.html"), 404))
    return found


@bp.get("/pickup")
def start() -> ResponseReturnValue:
    """Send the link's follower on: to the message, to sign in, or to the first-pickup steps."""
    found = _session_link()
    message = db.session.get(Message, found.message_id)
    assert message is not None
    target = url_for("pickup.message", message_id=message.public_id)
    if current_user.is_authenticated:
        session.pop(LINK_KEY, None)
        if current_user.id != found.recipient_id:
            pickup.deny(
                db.session,
                message,
                current_user._get_current_object(),
                request_meta(),
                "not_recipient",
            )
            return page(404)  # returned, not raised: the boundary commits the denial
        return redirect(target)
    recipient = db.session.get(User, found.recipient_id)
    if recipient is not None and pickup.is_enrolled(recipient):
        return redirect(url_for("auth.signin", next=target))
    return redirect(url_for("pickup.verify"))


def _first_timer() -> tuple[PickupLink, User]:
    found = _session_link()
    user = db.session.get(User, found.recipient_id)
    if current_user.is_authenticated or user is None or pickup.is_enrolled(user):
        abort(redirect(url_for("pickup.start")))
    return found, user


def _locked(can_verify: bool) -> ResponseReturnValue:
    return render_template("pickup/locked.html", can_verify=can_verify), 403


@bp.route("/pickup/verify", methods=["GET", "POST"])
@limiter.limit("10/minute;50/hour", methods=["POST"])
def verify() -> ResponseReturnValue:
    """First pickup: prove identity with the date of birth or the access code on file."""
    found, user = _first_timer()
    method = pickup.identity_method(db.session, user)
    if found.locked_at is not None or method is None:
        return _locked(method is not None)
    form = forms.AccessCodeForm() if method == "access_code" else forms.DobForm()
    error = None
    if form.validate_on_submit():
        if _check(found, user, method, form.answer.data or ""):
            session[VERIFIED_KEY] = found.id
            return redirect(url_for("pickup.password"))
        if found.locked_at is not None:
            return _locked(True)
        left = pickup.MAX_VERIFY_FAILURES - found.verify_failures
        error = (
            f"That does not match what {_org()} has on file. "
            f"{left} {'try' if left == 1 else 'tries'} left."
        )
    status = 401 if error else 200
    return render_template("pickup/verify.html", form=form, method=method, error=error), status


def _check(found: PickupLink, user: User, method: str, answer: str) -> bool:
    if method == "dob":
        answer = pickup.parse_dob(answer) or ""
    try:
        ok = pickup.verify_identity(db.session, found, user, method, answer, request_meta())
    except pickup.LinkLocked:
        ok = False
    return ok


def _org() -> str:
    from flask import current_app

    return str(current_app.config["ORG_NAME"])


@bp.route("/pickup/password", methods=["GET", "POST"])
@limiter.limit("10/minute", methods=["POST"])
def password() -> ResponseReturnValue:
    """First pickup, after the identity check: choose a password, then set up the app."""
    found, user = _first_timer()
    if session.get(VERIFIED_KEY) != found.id:
        return redirect(url_for("pickup.verify"))
    form = forms.PasswordForm()
    if form.validate_on_submit():
        try:
            auth_service.set_password(db.session, user, form.password.data or "", request_meta())
        except ServiceError as refused:
            db.session.rollback()
            form.password.errors = list(refused.messages)
        else:
            return _to_enrolment(found, user)
    return render_template("pickup/password.html", form=form, hint=forms.CHOICE_HINT)


def _to_enrolment(found: PickupLink, user: User) -> ResponseReturnValue:
    message = db.session.get(Message, found.message_id)
    assert message is not None
    session.clear()
    # mypy: Flask types `session` as SessionMixin; ours is the server-side session
    #   (portal.auth.sessions) that has regenerate() and end().
    session.regenerate()  # type: ignore[attr-defined]
    session["enrol_uid"] = user.id
    # complete_signin (after enrolment) sends the patient on to the message.
    session["next"] = url_for("pickup.message", message_id=message.public_id)
    return redirect(url_for("auth.enrol"))
