"""``portal demo``: migrate, seed demo accounts, run every process, print where to go."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import click
from flask import Flask, current_app
from flask.cli import ScriptInfo, pass_script_info

from portal.audit import NO_REQUEST, SYSTEM
from portal.commands.base import one_transaction
from portal.config import settings_of
from portal.database import utcnow
from portal.extensions import db
from portal.migrate import upgrade
from portal.models import User
from portal.security import otp
from portal.security.scan import ClamdAddress, Scanner, Timeouts
from portal.services import accounts, signin, teams

DEMO_PORT = 5000
DEMO_SMTP_PORT = 8025
DEBIAN_CLAMD = "/var/run/clamav/clamd.ctl"  # clamav-daemon's socket on Debian and Ubuntu
PING_TIMEOUT = 1.0  # seconds: the demo starts at once whether or not a clamd answers


@dataclass(frozen=True)
class DemoAccount:
    """A demo login; the passwords are public, so demo data must never be real."""

    role: str
    email: str
    name: str
    password: str
    dob: date | None = None


ACCOUNTS = (
    DemoAccount("staff", "staff@demo.example", "Sam Staffer", "Lantern-Ocelot-Ripple-41"),
    DemoAccount("staff", "records@demo.example", "Rhea Records", "Pebble-Saffron-Orbit-64"),
    DemoAccount(
        "patient", "patient@demo.example", "Pat Demo", "Harbour-Quince-Velvet-73", date(1980, 1, 31)
    ),
    DemoAccount("auditor", "auditor@demo.example", "Ada Auditor", "Meadow-Cobalt-Thistle-58"),
    DemoAccount("admin", "admin@demo.example", "Al Admin", "Granite-Willow-Saffron-26"),
)
# Care teams: (name, open to patients, description, members). Sam is in one team, so
# `portal messages send --from staff@demo.example` needs no --team; Rhea is in both and
# chooses one when she writes.
TEAMS = (
    (
        "Cardiology clinic",
        True,
        "Heart care: results, appointments, questions.",
        ("staff@demo.example", "records@demo.example"),
    ),
    ("Records office", False, "Copies of medical records.", ("records@demo.example",)),
)


@one_transaction
def seed() -> None:
    """Create the demo accounts and care teams that do not exist yet (idempotent), in one
    transaction."""
    for account in ACCOUNTS:
        if accounts.find_by_email(db.session, account.email) is None:
            user = accounts.create_user(
                db.session,
                role=account.role,
                email=account.email,
                name=account.name,
                dob=account.dob,
                password=account.password,
                actor=SYSTEM,
                meta=NO_REQUEST,
            ).user
            _enrol(user)
    _seed_teams()


def _seed_teams() -> None:
    """Create the demo teams that do not exist yet, with their demo staff in them."""
    for name, open_to_patients, description, staff in TEAMS:
        team = teams.find_by_name(db.session, name) or teams.create_team(
            db.session,
            name=name,
            description=description,
            open_to_patients=open_to_patients,
            actor=SYSTEM,
            meta=NO_REQUEST,
        )
        members = {u.email for u in teams.members_of(db.session, team, active_only=False)}
        for email in staff:
            if email not in members:
                teams.add_member(db.session, team, email, actor=SYSTEM, meta=NO_REQUEST)


def _enrol(user: User) -> None:
    """Enrol a demo account's authenticator with a code from the step before, so every
    code the demo page shows from now on is still unused."""
    secret, shown = signin.start_enrolment(db.session, user, None)
    step = int(utcnow().timestamp() // otp.STEP_SECONDS) - 1
    signin.finish_enrolment(db.session, user, otp.code_at(secret, step), NO_REQUEST, shown)


def demo_scanning(
    configured: str | None, told_off: bool, default: str = DEBIAN_CLAMD
) -> tuple[str | None, str]:
    """Decide the demo's malware scanning: return (the clamd socket to scan with when none is
    ``configured``, or None; the banner's line saying whether scanning is on and why).

    The demo scans when a clamd answers PING: the configured one, else Debian's at
    ``default``. Unless ``told_off`` (PORTAL_SCAN_UPLOADS=off), a configured clamd that does
    not answer means uploads are refused until it does (required mode), and is said so.
    """
    if told_off:
        return None, "malware scanning: off (PORTAL_SCAN_UPLOADS=off)"
    where = configured or default
    answers = Scanner(ClamdAddress.parse(where), timeouts=Timeouts(connect=PING_TIMEOUT)).ping()
    if answers:
        return (None if configured else where), f"malware scanning: on (clamd at {where})"
    if configured:
        return (
            None,
            f"malware scanning: required, but clamd at {where} does not answer (uploads refused)",
        )
    return None, f"malware scanning: off (no clamd found at {where})"


def _banner(app: Flask, port: int, maildir: Path, scanning: str) -> str:
    base = f"http://127.0.0.1:{port}"
    lines = [
        "",
        "Pickup Portal demo is running (test data only).",
        "",
        f"  Portal:        {base}/signin",
        f"  Mail sink:     {base}/demo/mail  (emails land in {maildir})",
        f"  Demo codes:    {base}/demo/  (current authenticator codes of the demo logins)",
        f"  Health:        {base}/healthz",
        f"  {scanning}",
        "",
        "  Demo logins (email / password):",
    ]
    lines += [f"    {a.role:<8} {a.email:<24} {a.password}" for a in ACCOUNTS]
    lines += ["", "  Care teams:"]
    lines += [
        f"    {n}{' (patients may write first)' if o else ''}: {', '.join(m)}"
        for n, o, _, m in TEAMS
    ]
    lines += ["", f"  Instance folder: {app.config['INSTANCE_DIR']}", "  Stop with Ctrl-C.", ""]
    return "\n".join(lines)


@click.command("demo")
@click.option("--port", default=DEMO_PORT, show_default=True, type=int)
@click.option("--smtp-port", default=DEMO_SMTP_PORT, show_default=True, type=int)
@pass_script_info
def demo(info: ScriptInfo, port: int, smtp_port: int) -> None:
    """Migrate, seed demo accounts, start the mail sink, the notifier and the portal."""
    # The app `portal` loaded knows the instance folder; the demo's own app is built after
    # the environment below is set (demo mode, the sink as SMTP server), through the same
    # factory hook, so a malformed setting still stops it with the one-line error.
    folder = Path(current_app.config["INSTANCE_DIR"])
    maildir, cert = Path(current_app.config["DEMO_MAILDIR"]), folder / "sink-cert.pem"
    bounces = Path(current_app.config.get("BOUNCE_MAILDIR") or folder / "bounces")
    processes = [_start_sink(smtp_port, maildir, cert, bounces)]
    os.environ.setdefault("PORTAL_BASE_URL", f"http://127.0.0.1:{port}")
    os.environ.update(
        PORTAL_DEMO="1",
        PORTAL_SMTP_HOST="127.0.0.1",
        PORTAL_SMTP_PORT=str(smtp_port),
        PORTAL_SMTP_TLS="starttls",
        PORTAL_SMTP_CA_FILE=str(cert),
        PORTAL_MAIL_FROM="notices@demo.example",
        PORTAL_BOUNCE_MAILDIR=str(bounces),  # the sink bounces mail to bounce-hard@... here
    )
    settings = settings_of(current_app)
    found, scanning = demo_scanning(
        settings.clamd_socket, os.environ.get("PORTAL_SCAN_UPLOADS") == "off"
    )
    if found is not None:
        os.environ["PORTAL_CLAMD_SOCKET"] = found  # required mode follows (portal.config)
    if info.create_app is None:  # portal.cli.main always passes its factory hook
        raise click.UsageError("run the demo as `portal demo`")
    app = info.create_app()
    with app.app_context():
        upgrade(db.engine)
        seed()
    processes.append(subprocess.Popen([sys.executable, "-m", "notifier", "run"]))
    processes.append(
        subprocess.Popen([sys.executable, "-m", "portal", "serve", "--port", str(port)])
    )
    click.echo(_banner(app, port, maildir, scanning))
    _wait(processes)


def _start_sink(port: int, maildir: Path, cert: Path, bounces: Path) -> subprocess.Popen[bytes]:
    """Start the TLS mail sink (bouncing into ``bounces``) and wait until its certificate is
    written."""
    cert.unlink(missing_ok=True)
    sink = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "notifier",
            "sink",
            "--port",
            str(port),
            "--maildir",
            str(maildir),
            "--cert",
            str(cert),
            "--bounce-maildir",
            str(bounces),
        ]
    )
    deadline = time.monotonic() + 30
    while not cert.exists():
        if sink.poll() is not None or time.monotonic() > deadline:
            raise click.ClickException(f"the mail sink did not start on port {port}")
        time.sleep(0.1)
    return sink


def _wait(processes: list[subprocess.Popen[bytes]]) -> None:
    stop = False

    def _stop(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop and all(p.poll() is None for p in processes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        process.wait(timeout=20)
