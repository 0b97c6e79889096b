"""Benchmark the notifier beside a bare smtplib loop to the same TLS mail sink, in the same run.

Run from the checkout: ``python bench/bench_notifier.py [--count 1000] [--workers 1,2,4]``.

The sink (:class:`notifier.sink.MailSink`: STARTTLS on a fresh certificate, a
Maildir) runs in this process. Everything that talks to it runs in a process of
its own, set up before the clock starts and released by one start signal, so
no figure pays for another's Python:

- the ceiling: one ``smtplib`` connection, STARTTLS verified against the sink's
  certificate (host name checked), sending ``count`` prebuilt emails shaped like
  a pickup notice; measured ``--repeat`` times just before each figure of ours
  and once just after, the best printed beside it;
- ours: ``count`` messages sent to one patient through
  ``portal.services.messaging.send`` (each queues its pickup notice, as the
  portal does), then N worker processes, each on the app ``notifier run``
  loads (``portal.cli.load_worker_app``: PORTAL_* settings from the
  environment, logging at INFO as JSON lines into a file), warmed as a running
  worker is (its pool connection open, one pass made with nothing due; the
  messages are seeded once every worker is ready), each draining as
  ``notifier run --once`` does (``worker.drain``) until none is due. The rate
  is ``count`` over the time from the start signal to the last worker's end.
  One worker on SQLite and on PostgreSQL, then 1, 2 and 4 (``--workers``) on
  PostgreSQL (``PORTAL_BENCH_DATABASE_URL``, default
  ``postgresql://postgres@127.0.0.1:5432/test``, a schema of its own per run,
  ``bench_notifier_<random>``, dropped at the end);
- after every run: each Message-ID in the Maildir is counted (a notice stored
  twice is an error), each must be a queued notice's, and every notice must be
  marked sent and audited once;
- start-up: ``notifier run --once`` with nothing due (a real process, best of
  ``--startup-runs``), beside ``python -c pass``, with the load average.

Each line's notes give the workers' CPU time per notice beside the ceiling
client's: unlike the rates, CPU time hardly moves with the machine's load, so it
compares runs made on a busy machine.

Targets (issue 12): one worker at least 50% of the ceiling; more workers not
below one worker's rate (a 5% margin for noise); start-up under 1.5 s on an
idle machine. Exits non-zero only on an error (a notice lost, stored twice or
not recorded), never on a missed target.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import smtplib
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import format_datetime, formataddr
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
RATIO_TARGET = 0.50  # one worker, of the ceiling
SCALING_MARGIN = 0.95  # N workers: at least this share of one worker's rate counts as "not below"
STARTUP_TARGET = 1.5  # seconds, notifier run --once with nothing due
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


# -- child processes: one worker, or the ceiling's smtplib loop --------------------------------
#
# A child reads its job (JSON) from argv, gets ready, prints "ready", waits for a line on
# stdin (the start signal), works, and prints one JSON line: its monotonic start and end
# (CLOCK_MONOTONIC is one clock for every process), the CPU time it used (which, unlike the
# wall clock, a busy machine hardly changes) and what it did.


def child_main(role: str, job: dict[str, Any]) -> None:
    """Run one child of the benchmark (``--child ROLE JOB``)."""
    work = _ceiling_child(job) if role == "ceiling" else _worker_child(job)
    print("ready", flush=True)
    sys.stdin.readline()
    start, cpu = time.monotonic(), time.process_time()
    result = work()
    end, cpu = time.monotonic(), time.process_time() - cpu
    print(json.dumps({"start": start, "end": end, "cpu": cpu, **result}), flush=True)


def _ceiling_child(job: dict[str, Any]) -> Any:
    emails = prebuilt_notices(job["count"], job["to"])
    size = len(emails[0].as_bytes()) if emails else 0
    context = ssl.create_default_context(cafile=job["cert_file"])
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True

    def work() -> dict[str, Any]:
        smtp = smtplib.SMTP(job["host"], job["port"], local_hostname=DOMAIN, timeout=30)
        try:
            smtp.ehlo()
            smtp.starttls(context=context)
            smtp.ehlo()
            for msg in emails:
                smtp.send_message(msg)
            smtp.quit()
        finally:
            smtp.close()
        return {"sent": len(emails), "bytes": size}

    return work


def _worker_child(job: dict[str, Any]) -> Any:
    # Only what `notifier run` imports: the figure is the worker's, start-up excluded.
    from sqlalchemy import text

    from notifier import worker
    from portal.cli import load_worker_app
    from portal.extensions import db

    app = load_worker_app()
    with app.app_context():  # a running worker has its pool connection already
        db.session.execute(text("SELECT 1"))
        db.session.rollback()
    # ... and has made a pass already: one with nothing due (the run's notices are seeded
    # after every worker is ready), so its ORM mappers are configured and the statements of
    # a pass compiled, as in a worker that has been running (start-up is measured apart).
    warm = worker.drain(app, job["worker_id"])
    if warm.processed:
        raise SystemExit("ERROR: notices were due before the run was seeded")

    def work() -> dict[str, Any]:
        profile = os.environ.get("PORTAL_BENCH_PROFILE")  # a cProfile file per worker
        if profile:
            import cProfile

            profiler = cProfile.Profile()
            stats = profiler.runcall(worker.drain, app, job["worker_id"])
            profiler.dump_stats(f"{profile}.{job['worker_id']}")
        else:
            stats = worker.drain(app, job["worker_id"])
        names = ("sent", "failed", "retrying", "skipped")
        return {name: int(getattr(stats, name, 0)) for name in names}

    return work


def prebuilt_notices(count: int, to_address: str) -> list[EmailMessage]:
    """``count`` emails shaped like a pickup notice (same template, text + HTML), built now."""
    from notifier import render
    from notifier.smtp import make_message_id
    from portal.database import utcnow

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
        msg["Message-ID"] = make_message_id(f"ceiling-{secrets.token_hex(8)}-{i}", DOMAIN)
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(body_text)
        msg.add_alternative(body_html, subtype="html")
        emails.append(msg)
    return emails


@dataclass
class Child:
    """A started child process, its job and the file its stderr (the worker's log) goes to."""

    process: subprocess.Popen[str]
    log: Path

    def wait_ready(self) -> None:
        line = self.process.stdout.readline() if self.process.stdout else ""
        if line.strip() != "ready":
            self.process.kill()
            raise SystemExit(f"ERROR: a child did not start:\n{tail(self.log)}")

    def result(self) -> dict[str, Any]:
        out, _ = self.process.communicate(timeout=3600)
        if self.process.returncode != 0 or not out.strip():
            raise SystemExit(f"ERROR: a child failed:\n{tail(self.log)}")
        parsed: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return parsed


def tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def start_child(role: str, job: dict[str, Any], env: dict[str, str], log: Path) -> Child:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", role, json.dumps(job)]
    with log.open("w") as err:
        process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env, text=True
        )
    return Child(process, log)


def run_together(
    children: list[Child], when_ready: Callable[[], None] | None = None
) -> tuple[float, list[dict[str, Any]]]:
    """Release ``children`` at once (after ``when_ready``, once all are ready); return
    seconds from the first start to the last end."""
    for child in children:
        child.wait_ready()
    if when_ready is not None:
        when_ready()
    for child in children:
        assert child.process.stdin is not None
        child.process.stdin.write("go\n")
        child.process.stdin.flush()
    results = [child.result() for child in children]
    return max(r["end"] for r in results) - min(r["start"] for r in results), results


# -- the harness: settings, databases, seeding, checks ------------------------------------------


def clear_portal_settings() -> None:
    """Drop the developer's own PORTAL_* settings (not PORTAL_BENCH_*): they would skew it."""
    for name in [n for n in os.environ if n.startswith("PORTAL_")]:
        if not name.startswith("PORTAL_BENCH_"):
            del os.environ[name]


def bench_url(schema: str | None = None) -> str:
    """Return the PostgreSQL benchmark URL with the psycopg driver, optionally in ``schema``."""
    from sqlalchemy.engine import make_url

    url = make_url(os.environ.get("PORTAL_BENCH_DATABASE_URL", DEFAULT_URL))
    url = url.set(drivername="postgresql+psycopg")
    if schema:
        url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def postgres_problem() -> str | None:
    """None when the benchmark database answers, else why not (one line)."""
    import psycopg

    libpq = bench_url().replace("postgresql+psycopg://", "postgresql://", 1)
    try:
        psycopg.connect(libpq, connect_timeout=3).close()
    except psycopg.Error as err:
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A throwaway schema of the benchmark database; yields its URL, drops it afterwards."""
    from sqlalchemy import create_engine, text

    schema = f"bench_notifier_{secrets.token_hex(6)}"
    admin = create_engine(bench_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield bench_url(schema)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@dataclass
class Bench:
    """One run's shared parts: the sink, its certificate, the instance folder, the options."""

    root: Path
    sink: Any  # notifier.sink.MailSink
    cert_file: Path
    count: int
    repeat: int
    seen: set[str] = field(default_factory=set)  # Maildir files already counted

    def settings(self, url: str) -> dict[str, str]:
        """The PORTAL_* environment every worker (and the start-up run) gets."""
        return {
            **os.environ,
            "PORTAL_INSTANCE_DIR": str(self.root / "instance"),
            "PORTAL_DATABASE_URL": url,
            "PORTAL_SMTP_HOST": "127.0.0.1",
            "PORTAL_SMTP_PORT": str(self.sink.port),
            "PORTAL_SMTP_CA_FILE": str(self.cert_file),
            "PORTAL_SMTP_TLS": "starttls",
            "PORTAL_MAIL_FROM": MAIL_FROM,
            "PORTAL_BASE_URL": BASE_URL,
            "PORTAL_ORG_NAME": ORG_NAME,
            "PORTAL_ORG_ADDRESS": ORG_ADDRESS,
            "PORTAL_SUPPORT_CONTACT": SUPPORT_CONTACT,
            "PORTAL_LOG_LEVEL": "INFO",
        }

    def new_message_ids(self) -> list[str]:
        """The Message-IDs of the messages stored since the last call (one per file)."""
        ids = []
        parser = BytesHeaderParser()
        for folder in ("new", "cur"):
            for path in sorted((self.sink.maildir / folder).iterdir()):
                if path.name in self.seen:
                    continue
                self.seen.add(path.name)
                with path.open("rb") as handle:
                    ids.append(str(parser.parse(handle).get("Message-ID", "")).strip())
        return ids


@contextmanager
def portal_on(url: str) -> Iterator[Any]:
    """Migrate the database at ``url``; yield a portal app on it (the seeding harness)."""
    from portal import create_app
    from portal.database import make_engine
    from portal.migrate import upgrade

    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    app = create_app({"DATABASE_URL": url, "BASE_URL": BASE_URL, "LOG_LEVEL": "WARNING"})
    try:
        yield app
    finally:
        app.extensions["engine"].dispose()


STAFF = {"role": "staff", "email": "g.marwick@staff.example.org", "name": "Gregory Marwick"}
PATIENT = {"role": "patient", "email": PATIENT_EMAIL, "name": "Philippa Quenby"}


def seed(app: Any, count: int) -> None:
    """``count`` messages sent from one staff member to one patient (created on first use),
    each with its queued pickup notice."""
    from datetime import date

    from portal.audit import NO_REQUEST, SYSTEM
    from portal.extensions import db
    from portal.services import accounts, messaging, teams

    with app.app_context():
        session = db.session
        people = []
        for person in (STAFF, PATIENT):
            user = accounts.find_by_email(session, person["email"])
            if user is None:
                extra = {"dob": date(1984, 3, 7)} if person is PATIENT else {}
                user = accounts.create_user(
                    session, actor=SYSTEM, meta=NO_REQUEST, **person, **extra
                ).user
            people.append(user)
        if not teams.teams_of(session, people[0]):  # staff send from a care team
            team = teams.create_team(session, name="Bench team", actor=SYSTEM, meta=NO_REQUEST)
            teams.add_member(session, team, STAFF["email"], actor=SYSTEM, meta=NO_REQUEST)
        session.commit()
        for _ in range(count):
            messaging.send(
                session,
                sender=people[0],
                recipient=people[1],
                subject=SUBJECT,
                body=BODY,
                meta=NO_REQUEST,
            )
        session.commit()


def watermarks(app: Any) -> tuple[int, int]:
    """(Highest notice id, highest audit seq) so far: a run's rows are those above them."""
    from sqlalchemy import func, select

    from portal.extensions import db
    from portal.models import AuditEvent, Notification

    with app.app_context():
        notice = db.session.scalar(select(func.max(Notification.id)))
        event = db.session.scalar(select(func.max(AuditEvent.seq)))
    return int(notice or 0), int(event or 0)


def expected_ids(app: Any, marks: tuple[int, int]) -> tuple[set[str], int, int]:
    """This run's (Message-IDs of the queued notices, rows marked sent, notice.sent events)."""
    from sqlalchemy import func, select

    from notifier.smtp import make_message_id
    from portal.audit import Action
    from portal.extensions import db
    from portal.models import AuditEvent, Notification

    mine = Notification.id > marks[0]
    with app.app_context():
        session = db.session
        pids = session.scalars(select(Notification.public_id).where(mine))
        ids = {make_message_id(pid, DOMAIN) for pid in pids}
        sent = session.scalar(
            select(func.count())
            .select_from(Notification)
            .where(mine, Notification.status == "sent")
        )
        audited = session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.seq > marks[1], AuditEvent.action == Action.NOTICE_SENT.value)
        )
    return ids, int(sent or 0), int(audited or 0)


# -- measurements ---------------------------------------------------------------------------


@dataclass
class Line:
    """One row of the table."""

    path: str
    ours: str
    ceiling: str
    ratio: str
    target: str
    met: bool
    notes: list[str] = field(default_factory=list)


def ceiling_rate(bench: Bench, runs: int) -> tuple[float, float]:
    """Notices/s of the bare smtplib loop and its CPU ms per notice, best of ``runs``, each
    in a fresh process."""
    job = {
        "count": bench.count,
        "to": PATIENT_EMAIL,
        "host": bench.sink.host,
        "port": bench.sink.port,
        "cert_file": str(bench.cert_file),
    }
    best, cpu = 0.0, float("inf")
    for i in range(runs):
        log = bench.root / f"ceiling-{secrets.token_hex(3)}-{i}.log"
        seconds, results = run_together([start_child("ceiling", job, dict(os.environ), log)])
        stored = bench.new_message_ids()
        if len(stored) != bench.count:
            raise SystemExit(f"ERROR (ceiling): Maildir gained {len(stored)}, sent {bench.count}")
        best = max(best, bench.count / seconds)
        cpu = min(cpu, 1000 * results[0]["cpu"] / bench.count)
    return best, cpu


def beside_ceiling(bench: Bench, app: Any, workers: int, label: str) -> tuple[Drain, float]:
    """:func:`drain_with`, between ceiling runs (``repeat`` before, one after), and the best
    of those: a busy machine only ever slows a run down."""
    before = ceiling_rate(bench, bench.repeat)
    drain = drain_with(bench, app, workers, label)
    after = ceiling_rate(bench, 1)
    drain.ceiling_cpu_ms = min(before[1], after[1])
    return drain, max(before[0], after[0])


@dataclass
class Drain:
    """What N workers did to one database's queue."""

    rate: float
    cpu_ms: float  # the workers' CPU time per notice
    connections: int
    warnings: list[str]
    ceiling_cpu_ms: float = 0.0  # the ceiling's client, per notice


def drain_with(bench: Bench, app: Any, workers: int, label: str) -> Drain:
    """Seed ``count`` notices through ``app``; time ``workers`` processes draining them; check.

    Earlier runs on the same database are done: only this run's rows are due or checked.
    """
    marks = watermarks(app)
    logs = [bench.root / f"{label}-worker-{i}.log" for i in range(workers)]
    env = bench.settings(app.config["DATABASE_URL"])
    children = [
        start_child("worker", {"worker_id": f"bench-{label}-{i}"}, env, log)
        for i, log in enumerate(logs)
    ]
    connections = bench.sink.connection_count
    seconds, results = run_together(children, lambda: seed(app, bench.count))
    connections = bench.sink.connection_count - connections
    check(app, bench, label, results, marks)
    warnings = [
        line
        for log in logs
        for line in log.read_text().splitlines()
        if '"level": "INFO"' not in line and '"level": "DEBUG"' not in line
    ]
    cpu = 1000 * sum(r["cpu"] for r in results) / bench.count
    return Drain(bench.count / seconds, cpu, connections, warnings)


def check(
    app: Any, bench: Bench, label: str, results: list[dict[str, Any]], marks: tuple[int, int]
) -> None:
    """Raise SystemExit unless every notice was stored exactly once, marked sent, audited."""
    stored = bench.new_message_ids()
    expected, sent, audited = expected_ids(app, marks)
    problems = []
    twice = len(stored) - len(set(stored))
    if twice:
        problems.append(f"{twice} notices stored twice (same Message-ID)")
    if set(stored) != expected:
        problems.append(
            f"Maildir Message-IDs differ from the queue's: {len(set(stored) - expected)} "
            f"unknown, {len(expected - set(stored))} missing"
        )
    if sum(r["sent"] for r in results) != bench.count:
        problems.append(f"workers report {sum(r['sent'] for r in results)} sent")
    if sent != bench.count or audited != bench.count:
        problems.append(f"{sent} rows marked sent, {audited} notice.sent events")
    if problems:
        raise SystemExit(f"ERROR ({label}): " + "; ".join(problems))


def startup_seconds(bench: Bench, url: str, runs: int) -> tuple[float, float]:
    """Best wall time of ``notifier run --once`` (nothing due) and of ``python -c pass``."""
    env = bench.settings(url)
    notifier_argv = [sys.executable, "-m", "notifier", "run", "--once"]
    best_notifier = best_python = float("inf")
    for _ in range(runs):
        best_python = min(best_python, timed([sys.executable, "-c", "pass"], env))
        best_notifier = min(best_notifier, timed(notifier_argv, env))
    return best_notifier, best_python


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"ERROR: {' '.join(argv[1:])} exited {done.returncode}: {done.stderr}")
    return seconds


def verdict(met: bool) -> str:
    return "met" if met else "missed"


def one_worker_line(path: str, drain: Drain, ceiling: float) -> Line:
    ratio = drain.rate / ceiling
    return Line(
        path,
        f"{drain.rate:.1f}/s",
        f"{ceiling:.1f}/s",
        f"{ratio:.1%}",
        f">= {RATIO_TARGET:.0%} of ceiling",
        ratio >= RATIO_TARGET,
        notes(drain),
    )


def notes(drain: Drain) -> list[str]:
    found = [
        f"{drain.connections} SMTP connection(s) to the sink; no Message-ID twice",
        f"CPU per notice: worker(s) {drain.cpu_ms:.2f} ms, the ceiling's smtplib client "
        f"{drain.ceiling_cpu_ms:.2f} ms",
    ]
    return found + [f"worker log: {line}" for line in drain.warnings[:3]]


def scaling_lines(bench: Bench, app: Any, workers: list[int], single: Drain) -> list[Line]:
    """Lines for 2, 4... workers on PostgreSQL, each beside its own ceiling, each compared
    with ``single`` (one worker's run)."""
    lines = []
    for n in workers:
        drain, ceiling = beside_ceiling(bench, app, n, f"postgresql-{n}")
        scale = drain.rate / single.rate
        lines.append(
            Line(
                f"{n} worker{'s' if n > 1 else ''}, PostgreSQL",
                f"{drain.rate:.1f}/s",
                f"{ceiling:.1f}/s",
                f"{drain.rate / ceiling:.1%} ({scale:.2f}x 1 worker)",
                "not below 1 worker",
                scale >= SCALING_MARGIN,
                notes(drain),
            )
        )
    return lines


def measure(bench: Bench, workers: list[int], startup_runs: int) -> list[Line]:
    sqlite_url = f"sqlite:///{bench.root / 'instance' / 'bench.db'}"
    with portal_on(sqlite_url) as app:
        lines = [one_worker_line("1 worker, SQLite", *beside_ceiling(bench, app, 1, "sqlite"))]
    problem = postgres_problem()
    if problem is None:
        with postgres_schema() as url, portal_on(url) as app:
            single, ceiling = beside_ceiling(bench, app, 1, "postgresql-1")
            lines.append(one_worker_line("1 worker, PostgreSQL", single, ceiling))
            lines += scaling_lines(bench, app, [n for n in workers if n != 1], single)
    else:
        lines.append(Line("PostgreSQL", "skipped", "", "", "", True, [f"unreachable: {problem}"]))
    notifier_s, python_s = startup_seconds(bench, sqlite_url, startup_runs)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines.append(
        Line(
            "start-up: notifier run --once, nothing due (SQLite)",
            f"{notifier_s:.2f} s",
            f"python -c pass {python_s:.2f} s",
            f"{notifier_s / python_s:.0f}x",
            f"< {STARTUP_TARGET} s (idle machine)",
            notifier_s < STARTUP_TARGET,
            [f"load average now {load} on {os.cpu_count()} CPUs"],
        )
    )
    return lines


def report(bench: Bench, lines: list[Line], payload: int) -> None:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"notices per run: {bench.count}; ceiling email {payload} bytes (pickup template, "
        f"text + HTML); ceiling = bare smtplib, 1 STARTTLS connection, prebuilt, best of "
        f"{bench.repeat} runs just before and 1 just after each line; load average {load}"
    )
    print("| path | ours | ceiling (same run) | ratio | target | |")
    print("|---|---|---|---|---|---|")
    for line in lines:
        result = verdict(line.met) if line.target else ""
        print(
            f"| {line.path} | {line.ours} | {line.ceiling} | {line.ratio} | {line.target} "
            f"| {result} |"
        )
    for line in lines:
        for note in line.notes:
            print(f"  {line.path}: {note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="notices per measured run")
    parser.add_argument("--repeat", type=int, default=3, help="ceiling runs per line (best kept)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts on PostgreSQL")
    parser.add_argument("--startup-runs", type=int, default=5, help="start-up runs (best kept)")
    parser.add_argument("--child", nargs=2, metavar=("ROLE", "JOB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child[0], json.loads(args.child[1]))
        return 0
    workers = sorted({int(n) for n in args.workers.split(",")})
    clear_portal_settings()
    import logging

    from notifier.sink import MailSink

    # The sink is the instrument: its per-message INFO lines are not the code under test.
    for name in ("notifier.sink", "mail.log"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-notifier-") as tmp:
        root = Path(tmp)
        (root / "instance").mkdir(mode=0o700)
        os.environ["PORTAL_INSTANCE_DIR"] = str(root / "instance")
        cert_file = root / "sink-cert.pem"
        with MailSink(root / "Maildir", cert_file=cert_file) as sink:
            bench = Bench(root, sink, cert_file, args.count, max(1, args.repeat))
            lines = measure(bench, workers, max(1, args.startup_runs))
        payload = len(prebuilt_notices(1, PATIENT_EMAIL)[0].as_bytes())
    report(bench, lines, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
