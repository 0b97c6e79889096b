"""Demo mode only (PORTAL_DEMO): the demo logins with their current TOTP codes.

Registered only when demo mode is on, and only ever shows the seeded demo
accounts, so a newcomer can walk every role's path on one machine.
"""

from __future__ import annotations

from flask import Blueprint, render_template
from flask.typing import ResponseReturnValue

from portal.database import utcnow
from portal.extensions import db
from portal.security import otp
from portal.services import accounts, signin

bp = Blueprint("demo", __name__, url_prefix="/demo")


@bp.get("/")
def index() -> ResponseReturnValue:
    """The demo accounts, their passwords and their authenticator codes right now."""
    from portal.commands.demo import ACCOUNTS

    step = int(utcnow().timestamp() // otp.STEP_SECONDS)
    rows = []
    for account in ACCOUNTS:
        user = accounts.find_by_email(db.session, account.email)
        secret = signin.totp_secret(db.session, user) if user else None
        code = otp.code_at(secret, step) if secret and user and user.totp_enabled_at else None
        rows.append((account, code))
    seconds_left = otp.STEP_SECONDS - int(utcnow().timestamp()) % otp.STEP_SECONDS
    return render_template("demo/index.html", rows=rows, seconds_left=seconds_left)
