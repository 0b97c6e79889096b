"""Benchmark the notifier worker against a bare smtplib loop to the same TLS mail sink.

Run from the checkout: ``python bench/bench_notifier.py [--count 500]``.

One run starts a :class:`notifier.sink.MailSink` (STARTTLS, fresh certificate)
on a free port with a temporary Maildir, then measures:

- the ceiling: one ``smtplib.SMTP`` connection, STARTTLS verified against the
  sink's certificate (host name checked), sending ``count`` prebuilt emails of
  the same shape as a pickup notice (best of ``--repeat`` runs);
- ours: ``count`` messages sent to one patient through
  ``portal.services.messaging.send`` (each queues its pickup notice, as the
  portal does), committed, then ``notifier.worker.drain`` timed until all are
  sent: claim, load, unseal the link, render, PHI guard (which unseals the
  message's subject, body and the patient's name and date of birth), TLS send
  over the pass's one connection, mark sent and audit, one commit per notice.
  On SQLite always, and on PostgreSQL when ``PORTAL_BENCH_DATABASE_URL``
  (default ``postgresql://postgres@127.0.0.1:5432/test``) is reachable, in a
  schema of its own, ``bench_notifier_<random>``, dropped at the end.

The worker logs at the production default (INFO, JSON lines), written to a
temporary file instead of the terminal; the sink's own logging (the measuring
instrument, not the code under test) is quietened for both figures. Target:
ours at least 50% of the ceiling. Exits non-zero only on an error (a notice not
sent, a Maildir count that does not match), never on a missed target.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import smtplib
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from email.message import EmailMessage
from email.utils import format_datetime, formataddr
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from notifier import outbox, render, worker
from notifier.sink import MailSink
from notifier.smtp import make_message_id
from portal import create_app
from portal.audit import NO_REQUEST, SYSTEM, Action
from portal.database import make_engine, utcnow
from portal.extensions import db
from portal.migrate import upgrade
from portal.models import AuditEvent, Notification
from portal.services import accounts, messaging

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
RATIO_TARGET = 0.50
DOMAIN = "portal.example.org"
MAIL_FROM = f"no-reply@{DOMAIN}"
BASE_URL = f"https://{DOMAIN}"
ORG_NAME = "Riverside Family Practice"
ORG_ADDRESS = "4 Mill Lane, Riverside"
SUPPORT_CONTACT = "reception"
PATIENT_EMAIL = "p.quenby@patients.example.org"
SUBJECT = "Histopathology biopsy outcome"
BODY = (
    "Your thyroid biopsy showed a benign nodule. No further treatment is needed; "
    "Dr Marwick will review it with you at the Ashcombe clinic in six months."
)


@dataclass
class Run:
    """One measured run of the worker."""

    backend: str
    seconds: float
    sent: int
    connections: int
    batches: int
    log_warnings: list[str]

    @property
    def rate(self) -> float:
        return self.sent / self.seconds


def clear_portal_settings() -> None:
    """Drop the developer's own PORTAL_* settings (not PORTAL_BENCH_*): they would skew it."""
    for name in [n for n in os.environ if n.startswith("PORTAL_")]:
        if not name.startswith("PORTAL_BENCH_"):
            del os.environ[name]


def bench_url(schema: str | None = None) -> str:
    """Return the PostgreSQL benchmark URL with the psycopg driver, optionally in ``schema``."""
    url = make_url(os.environ.get("PORTAL_BENCH_DATABASE_URL", DEFAULT_URL))
    url = url.set(drivername="postgresql+psycopg")
    if schema:
        url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def postgres_problem() -> str | None:
    """None when the benchmark database answers, else why not (one line)."""
    libpq = bench_url().replace("postgresql+psycopg://", "postgresql://", 1)
    try:
        psycopg.connect(libpq, connect_timeout=3).close()
    except psycopg.Error as err:
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


def maildir_count(maildir: Path) -> int:
    return sum(1 for _ in (maildir / "new").iterdir()) + sum(1 for _ in (maildir / "cur").iterdir())


def mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# -- the ceiling --------------------------------------------------------------------------


def prebuilt_notices(count: int, to_address: str) -> list[EmailMessage]:
    """``count`` emails shaped like a pickup notice (same template, text + HTML), built now."""
    context = render.pickup_context(
        url=f"{BASE_URL}/p/{secrets.token_urlsafe(32)}",
        org_name=ORG_NAME,
        org_address=ORG_ADDRESS,
        support_contact=SUPPORT_CONTACT,
        expires_at=utcnow(),
    )
    subject, body_text, body_html = render.render_parts("pickup", context)
    emails = []
    for i in range(count):
        msg = EmailMessage()
        msg["Subject"] = subject
        msg["From"] = formataddr((ORG_NAME, MAIL_FROM))
        msg["To"] = to_address
        msg["Date"] = format_datetime(utcnow())
        msg["Message-ID"] = make_message_id(f"ceiling-{i}", DOMAIN)
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(body_text)
        msg.add_alternative(body_html, subtype="html")
        emails.append(msg)
    return emails


def ceiling(sink: MailSink, cert_file: Path, emails: list[EmailMessage]) -> float:
    """Seconds to send ``emails`` with bare smtplib over one verified STARTTLS connection."""
    context = ssl.create_default_context(cafile=str(cert_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    start = time.perf_counter()
    smtp = smtplib.SMTP(sink.host, sink.port, local_hostname=DOMAIN, timeout=30)
    try:
        smtp.ehlo()
        smtp.starttls(context=context)
        smtp.ehlo()
        for msg in emails:
            smtp.send_message(msg)
        smtp.quit()
    finally:
        smtp.close()
    return time.perf_counter() - start


# -- ours ---------------------------------------------------------------------------------


def make_portal(url: str, sink: MailSink, cert_file: Path) -> Any:
    """Migrate the database at ``url`` and return a portal app on it, talking to ``sink``."""
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return create_app(
        {
            "DATABASE_URL": url,
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": sink.port,
            "SMTP_CA_FILE": str(cert_file),
            "SMTP_TLS": "starttls",
            "MAIL_FROM": MAIL_FROM,
            "BASE_URL": BASE_URL,
            "ORG_NAME": ORG_NAME,
            "ORG_ADDRESS": ORG_ADDRESS,
            "SUPPORT_CONTACT": SUPPORT_CONTACT,
            "LOG_LEVEL": "INFO",
        }
    )


def seed(app: Any, count: int) -> None:
    """A staff sender, a patient, and ``count`` sent messages (each with a queued notice)."""
    with app.app_context():
        session = db.session
        staff = accounts.create_user(
            session,
            role="staff",
            email="g.marwick@staff.example.org",
            name="Gregory Marwick",
            actor=SYSTEM,
            meta=NO_REQUEST,
        ).user
        patient = accounts.create_user(
            session,
            role="patient",
            email=PATIENT_EMAIL,
            name="Philippa Quenby",
            dob=date(1984, 3, 7),
            actor=SYSTEM,
            meta=NO_REQUEST,
        ).user
        session.commit()
        for _ in range(count):
            messaging.send(
                session,
                sender=staff,
                recipient=patient,
                subject=SUBJECT,
                body=BODY,
                meta=NO_REQUEST,
            )
        session.commit()
        queued = session.scalar(
            select(func.count()).select_from(Notification).where(Notification.status == "queued")
        )
        if queued != count:
            raise SystemExit(f"ERROR: {queued} notices queued, expected {count}")


class _CountingClaims:
    """Wrap outbox.claim to count the non-empty batches a drain claims."""

    def __init__(self) -> None:
        self.batches = 0
        self._claim = outbox.claim

    def __call__(self, *args: Any, **kwargs: Any) -> list[int]:
        ids = self._claim(*args, **kwargs)
        self.batches += bool(ids)
        return ids

    def __enter__(self) -> _CountingClaims:
        outbox.claim = self  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        outbox.claim = self._claim  # type: ignore[method-assign]


def ours(
    backend: str, url: str, sink: MailSink, cert_file: Path, count: int, batch: int, log_file: Path
) -> Run:
    """Seed ``count`` notices on ``url`` and time one drain pass of the worker."""
    app = make_portal(url, sink, cert_file)
    try:
        seed(app, count)
        stored_before, connections_before = maildir_count(sink.maildir), sink.connection_count
        with (
            log_file.open("w") as log,
            contextlib.redirect_stderr(log),
            _CountingClaims() as claims,
        ):
            start = time.perf_counter()
            stats = worker.drain(app, "bench", batch=batch)
            seconds = time.perf_counter() - start
        connections = sink.connection_count - connections_before
        stored = maildir_count(sink.maildir) - stored_before
        check(app, backend, stats, stored, count)
    finally:
        app.extensions["engine"].dispose()
    warnings = [
        line
        for line in log_file.read_text().splitlines()
        if '"level": "INFO"' not in line and '"level": "DEBUG"' not in line
    ]
    return Run(backend, seconds, stats.sent, connections, claims.batches, warnings)


def check(app: Any, backend: str, stats: worker.RunStats, stored: int, count: int) -> None:
    """Raise SystemExit unless every notice was sent, stored once and audited once."""
    with app.app_context():
        session = db.session
        sent = session.scalar(
            select(func.count()).select_from(Notification).where(Notification.status == "sent")
        )
        audited = session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.action == Action.NOTICE_SENT.value)
        )
    problems = []
    if stats.sent != count or stats.processed != count:
        problems.append(f"drain sent {stats.sent} of {count} ({stats})")
    if sent != count:
        problems.append(f"{sent} rows marked sent, expected {count}")
    if audited != count:
        problems.append(f"{audited} notice.sent audit events, expected {count}")
    if stored != stats.sent:
        problems.append(f"Maildir gained {stored} messages, worker sent {stats.sent}")
    if problems:
        raise SystemExit(f"ERROR ({backend}): " + "; ".join(problems))


def on_postgres(sink: MailSink, cert_file: Path, count: int, batch: int, log_file: Path) -> Run:
    """``ours`` in a throwaway schema of the benchmark database, dropped afterwards."""
    schema = f"bench_notifier_{secrets.token_hex(6)}"
    admin = create_engine(bench_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        return ours("postgresql", bench_url(schema), sink, cert_file, count, batch, log_file)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


# -- main ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="notices per measured run")
    parser.add_argument("--repeat", type=int, default=3, help="ceiling runs (best kept)")
    parser.add_argument(
        "--batch", type=int, default=outbox.DEFAULT_BATCH, help="rows the worker claims at a time"
    )
    args = parser.parse_args()
    count = args.count
    clear_portal_settings()
    # The sink is the instrument: its per-message INFO lines are not the code under test.
    for name in ("notifier.sink", "mail.log"):
        logging.getLogger(name).setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench-notifier-") as tmp:
        root = Path(tmp)
        (root / "instance").mkdir(mode=0o700)
        os.environ["PORTAL_INSTANCE_DIR"] = str(root / "instance")
        cert_file = root / "sink-cert.pem"
        with MailSink(root / "Maildir", cert_file=cert_file) as sink:
            # 1. The ceiling: bare smtplib, one connection, prebuilt emails.
            ceiling_times = []
            for _ in range(max(1, args.repeat)):
                emails = prebuilt_notices(count, PATIENT_EMAIL)
                stored_before = maildir_count(sink.maildir)
                connections_before = sink.connection_count
                ceiling_times.append(ceiling(sink, cert_file, emails))
                stored = maildir_count(sink.maildir) - stored_before
                if stored != count:
                    raise SystemExit(f"ERROR (ceiling): Maildir gained {stored}, sent {count}")
                if sink.connection_count - connections_before != 1:
                    raise SystemExit("ERROR (ceiling): expected exactly one connection")
            ceiling_rate = count / min(ceiling_times)
            payload = len(emails[0].as_bytes())

            # 2. Ours, on SQLite, then PostgreSQL when reachable.
            runs = [
                ours(
                    "sqlite",
                    f"sqlite:///{root / 'instance' / 'bench.db'}",
                    sink,
                    cert_file,
                    count,
                    args.batch,
                    root / "worker-sqlite.log",
                )
            ]
            pg_problem = postgres_problem()
            if pg_problem is None:
                runs.append(
                    on_postgres(sink, cert_file, count, args.batch, root / "worker-postgresql.log")
                )
            total_stored = maildir_count(sink.maildir)
        expected_total = count * max(1, args.repeat) + sum(run.sent for run in runs)
        if total_stored != expected_total:
            raise SystemExit(f"ERROR: Maildir holds {total_stored}, expected {expected_total}")

    report(count, max(1, args.repeat), payload, ceiling_rate, runs, pg_problem, total_stored)
    return 0


def report(
    count: int,
    repeat: int,
    payload: int,
    ceiling_rate: float,
    runs: list[Run],
    pg_problem: str | None,
    total_stored: int,
) -> None:
    print(f"notices per run: {count}; ceiling email {payload} bytes (pickup template, text+HTML)")
    print(
        f"ceiling: bare smtplib, 1 STARTTLS connection, prebuilt (best of {repeat}): "
        f"{ceiling_rate:8.1f} notices/s"
    )
    for run in runs:
        ratio = run.rate / ceiling_rate
        print(
            f"ours, {run.backend:<10} worker.drain (claim..audit, commit/notice): "
            f"{run.rate:8.1f} notices/s  {1000 / run.rate:6.2f} ms/notice"
        )
        print(
            f"  ours/ceiling {ratio:7.1%}  target >= {RATIO_TARGET:.0%}  "
            f"{mark(ratio >= RATIO_TARGET)}"
        )
        print(
            f"  sink TCP connections during the run: {run.connections} "
            f"({run.batches} claimed batches, one drain pass; expect 1)"
        )
        for line in run.log_warnings[:5]:
            print(f"  worker log: {line}")
    if pg_problem is not None:
        print(f"ours, postgresql: skipped (benchmark database unreachable: {pg_problem})")
    print(
        f"Maildir holds {total_stored} messages = {repeat} x {count} ceiling + "
        f"{' + '.join(str(run.sent) for run in runs)} ours: OK"
    )


if __name__ == "__main__":
    sys.exit(main())
