"""Benchmark the audit trail at a million events on PostgreSQL: search, verify, export.

Run from the checkout: ``python bench/bench_audit.py [--events 1000000]``. Uses
``PORTAL_BENCH_DATABASE_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``)
in a schema of its own, ``bench_audit_<random>``, dropped at the end.

It creates ~2,000 patients and ~200 staff through the accounts service, then
appends the events in bulk (COPY) with precomputed chained hashes, so the trail
verifies. Each figure is printed beside its target and beside a baseline taken
in the same run: an auditor's first page (events, names, count) beside the page
SQL alone; raw ``count(*)`` and a raw psycopg fetch of every row for verify and
export. Exits non-zero only on an error (a trail that does not verify), never on
a missed target.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
import psycopg
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
MIB = 1024 * 1024
PAGE = 50  # events per page, as the auditor's page shows
PAGE_TARGET_MS = 50  # p99 of a first page
PAGE_RATIO_TARGET = 2.0  # first page p50 over the page SQL alone
VERIFY_TARGET = 100_000  # events/s
RSS_TARGET_MIB = 20  # "flat": growth of the export alone
COLUMNS = (
    "seq",
    "occurred_at",
    "actor_id",
    "actor_role",
    "action",
    "target_type",
    "target_id",
    "patient_id",
    "message_id",
    "outcome",
    "client_ip",
    "user_agent",
    "request_id",
    "details",
    "prev_hash",
    "hash",
)
ACTIONS = (  # (action, outcome, weight): mostly reads of messages, as a portal sees
    ("message.view", "success", 55),
    ("attachment.download", "success", 10),
    ("message.send", "success", 10),
    ("auth.signin", "success", 12),
    ("auth.signin.failed", "failure", 8),
    ("access.denied", "denied", 5),
)
AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Safari/605.1.15",
    "EHR-connector/2.3",
)


def bench_url(schema: str | None = None) -> str:
    """Return the benchmark URL with the psycopg driver, optionally pinned to ``schema``."""
    url = make_url(os.environ.get("PORTAL_BENCH_DATABASE_URL", DEFAULT_URL))
    url = url.set(drivername="postgresql+psycopg")
    if schema:
        url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def libpq_url(schema: str) -> str:
    """Return the same database as a plain libpq URL (for raw psycopg)."""
    return bench_url(schema).replace("postgresql+psycopg://", "postgresql://", 1)


def timed(action: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# --- data -------------------------------------------------------------------------------------


def create_people(patients: int, actors: int) -> tuple[list[int], list[tuple[int, str]]]:
    """Create users through the service (real sealed names); return patient ids and actors."""
    from portal.audit import NO_REQUEST, SYSTEM
    from portal.extensions import db
    from portal.services import accounts

    staff = [
        accounts.create_user(
            db.session,
            role="staff",
            email=f"staff{i}@bench.example",
            name=f"Staff Member {i}",
            actor=SYSTEM,
            meta=NO_REQUEST,
        ).user
        for i in range(actors)
    ]
    people = [
        accounts.create_user(
            db.session,
            role="patient",
            email=f"p{i}@bench.example",
            name=f"Patient Number {i}",
            dob=date(1970, 1, 1) + timedelta(days=i),
            actor=SYSTEM,
            meta=NO_REQUEST,
        ).user
        for i in range(patients)
    ]
    db.session.commit()
    return [p.id for p in people], [(s.id, s.role) for s in staff]


def generate(
    n: int,
    start_seq: int,
    prev: str,
    patients: list[int],
    actors: list[tuple[int, str]],
    year_start: datetime,
) -> Iterator[tuple[Any, ...]]:
    """Yield ``n`` chained event rows (COLUMNS order) spread evenly over one year."""
    from portal.audit import _hash_fields

    rng = random.Random(20260101)
    step = timedelta(days=365) / n
    choices = [(a, o) for a, o, w in ACTIONS for _ in range(w)]
    for i in range(n):
        action, outcome = rng.choice(choices)
        actor_id, role = (None, "system") if outcome == "failure" else rng.choice(actors)
        message = rng.randint(1, 200_000) if action != "auth.signin" else None
        fields = (
            start_seq + i,
            year_start + step * i,
            actor_id,
            role,
            action,
            "message" if message else None,
            f"{rng.getrandbits(128):032x}",
            rng.choice(patients),
            message,
            outcome,
            f"198.51.100.{rng.randint(1, 254)}",
            rng.choice(AGENTS),
            f"{rng.getrandbits(64):016x}",
            '{"bytes":1024}',
            prev,
        )
        prev = _hash_fields(*fields)
        yield (*fields, prev)


def bulk_load(schema: str, rows: Iterator[tuple[Any, ...]]) -> tuple[int, str]:
    """COPY ``rows`` into audit_events, move the head, ANALYZE; return (last seq, hash)."""
    last: tuple[Any, ...] = ()
    with psycopg.connect(libpq_url(schema)) as conn:
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY audit_events ({', '.join(COLUMNS)}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)
                last = row
        conn.execute("UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1", (last[0], last[-1]))
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE audit_events")
    return int(last[0]), str(last[-1])


# --- measurements ------------------------------------------------------------------------------


def percentiles(samples: list[float]) -> tuple[float, float]:
    """Return (p50, p99) in milliseconds."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p99 * 1000


def measure_queries(
    session: Session, patients: list[int], year_start: datetime, queries: int
) -> dict[str, dict[str, tuple[float, float]]]:
    """Time first pages beside the page SQL alone: one patient's year (a different patient
    each time, names cached as they come; again with the name cache emptied before each
    page; again committing between pages) and the whole trail unfiltered (repeated)."""
    from portal.services import audit_query
    from portal.services.audit_query import AuditFilter

    chosen = random.Random(7).sample(patients, queries + 1)
    year = [
        AuditFilter(patient_id=p, since=year_start, until=year_start + timedelta(days=365))
        for p in chosen
    ]
    audit_query.search(session, year.pop())  # warm-up: keyring, plans
    session.rollback()
    return {
        "year": time_pages(session, year),
        "year_cold": time_pages(session, year, cold=True),
        "year_committed": time_pages(session, year, commit=True),
        "trail": time_pages(session, [AuditFilter()] * queries),
    }


def time_pages(
    session: Session, flts: list[Any], *, cold: bool = False, commit: bool = False
) -> dict[str, tuple[float, float]]:
    """Return (p50, p99) ms of each filter's first page, its bounded count alone and its
    page SQL alone, run in a shuffled order (the first to read a patient's rows warms the
    cache for the others) in one transaction opened beforehand, so none pays the pool's
    pre-ping or the BEGIN. The transaction then rolls back, which also drops the driver's
    prepared statements; ``commit``: commits, as a request does, and they stay, so after a
    few pages the connection runs each statement prepared, planned once for any values."""
    from portal.services import audit_names

    samples: dict[str, list[float]] = {"page": [], "count": [], "page_sql": []}
    if commit:
        samples["page_sql_bound"] = []
    order = random.Random(11)
    for flt in flts:
        session.connection()
        if cold:
            audit_names.name_cache().clear()
        runs = [(k, run) for k, run in _runs(session, flt).items() if k in samples]
        order.shuffle(runs)
        for key, run in runs:
            samples[key].append(timed(run)[0])
        if commit:
            session.commit()
        else:
            session.rollback()
    return {key: percentiles(values) for key, values in samples.items()}


def _runs(session: Session, flt: Any) -> dict[str, Callable[[], Any]]:
    from portal.models import AuditEvent
    from portal.services import audit_query

    bare = audit_query.select_events(flt).order_by(AuditEvent.seq.desc()).limit(PAGE)
    return {
        "page": lambda: audit_query.search(session, flt, limit=PAGE),
        "count": lambda: audit_query.bounded_count(session, flt),
        "page_sql": lambda: session.execute(bare).all(),
        "page_sql_bound": lambda: session.execute(_page_sql_as_before(flt)).all(),
    }


def _page_sql_as_before(flt: Any) -> Any:
    """The year filter's page SQL as it was: the time range as parameters, which the one
    plan of a prepared statement cannot see."""
    from portal.models import AuditEvent
    from portal.services.audit_query import EVENT_COLUMNS

    return (
        select(*EVENT_COLUMNS)
        .where(
            AuditEvent.patient_id == flt.patient_id,
            AuditEvent.occurred_at >= flt.since,
            AuditEvent.occurred_at < flt.until,
        )
        .order_by(AuditEvent.seq.desc())
        .limit(PAGE)
    )


def statements_per_page(session: Session, flt: Any) -> int:
    """Return how many SQL statements one first page sends (a cursor-execute listener)."""
    from sqlalchemy import event

    from portal.services import audit_query

    session.connection()
    sent: list[str] = []

    def count(*args: Any) -> None:
        sent.append(args[2])

    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", count)
    try:
        audit_query.search(session, flt, limit=PAGE)
    finally:
        event.remove(engine, "before_cursor_execute", count)
        session.rollback()
    return len(sent)


def print_pages(
    label: str, figures: dict[str, tuple[float, float]], judged: bool, unfiltered: bool = False
) -> None:
    """Print one scenario: page, count and page SQL (ms p50 / p99), ratio and target."""
    from portal.services.audit_query import COUNT_LIMIT

    base50, base99 = figures["page_sql"]
    p50, p99 = figures["page"]
    ratio = p50 / base50
    verdict = mark(ratio <= PAGE_RATIO_TARGET and p99 < PAGE_TARGET_MS)
    target = (
        f"target <= {PAGE_RATIO_TARGET:g}x (p50), p99 < {PAGE_TARGET_MS} ms  {verdict}"
        if judged
        else ""
    )
    print(f"  {label}")
    print(
        f"    {'first page (rows, names, count)':<34} {p50:7.2f} / {p99:7.2f}  "
        f"{ratio:4.1f}x / {p99 / base99:4.1f}x page SQL  {target}"
    )
    print(f"    {'page SQL alone (baseline)':<34} {base50:7.2f} / {base99:7.2f}")
    c50, c99 = figures["count"]
    counted = "highest seq" if unfiltered else f"to {COUNT_LIMIT + 1:,}"
    print(f"    {f'count alone ({counted})':<34} {c50:7.2f} / {c99:7.2f}")
    if "page_sql_bound" in figures:
        b50, b99 = figures["page_sql_bound"]
        print(f"    {'page SQL, times as parameters':<34} {b50:7.2f} / {b99:7.2f}  (as before)")


def raw_baselines(schema: str) -> tuple[float, float, int]:
    """Return (seconds of count(*), rows/s of a raw server-side fetch of every row, rows)."""
    with psycopg.connect(libpq_url(schema)) as conn:
        count_s, _ = timed(lambda: conn.execute("SELECT count(*) FROM audit_events").fetchone())
        cur = conn.cursor(name="bench_raw")
        cur.itersize = 5000

        def fetch() -> int:
            cur.execute(f"SELECT {', '.join(COLUMNS)} FROM audit_events ORDER BY seq")
            return sum(1 for _ in cur)

        fetch_s, rows = timed(fetch)
    return count_s, rows / fetch_s, rows


class RssSampler:
    """Sample this process's RSS every few milliseconds in a thread; keep the peak."""

    def __init__(self, interval: float = 0.005) -> None:
        self.process = psutil.Process()
        self.interval = interval
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.start) / MIB


def measure_export(session: Session) -> tuple[float, float, int]:
    """Return (rows/s, peak RSS growth MiB, rows) of the CSV export to a discarding sink."""
    from portal.services import audit_export
    from portal.services.audit_query import AuditFilter

    gc.collect()
    rows = 0
    with RssSampler() as rss:
        start = time.perf_counter()
        for chunk in audit_export.export_csv(session, AuditFilter()):
            rows += chunk.count("\r\n")
        seconds = time.perf_counter() - start
    session.rollback()
    return (rows - 1) / seconds, rss.growth_mib, rows - 1


# --- a faster verify, proposed for portal.audit (measured here against the current one) ------

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def run(schema: str, args: argparse.Namespace) -> int:
    from portal import audit, create_app
    from portal.extensions import db
    from portal.services.audit_query import AuditFilter

    app = create_app({"DATABASE_URL": bench_url(schema)})
    year_start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=365)
    with app.app_context():
        made_s, (patients, actors) = timed(lambda: create_people(args.patients, args.actors))
        head_seq, head_hash = db.session.execute(text("SELECT seq, hash FROM audit_head")).one()
        db.session.rollback()
    print(f"users: {len(patients)} patients, {len(actors)} staff in {made_s:.1f} s")
    rows = generate(args.events, head_seq + 1, head_hash, patients, actors, year_start)
    load_s, (last_seq, _) = timed(lambda: bulk_load(schema, rows))
    print(
        f"events: {args.events:,} appended (chained, COPY) in {load_s:.1f} s; "
        f"trail holds {last_seq:,}"
    )

    count_s, raw_rate, raw_rows = raw_baselines(schema)
    print(
        f"\nbaseline: SELECT count(*) FROM audit_events: {count_s * 1000:8.1f} ms "
        f"({raw_rows:,} rows)"
    )
    print(
        f"baseline: raw psycopg fetch of every row:     {raw_rate:10,.0f} rows/s  "
        "(ceiling for verify and export)"
    )
    with app.app_context():
        session = db.session
        q = measure_queries(session, patients, year_start, args.queries)
        print(
            f"\naudit first page, {PAGE} rows, ms p50 / p99 (ratios: to the page SQL alone, "
            "same run):"
        )
        print_pages(f"one patient's year, {args.queries} patients:", q["year"], True)
        print_pages("the same, name cache emptied before each page:", q["year_cold"], False)
        print_pages(
            "the same, committing between pages as requests do (statements prepared):",
            q["year_committed"],
            False,
        )
        print_pages(f"whole trail, no filter, {args.queries} times:", q["trail"], True, True)
        print(f"  statements per first page: {statements_per_page(session, AuditFilter())}")

        export_rate, growth, exported = measure_export(session)
        print(
            f"\nCSV export: {export_rate:10,.0f} rows/s  ({exported:,} rows)  "
            f"{export_rate / raw_rate:.0%} of raw fetch"
        )
        print(
            f"CSV export peak RSS growth: {growth:6.1f} MiB  target < {RSS_TARGET_MIB} MiB "
            f"(flat)  {mark(growth < RSS_TARGET_MIB)}"
        )

        verify_s, result = timed(lambda: audit.verify(session))
        session.rollback()
        if not result.ok:
            print(f"ERROR: the generated trail does not verify: {result}", file=sys.stderr)
            return 1
        rate = result.count / verify_s
        print(
            f"\nverify (portal.audit.verify): {rate:10,.0f} events/s  ({verify_s:.1f} s)  "
            f"target >= {VERIFY_TARGET:,}  {mark(rate >= VERIFY_TARGET)}  "
            f"{rate / raw_rate:.0%} of raw fetch"
        )
        jobs = min(os.cpu_count() or 1, 4)
        par_s, result = timed(lambda: audit.verify_parallel(session, jobs))
        session.rollback()
        par_rate = result.count / par_s
        print(
            f"verify (portal audit verify, --jobs {jobs}): {par_rate:8,.0f} events/s  "
            f"({par_s:.1f} s)  target >= {VERIFY_TARGET:,}  "
            f"{mark(result.ok and par_rate >= VERIFY_TARGET)}"
        )

    app.extensions["engine"].dispose()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--actors", type=int, default=200)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    from portal.database import make_engine
    from portal.migrate import upgrade

    schema = f"bench_audit_{secrets.token_hex(4)}"
    admin = create_engine(bench_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
            os.environ["PORTAL_INSTANCE_DIR"] = tmp
            engine = make_engine(bench_url(schema))
            upgrade(engine)
            engine.dispose()
            return run(schema, args)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


if __name__ == "__main__":
    sys.exit(main())
