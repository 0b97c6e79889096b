"""Demo mode only (PORTAL_DEMO): the demo logins with their current TOTP codes.

Registered only when demo mode is on, and only ever shows the seeded demo
accounts, so a newcomer can walk every role's path on one machine.
"""

from __future__ import annotations

import mailbox
import re
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from flask import Blueprint, abort, current_app, render_template
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


@bp.get("/mail")
def mail() -> ResponseReturnValue:
    """The local mail sink's inbox, newest first (demo mode only)."""
    return render_template("demo/mail.html", items=sink_messages(), current=None)


@bp.get("/mail/<key>")
def mail_message(key: str) -> ResponseReturnValue:
    """One email from the sink, as its recipient would read it."""
    items = sink_messages()
    current = next((item for item in items if item["key"] == key), None)
    if current is None:
        abort(404)
    return render_template("demo/mail.html", items=items, current=current)


def sink_messages() -> list[dict[str, Any]]:
    """Return the sink's messages (key, to, subject, date, text: str; links: list), newest first."""
    folder = Path(current_app.config["DEMO_MAILDIR"])
    if not (folder / "new").is_dir():
        return []
    box = mailbox.Maildir(folder, create=False)
    items: list[dict[str, Any]] = []
    for key, message in box.items():
        text = _plain_text(message)
        items.append(
            {
                "key": key,
                "to": str(message["To"] or ""),
                "subject": str(message["Subject"] or ""),
                "date": str(message["Date"] or ""),
                "text": text,
                "links": _LINK.findall(text),
            }
        )
    items.sort(key=lambda item: _when(item["date"]), reverse=True)
    return items


_LINK = re.compile(r"https?://[^\s<>\"]+")


def _plain_text(message: mailbox.MaildirMessage) -> str:
    for part in message.walk():
        if part.get_content_type() == "text/plain":
            payload = part.get_payload(decode=True)  # bytes for a non-multipart part
            if isinstance(payload, bytes):
                return payload.decode(part.get_content_charset() or "utf-8", "replace")
    return ""


def _when(raw: str) -> float:
    try:
        return parsedate_to_datetime(raw).timestamp()
    except (TypeError, ValueError):
        return 0.0
