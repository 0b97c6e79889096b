"""Benchmark the inbox: ``GET /inbox`` with 8 concurrent signed-in patients, 10 and 200
messages each, on SQLite and PostgreSQL, beside a bare Flask JSON endpoint under the same
gunicorn.

Run from the checkout: ``python bench/bench_inbox.py [--requests 100] [--clients 8]
[--small 10] [--large 200] [--backends sqlite,postgresql]``.

For each backend, everything under one temporary directory (removed at the end):

- ``python -m portal db upgrade``, then ``python -m portal serve`` (gunicorn, loopback, as
  many workers and threads as the bare server below) with ``PORTAL_INSTANCE_DIR`` and
  ``PORTAL_BASE_URL`` set, logging at the production default (JSON lines to a file). SQLite
  is the embedded default; PostgreSQL is ``PORTAL_BENCH_DATABASE_URL`` (default
  ``postgresql://postgres@127.0.0.1:5432/test``) in a schema of its own, dropped at the end
  (skipped, and said so, when it does not answer). Two workers need shared rate limits, so
  ``PORTAL_REDIS_URL`` is ``PORTAL_BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/15``);
  without Redis both servers run one worker, and it says so;
- the data is made in this process through the services: three members of staff, sixteen
  enrolled patients, eight (``--clients``) with ``--small`` messages and eight with
  ``--large``, sent by the three in turn, every fifth with a small attachment. Each patient
  signs in once (password, then TOTP) through an in-process test client of the same
  instance (rate limits in memory there, so repeated runs never meet the portal's sign-in
  limits); the server-side session it gets is then used over HTTP;
- **bare**: a second gunicorn (same worker class, workers and threads) running a Flask app
  with one JSON endpoint, measured before and after the portal (samples pooled);
- **portal**: ``GET /inbox``: 8 threads, each its own session on its own keep-alive
  connection, ``--requests`` each after one warm-up, all released at once: p50 and p99,
  and the server's CPU per request (its workers' user + system time over the run, psutil),
  which a shared machine disturbs less than latency.
  Every view writes its audit event, as in production. The inbox shows 50 messages a page,
  so the large inbox's first page has 50 rows; its last page (rows 151-200 of 200, reached
  by the pages' own "Older messages" links) is measured too, for information: a keyset page
  costs the same however deep.

Targets (issue 13): portal p50 at most 5x the bare endpoint's, p99 at most 10x; the large
inbox's p50 and p99 at most 2x the small one's. Exits non-zero only on an error (a server
that will not start, a failed sign-in, a page that is not the inbox), never on a missed
target.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_pickup import (  # noqa: E402 - the bench folder is on the path when run as a script
    BenchError,
    Server,
    clean_env,
    free_port,
    percentile,
    redis_problem,
    start,
)

from portal.services.paging import PAGE_SIZE  # noqa: E402 - after the checkout is on the path

CLIENTS = 8
P50_TARGET = 5.0
P99_TARGET = 10.0
GROWTH_TARGET = 2.0
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"  # the benchmarks' own database
PASSWORD = "Correct horse battery staple 42"  # noqa: S105 - bench accounts only
THREADS = 4  # gthread threads per worker where the portal has no PORTAL_WEB_THREADS setting
_CSRF = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')
_NEXT = re.compile(r'<a rel="next" href="([^"]+)"')
SMALL_PDF = b"%PDF-1.4\n" + b"bench attachment\n" * 200 + b"%%EOF\n"

BARE_APP = '''\
"""The baseline: a bare Flask JSON endpoint, served like the portal (bench only)."""
from flask import Flask

app = Flask(__name__)


@app.get("/json")
def bare():
    return {"status": "ok", "messages": 10}


@app.get("/healthz")
def healthz():
    return "ok"
'''


@dataclass
class Reader:
    email: str
    secret: str
    messages: int
    cookie: str = ""


@dataclass
class Latencies:
    samples: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cpu_seconds: float = 0.0  # the server's workers, user + system, over the measured run

    def ms(self, fraction: float) -> float:
        return percentile(self.samples, fraction) * 1000

    def cpu_ms(self) -> float:
        """Server CPU per request: steadier than latency on a shared machine."""
        return self.cpu_seconds / len(self.samples) * 1000


# --- data ------------------------------------------------------------------------------------


def make_data(small: int, large: int, clients: int) -> list[Reader]:
    """Staff, patients and messages through the services, in an app from this environment."""
    from portal import create_app
    from portal.audit import NO_REQUEST, SYSTEM
    from portal.database import utcnow
    from portal.extensions import db
    from portal.security import otp
    from portal.services import accounts, messages, signin

    app = create_app({"LOG_LEVEL": "WARNING"})  # this process's own requests: not measured
    readers: list[Reader] = []
    with app.app_context():
        session = db.session
        staff = [
            accounts.create_user(
                session,
                role="staff",
                email=f"bench-staff-{n}@example.org",
                name=f"Bench Staffer {n}",
                actor=SYSTEM,
                meta=NO_REQUEST,
            ).user
            for n in range(3)
        ]
        expires = utcnow() + timedelta(days=7)
        for n, count in enumerate([small] * clients + [large] * clients):
            user = accounts.create_user(
                session,
                role="patient",
                email=f"bench-inbox-{n}@example.org",
                name=f"Ina Inbox {n}",
                actor=SYSTEM,
                meta=NO_REQUEST,
                dob=date(1970, 1, 1),
                password=PASSWORD,
            ).user
            secret, shown = signin.start_enrolment(session, user, None)
            step = int(utcnow().timestamp() // otp.STEP_SECONDS) - 1  # sign-in uses the next
            signin.finish_enrolment(session, user, otp.code_at(secret, step), NO_REQUEST, shown)
            for m in range(count):
                messages.create(
                    session,
                    sender=staff[m % len(staff)],
                    recipient=user,
                    subject=f"Letter {m}",
                    body=f"Letter {m} for reader {n}.\n" * 40,
                    expires_at=expires,
                    uploads=[messages.Upload("letter.pdf", io.BytesIO(SMALL_PDF))]
                    if m % 5 == 0
                    else [],
                    validate=None,
                )
            session.commit()
            readers.append(Reader(user.email, secret, count))
    app.extensions["engine"].dispose()
    return readers


def sign_in_all(readers: list[Reader]) -> int:
    """Sign each reader in (password, then TOTP) through an in-process client; keep the
    server-side session's cookie for the HTTP clients. Returns the threads per worker
    ``portal serve`` runs with in this environment."""
    from portal import create_app
    from portal.security import otp

    app = create_app({"RATELIMIT_STORAGE_URI": "memory://", "LOG_LEVEL": "WARNING"})
    threads = int(app.config.get("WEB_THREADS") or THREADS)
    client = app.test_client()
    name = app.config["SESSION_COOKIE_NAME"]
    for reader in readers:
        client.delete_cookie(name)
        landed = _post(client, "/signin", {"email": reader.email, "password": PASSWORD})
        if not landed.endswith("/signin/code"):
            raise BenchError(f"password step for {reader.email} ended at {landed}")
        code = otp.code_at(reader.secret, int(time.time() // otp.STEP_SECONDS))
        landed = _post(client, "/signin/code", {"code": code})
        if "/signin" in landed:
            raise BenchError(f"code step for {reader.email} ended at {landed}")
        cookie = client.get_cookie(name)
        if cookie is None:
            raise BenchError(f"no session cookie for {reader.email}")
        reader.cookie = f"{name}={cookie.value}"
    app.extensions["engine"].dispose()
    return threads


def _post(client: Any, path: str, fields: dict[str, str]) -> str:
    found = _CSRF.search(client.get(path).get_data(as_text=True))
    if not found:
        raise BenchError(f"no form on {path}")
    response = client.post(path, data={"csrf_token": found.group(1), **fields})
    return str(response.headers.get("Location", ""))


# --- load ------------------------------------------------------------------------------------


def cpu_seconds(server: Server) -> float:
    """User and system CPU seconds of the server's workers so far."""
    total = 0.0
    for worker in server.workers():
        with contextlib.suppress(psutil.Error):
            times = worker.cpu_times()
            total += times.user + times.system
    return total


def load(server: Server, jobs: list[tuple[str, str]], requests: int, expect: bytes) -> Latencies:
    """``len(jobs)`` threads, each GETting its (path, cookie) ``requests`` times on its own
    keep-alive connection after one warm-up, all released together; the server's CPU is
    counted from the release to the last answer."""
    port = server.port
    result = Latencies()
    lock = threading.Lock()
    began: list[float] = []

    def release() -> None:
        began.append(cpu_seconds(server))

    barrier = threading.Barrier(len(jobs), action=release)

    def client(path: str, cookie: str) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        headers = {"Cookie": cookie} if cookie else {}
        mine: list[float] = []
        try:
            connection.request("GET", path, headers=headers)  # warm-up, not counted
            connection.getresponse().read()
            barrier.wait()
            for _ in range(requests):
                began = time.perf_counter()
                connection.request("GET", path, headers=headers)
                response = connection.getresponse()
                body = response.read()
                mine.append(time.perf_counter() - began)
                if response.status != 200 or expect not in body:
                    raise BenchError(f"GET {path} answered {response.status}")
        except Exception as failed:  # reported by the caller
            barrier.abort()
            with lock:
                result.errors.append(repr(failed))
        finally:
            connection.close()
        with lock:
            result.samples.extend(mine)

    threads = [threading.Thread(target=client, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if result.errors:
        raise BenchError(f"clients failed: {result.errors[:3]}")
    result.cpu_seconds = cpu_seconds(server) - began[0]
    return result


def deep_page(port: int, cookie: str, pages: int) -> str:
    """The path of the inbox's page ``pages``, reached through each page's "next" link."""
    path = "/inbox"
    for _ in range(pages - 1):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", path, headers={"Cookie": cookie})
        found = _NEXT.search(connection.getresponse().read().decode())
        connection.close()
        if not found:
            raise BenchError(f"no next page after {path}")
        path = found.group(1).replace("&amp;", "&")
    return path


# --- servers ---------------------------------------------------------------------------------


def start_servers(
    tmp: Path, env: dict[str, str], workers: int, threads: int
) -> tuple[Server, Server]:
    """The portal (its own default threads) and the bare app with the same sizing."""
    portal_port, bare_port = free_port(), free_port()
    argv = [sys.executable, "-m", "portal", "serve", "--port", str(portal_port)]
    argv += ["--workers", str(workers)]
    env = {**env, "PORTAL_BASE_URL": f"http://127.0.0.1:{portal_port}"}
    portal = start("portal", argv, env, portal_port, tmp / "portal.log")
    bare_dir = tmp / "bare_app"
    bare_dir.mkdir()
    (bare_dir / "bench_bare_app.py").write_text(BARE_APP)
    bare = start(
        "bare",
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(workers),
            "--worker-class",
            "gthread",
            "--threads",
            str(threads),
            "--bind",
            f"127.0.0.1:{bare_port}",
            "--chdir",
            str(bare_dir),
            "--timeout",
            "120",
            "bench_bare_app:app",
        ],
        clean_env(),
        bare_port,
        tmp / "bare.log",
    )
    return portal, bare


# --- one backend -----------------------------------------------------------------------------


@dataclass
class Figures:
    backend: str
    bare: Latencies
    small: Latencies
    large: Latencies
    deep: Latencies


def run_backend(backend: str, url: str | None, args: argparse.Namespace) -> Figures:
    with tempfile.TemporaryDirectory(prefix=f"bench-inbox-{backend}-") as tmp_name:
        tmp = Path(tmp_name)
        redis_url = os.environ.get("PORTAL_BENCH_REDIS_URL", DEFAULT_REDIS_URL)
        no_redis = redis_problem(redis_url)
        workers = 1 if no_redis else 2
        extra = {"PORTAL_INSTANCE_DIR": str(tmp / "instance")}
        extra |= {} if no_redis else {"PORTAL_REDIS_URL": redis_url}
        extra |= {"PORTAL_DATABASE_URL": url} if url else {}
        env = clean_env(**extra)
        upgrade = subprocess.run(
            [sys.executable, "-m", "portal", "db", "upgrade"],
            env=env,
            cwd=str(ROOT),
            capture_output=True,
            check=False,
        )
        if upgrade.returncode != 0:
            raise BenchError(f"portal db upgrade failed: {upgrade.stderr.decode()[-2000:]}")
        saved = dict(os.environ)
        os.environ.update({k: v for k, v in env.items() if k.startswith("PORTAL_")})
        try:
            began = time.perf_counter()
            readers = make_data(args.small, args.large, args.clients)
            threads = sign_in_all(readers)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        print(
            f"{backend}: {len(readers)} patients enrolled and signed in, {args.clients} with "
            f"{args.small} and {args.clients} with {args.large} messages "
            f"({time.perf_counter() - began:.1f} s)",
            flush=True,
        )
        portal, bare = start_servers(tmp, env, workers, threads)
        try:
            portal.wait_ready("/healthz", workers)
            bare.wait_ready("/healthz", workers)
            print(
                f"  servers: gunicorn gthread, {workers} worker(s) x {threads} threads each; "
                + ("rate limits in Redis" if not no_redis else f"one worker (no Redis: {no_redis})")
            )
            return measure(backend, portal, bare, readers, args.requests)
        finally:
            portal.stop()
            bare.stop()


def measure(
    backend: str, portal: Server, bare: Server, readers: list[Reader], requests: int
) -> Figures:
    small = [r for r in readers if r.messages == min(x.messages for x in readers)]
    large = [r for r in readers if r.messages == max(x.messages for x in readers)]
    bare_jobs = [("/json", "")] * len(small)
    first = load(bare, bare_jobs, requests, b'"status"')
    small_run = load(portal, [("/inbox", r.cookie) for r in small], requests, b"Letter 0")
    large_run = load(portal, [("/inbox", r.cookie) for r in large], requests, b"Letter ")
    last = -(-large[0].messages // PAGE_SIZE)
    deep_jobs = [(deep_page(portal.port, r.cookie, last), r.cookie) for r in large]
    deep_run = load(portal, deep_jobs, requests, b"Letter 0")
    second = load(bare, bare_jobs, requests, b'"status"')
    pooled = Latencies(first.samples + second.samples, [], first.cpu_seconds + second.cpu_seconds)
    return Figures(backend, pooled, small_run, large_run, deep_run)


# --- report ----------------------------------------------------------------------------------


def mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def times(figure: float, baseline: float) -> str:
    """``figure`` as a multiple of ``baseline``; CPU clocks tick in 10 ms, so a tiny run may
    have measured none."""
    return f"{figure / baseline:.1f}x" if baseline > 0 else "baseline too short to measure"


def report(figures: Figures, small: int, large: int) -> None:
    bare50, bare99 = figures.bare.ms(0.50), figures.bare.ms(0.99)
    print(
        f"  bare Flask JSON (same gunicorn): p50 {bare50:6.2f} ms  p99 {bare99:6.2f} ms  "
        f"server CPU {figures.bare.cpu_ms():.2f} ms/request  "
        f"({len(figures.bare.samples)} requests, before and after the portal)"
    )
    for label, run in (
        (f"inbox, {small} messages", figures.small),
        (f"inbox, {large} messages (page 1)", figures.large),
    ):
        p50, p99 = run.ms(0.50), run.ms(0.99)
        print(
            f"  {label:32} p50 {p50:6.2f} ms ({p50 / bare50:5.1f}x, target <= {P50_TARGET:.0f}x: "
            f"{mark(p50 / bare50 <= P50_TARGET)})  p99 {p99:6.2f} ms ({p99 / bare99:5.1f}x, "
            f"target <= {P99_TARGET:.0f}x: {mark(p99 / bare99 <= P99_TARGET)})  "
            f"mean {statistics.fmean(run.samples) * 1000:.2f}  server CPU {run.cpu_ms():.2f} "
            f"ms/request ({times(run.cpu_ms(), figures.bare.cpu_ms())})"
        )
    g50 = figures.large.ms(0.50) / figures.small.ms(0.50)
    g99 = figures.large.ms(0.99) / figures.small.ms(0.99)
    print(
        f"  {large} / {small} messages: p50 {g50:.2f}x, p99 {g99:.2f}x "
        f"(target <= {GROWTH_TARGET:.0f}x: {mark(g50 <= GROWTH_TARGET and g99 <= GROWTH_TARGET)})"
    )
    deep50, deep99 = figures.deep.ms(0.50), figures.deep.ms(0.99)
    print(
        f"  information: inbox, {large} messages, last page ({-(-large // PAGE_SIZE)}): "
        f"p50 {deep50:6.2f} ms "
        f"({deep50 / figures.large.ms(0.50):.2f}x page 1)  p99 {deep99:6.2f} ms"
    )


# --- PostgreSQL ------------------------------------------------------------------------------


def bench_url(schema: str | None = None) -> str:
    from sqlalchemy.engine import make_url

    url = make_url(os.environ.get("PORTAL_BENCH_DATABASE_URL", DEFAULT_URL))
    url = url.set(drivername="postgresql+psycopg")
    if schema:
        url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@contextlib.contextmanager
def postgres_schema() -> Any:
    """A schema of its own in the benchmark database (its URL), dropped afterwards."""
    from sqlalchemy import create_engine, text

    schema = f"bench_inbox_{secrets.token_hex(6)}"
    admin = create_engine(bench_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield bench_url(schema)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def postgres_problem() -> str | None:
    import psycopg

    try:
        psycopg.connect(bench_url().replace("+psycopg", ""), connect_timeout=3).close()
    except psycopg.Error as err:
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


# --- main ------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100, help="requests per client")
    parser.add_argument("--small", type=int, default=10, help="messages in a small inbox")
    parser.add_argument("--large", type=int, default=200, help="messages in a large inbox")
    parser.add_argument("--clients", type=int, default=CLIENTS, help="concurrent clients")
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    if args.large < args.small or args.small < 1:
        parser.error("--large must be at least --small, and --small at least 1")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    try:
        for backend in args.backends.split(","):
            if backend == "sqlite":
                report(run_backend("sqlite", None, args), args.small, args.large)
            elif problem := postgres_problem():
                print(f"postgresql: skipped (benchmark database unreachable: {problem})")
            else:
                with postgres_schema() as url:
                    report(run_backend("postgresql", url, args), args.small, args.large)
    except BenchError as failed:
        print(f"bench_inbox: error: {failed}", file=sys.stderr)
        return 1
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
