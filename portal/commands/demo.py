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
from flask import Flask

from portal.audit import NO_REQUEST, SYSTEM
from portal.cli import main, make_app

DEMO_PORT = 5000
DEMO_SMTP_PORT = 8025


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
    DemoAccount("patient", "patient@demo.example", "Pat Demo", "Harbour-Quince-Velvet-73",
                date(1980, 1, 31)),
    DemoAccount("auditor", "auditor@demo.example", "Ada Auditor", "Meadow-Cobalt-Thistle-58"),
    DemoAccount("admin", "admin@demo.example", "Al Admin", "Granite-Willow-Saffron-26"),
)


def seed(app: Flask) -> None:
    """Create the demo accounts that do not exist yet (idempotent)."""
    from portal.extensions import db
    from portal.services import accounts

    with app.app_context():
        for account in ACCOUNTS:
            if accounts.find_by_email(db.session, account.email) is None:
                user = accounts.create_user(db.session, role=account.role, email=account.email,
                                            name=account.name, dob=account.dob,
                                            password=account.password, actor=SYSTEM,
                                            meta=NO_REQUEST).user
                _enrol(user)
        db.session.commit()


def _enrol(user: object) -> None:
    """Enrol a demo account's authenticator with a code from the step before, so every
    code the demo page shows from now on is still unused."""
    from portal.database import utcnow
    from portal.extensions import db
    from portal.security import otp
    from portal.services import signin

    secret, shown = signin.start_enrolment(db.session, user, None)  # type: ignore[arg-type]
    step = int(utcnow().timestamp() // otp.STEP_SECONDS) - 1
    signin.finish_enrolment(db.session, user, otp.code_at(secret, step),  # type: ignore[arg-type]
                            NO_REQUEST, shown)


def _banner(app: Flask, port: int, maildir: Path) -> str:
    base = f"http://127.0.0.1:{port}"
    lines = ["", "Pickup Portal demo is running (test data only).", "",
             f"  Portal:        {base}/signin",
             f"  Mail sink:     {base}/demo/mail  (emails land in {maildir})",
             f"  Demo codes:    {base}/demo/  (current authenticator codes of the demo logins)",
             f"  Health:        {base}/healthz", "",
             "  Demo logins (email / password):"]
    lines += [f"    {a.role:<8} {a.email:<24} {a.password}" for a in ACCOUNTS]
    lines += ["", f"  Instance folder: {app.config['INSTANCE_DIR']}", "  Stop with Ctrl-C.", ""]
    return "\n".join(lines)


@main.command("demo")
@click.option("--port", default=DEMO_PORT, show_default=True, type=int)
@click.option("--smtp-port", default=DEMO_SMTP_PORT, show_default=True, type=int)
def demo(port: int, smtp_port: int) -> None:
    """Migrate, seed demo accounts, start the mail sink, the notifier and the portal."""
    os.environ["PORTAL_DEMO"] = "1"
    os.environ.setdefault("PORTAL_BASE_URL", f"http://127.0.0.1:{port}")
    app = make_app()
    folder = Path(app.config["INSTANCE_DIR"])
    maildir, cert = Path(app.config["DEMO_MAILDIR"]), folder / "sink-cert.pem"
    processes = [_start_sink(smtp_port, maildir, cert)]
    os.environ.update(PORTAL_SMTP_HOST="127.0.0.1", PORTAL_SMTP_PORT=str(smtp_port),
                      PORTAL_SMTP_TLS="starttls", PORTAL_SMTP_CA_FILE=str(cert),
                      PORTAL_MAIL_FROM="notices@demo.example")
    app = make_app()
    from portal.extensions import db
    from portal.migrate import upgrade

    with app.app_context():
        upgrade(db.engine)
    seed(app)
    processes.append(subprocess.Popen([sys.executable, "-m", "notifier", "run"]))
    processes.append(subprocess.Popen([sys.executable, "-m", "portal", "serve", "--port",
                                       str(port)]))
    click.echo(_banner(app, port, maildir))
    _wait(processes)


def _start_sink(port: int, maildir: Path, cert: Path) -> subprocess.Popen[bytes]:
    """Start the TLS mail sink and wait until its certificate is written."""
    cert.unlink(missing_ok=True)
    sink = subprocess.Popen([sys.executable, "-m", "notifier", "sink", "--port", str(port),
                             "--maildir", str(maildir), "--cert", str(cert)])
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
