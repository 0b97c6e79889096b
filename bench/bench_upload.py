"""Benchmark uploads: a 100 MiB PDF through the staff compose form, beside the same gunicorn
reading the body to /dev/null; the workers' RSS; and a search for the file's plaintext on disk.

Run from the checkout: ``python bench/bench_upload.py [--mib 100] [--repeat 3]``.

One run, everything under one temporary directory (removed at the end):

- ``python -m portal db upgrade`` then ``python -m portal serve --port P --workers N``
  (gunicorn, gthread, loopback) on the embedded default (SQLite, filesystem blobs), with
  ``TMPDIR`` pointed at a folder of the run's own, so a temporary file the server makes
  would be found; two workers with rate limits in Redis at ``PORTAL_BENCH_REDIS_URL``
  (default ``redis://127.0.0.1:6379/15``), one without Redis (it says which);
- a member of staff (password and TOTP) and a patient, made through the services in this
  process; the staff member signs in over HTTP (stdlib ``urllib`` and a cookie jar) and
  opens the compose form for its CSRF token;
- the file: a valid one-page PDF of ``--mib`` MiB whose content stream repeats a random
  canary on every line (tests/support/uploads.py ``CanaryPdf``), generated as it is sent;
- **portal**: ``POST /staff/messages/new`` as a browser sends it (multipart/form-data, the
  text fields, then the file), written to a raw socket in 1 MiB pieces; timed from the
  first byte to the answer (a 302 to the message's status page); the stored SHA-256 on that
  page must be the file's. psutil samples each worker's RSS every 50 ms; the figure is the
  largest growth over the RSS just before an upload;
- **baseline**: the same body to a second gunicorn (same worker class, workers and threads)
  running a ten-line WSGI app that reads ``wsgi.input`` in reads of the portal parser's size
  (``portal.web.uploads.PARSE_CHUNK``) and writes it to /dev/null. Also shown, for
  information: the same server parsing the body with Werkzeug's multipart parser (same read
  size) and dropping the file part (the parser's own cost), and reading the body to
  /dev/null in 64 KiB reads, Werkzeug's default (a receiver that reads smaller pieces);
- **plaintext on disk**: one more upload pauses halfway; while it waits (the worker has
  stored about a third of the file, encrypted), and again after it is sent, every open
  regular file of every portal worker (``/proc/<pid>/fd``, deleted files included), the
  run's ``TMPDIR`` and the instance folder (database, keyring, blob store with its
  temporary blobs) are searched for the canary. Found anywhere: the run fails.

Portal and baseline runs alternate, best of ``--repeat`` each. MB/s are 10**6 bytes per
second. The workers' CPU-seconds per GB (psutil, user + system) are printed beside them:
steadier than MB/s when other work shares the machine. Targets: portal at least 50% of the
baseline; worker RSS growth under 32 MiB; nothing in plaintext on disk. Exits non-zero on
an error (a process that will not start, a failed sign-in, a wrong SHA-256, plaintext
found), never on a missed speed or memory target.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_pickup import (  # noqa: E402 - the shared gunicorn and sign-in helpers
    DEFAULT_REDIS_URL,
    PASSWORD,
    BenchError,
    Patient,
    RssSampler,
    Server,
    Session,
    clean_env,
    free_port,
    redis_problem,
    start,
)

from portal.crypto.stream import SEGMENT_SIZE  # noqa: E402
from portal.storage import WRITE_BUFFER  # noqa: E402
from portal.web.uploads import PARSE_CHUNK  # noqa: E402
from tests.support.uploads import (  # noqa: E402
    CanaryPdf,
    Multipart,
    compose_body,
    files_holding,
    new_canary,
    open_files_holding,
)

MIB = 1024 * 1024
PIECE = MIB
RATIO_TARGET = 0.50
RSS_TARGET_MIB = 32
THREADS = 4  # per worker, portal and baseline alike (one upload at a time is measured)
STAFF_EMAIL = "bench-upload-staff@example.org"
PATIENT_EMAIL = "bench-upload-patient@example.org"
_CSRF = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')
_SHA256 = re.compile(r"\b[0-9a-f]{64}\b")

BASELINE_APP = '''\
"""The baseline: read the request body to /dev/null under the same gunicorn (bench only)."""
import os

from werkzeug.formparser import MultiPartParser
from werkzeug.http import parse_options_header

CHUNK = int(os.environ["BENCH_READ_CHUNK"])  # what the portal's multipart parser reads at once
SINK = open("/dev/null", "wb")


class Drop:
    def write(self, data):
        return len(data)

    def seek(self, *args):
        return 0


def app(environ, start_response):
    stream, size = environ["wsgi.input"], 0
    chunk_size = 65536 if environ.get("PATH_INFO") == "/64k" else CHUNK
    if environ.get("PATH_INFO") == "/parse":  # information: Werkzeug's multipart parser alone
        boundary = parse_options_header(environ["CONTENT_TYPE"])[1]["boundary"].encode()
        parser = MultiPartParser(lambda **kw: Drop(), 500_000, buffer_size=CHUNK)
        size = len(parser.parse(stream, boundary, None)[1])
    else:
        while chunk := stream.read(chunk_size):
            SINK.write(chunk)
            size += len(chunk)
    body = str(size).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''


@dataclass
class Upload:
    seconds: float
    size: int
    status: int
    location: str
    rss_growth_mib: float = 0.0
    cpu_seconds: float = 0.0  # the server's workers, user + system, during the upload

    @property
    def mb_s(self) -> float:
        return self.size / self.seconds / 1e6

    @property
    def cpu_s_per_gb(self) -> float:
        return self.cpu_seconds / (self.size / 1e9)


def cpu_seconds(server: Server) -> float:
    """User + system CPU seconds the server's workers have used so far."""
    total = 0.0
    for worker in server.workers():
        times = worker.cpu_times()
        total += times.user + times.system
    return total


def timed(server: Server, upload: Callable[[], Upload]) -> Upload:
    """Run ``upload`` while sampling the workers' RSS; record their RSS growth and CPU."""
    before = cpu_seconds(server)
    with RssSampler(server.workers()) as sampler:
        got = upload()
    got.cpu_seconds = cpu_seconds(server) - before
    got.rss_growth_mib = sampler.growth_mib()
    return got


def make_accounts() -> tuple[Patient, str]:
    """The staff member (password + TOTP) and the patient; return the first and the patient's id."""
    from portal import create_app
    from portal.audit import NO_REQUEST, SYSTEM
    from portal.database import utcnow
    from portal.extensions import db
    from portal.security import otp
    from portal.services import accounts, signin, teams

    app = create_app()
    with app.app_context():
        staff = accounts.create_user(
            db.session,
            role="staff",
            email=STAFF_EMAIL,
            name="Bench Uploader",
            actor=SYSTEM,
            meta=NO_REQUEST,
            password=PASSWORD,
        ).user
        secret, shown = signin.start_enrolment(db.session, staff, None)
        step = int(utcnow().timestamp() // otp.STEP_SECONDS) - 1  # sign-in uses the next one
        signin.finish_enrolment(db.session, staff, otp.code_at(secret, step), NO_REQUEST, shown)
        # Staff send from a care team: the bench's member of staff is in one.
        team = teams.create_team(
            db.session, name="Bench team", open_to_patients=False, actor=SYSTEM, meta=NO_REQUEST
        )
        teams.add_member(db.session, team, STAFF_EMAIL, actor=SYSTEM, meta=NO_REQUEST)
        patient = accounts.create_user(
            db.session,
            role="patient",
            email=PATIENT_EMAIL,
            name="Uma Upload",
            actor=SYSTEM,
            meta=NO_REQUEST,
            dob=date(1970, 1, 1),
        ).user
        db.session.commit()
        public_id = patient.public_id
    app.extensions["engine"].dispose()
    return Patient(STAFF_EMAIL, secret), public_id


def send(
    port: int,
    path: str,
    body: Multipart,
    cookie: str = "",
    pause: Callable[[int], None] | None = None,
) -> Upload:
    """POST ``body`` over a raw socket in 1 MiB pieces; time from the first byte to the answer."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {body.content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
        + (f"Cookie: {cookie}\r\n" if cookie else "")
        + "\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=300) as sock:
        began = time.perf_counter()
        sock.sendall(head)
        sent = 0
        for piece in body.pieces():
            sock.sendall(piece)
            sent += len(piece)
            if pause is not None:
                pause(sent)
        answer = bytearray()
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer:
                break
        seconds = time.perf_counter() - began
    status_line, _, rest = bytes(answer).partition(b"\r\n")
    status = int(status_line.split()[1]) if status_line else 0
    found = re.search(rb"(?im)^location:\s*(\S+)", rest)
    return Upload(seconds, len(body), status, found.group(1).decode() if found else "")


def sha256_of(pdf: CanaryPdf) -> str:
    digest = hashlib.sha256()
    for piece in pdf.pieces(PIECE):
        digest.update(piece)
    return digest.hexdigest()


class PlaintextSearch:
    """Searches every portal worker's open files and the run's folders for the canary."""

    def __init__(self, portal: Server, canary: bytes, folders: list[Path]) -> None:
        self.portal, self.canary, self.folders = portal, canary, folders
        self.found: list[str] = []
        self.searched_files = 0

    def now(self) -> None:
        for worker in self.portal.workers():
            self.found += [
                f"worker {worker.pid}: {p}" for p in open_files_holding(self.canary, worker.pid)
            ]
            self.searched_files += sum(1 for _ in Path(f"/proc/{worker.pid}/fd").iterdir())
        self.found += [str(p) for p in files_holding(self.canary, *self.folders)]
        self.searched_files += sum(1 for folder in self.folders for _ in folder.rglob("*"))


def wait_for_part(blob_tmp: Path, at_least: int, timeout: float = 120.0) -> int:
    """Wait until a temporary blob of at least ``at_least`` bytes exists; return its size."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sizes = [p.stat().st_size for p in blob_tmp.glob("*.part") if p.exists()]
        if sizes and max(sizes) >= at_least:
            return max(sizes)
        time.sleep(0.01)
    raise BenchError(f"no temporary blob of {at_least} bytes appeared in {blob_tmp}")


def run(mib: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp_name:
        tmp = Path(tmp_name)
        servers: list[Server] = []
        try:
            measure(tmp, servers, mib, repeat)
        finally:
            for server in servers:
                server.stop()


def measure(tmp: Path, servers: list[Server], mib: int, repeat: int) -> None:
    portal_port, base_port = free_port(), free_port()
    base_url = f"http://127.0.0.1:{portal_port}"
    redis_url = os.environ.get("PORTAL_BENCH_REDIS_URL", DEFAULT_REDIS_URL)
    no_redis = redis_problem(redis_url)
    workers = 1 if no_redis else 2
    server_tmp = tmp / "server-tmp"
    server_tmp.mkdir()
    instance = tmp / "instance"
    shared = {} if no_redis else {"PORTAL_REDIS_URL": redis_url}
    env = clean_env(
        PORTAL_INSTANCE_DIR=str(instance),
        PORTAL_BASE_URL=base_url,
        TMPDIR=str(server_tmp),
        **shared,
    )
    upgrade = subprocess.run(
        [sys.executable, "-m", "portal", "db", "upgrade"],
        env=env,
        cwd=str(ROOT),
        capture_output=True,
        check=False,
    )
    if upgrade.returncode != 0:
        raise BenchError(f"portal db upgrade failed: {upgrade.stderr.decode()[-2000:]}")
    os.environ.update({k: v for k, v in env.items() if k.startswith("PORTAL_")})
    staff, patient_id = make_accounts()

    threads = THREADS
    argv = [sys.executable, "-m", "portal", "serve", "--port", str(portal_port)]
    argv += ["--workers", str(workers), *_threads_option(threads)]
    portal = start("portal", argv, env, portal_port, tmp / "portal.log")
    servers.append(portal)
    app_dir = tmp / "baseline_app"
    app_dir.mkdir()
    (app_dir / "bench_baseline_app.py").write_text(BASELINE_APP)
    baseline = start(
        "baseline",
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
            f"127.0.0.1:{base_port}",
            "--chdir",
            str(app_dir),
            "--timeout",
            "300",
            "bench_baseline_app:app",
        ],
        clean_env(TMPDIR=str(server_tmp), BENCH_READ_CHUNK=str(PARSE_CHUNK)),
        base_port,
        tmp / "baseline.log",
    )
    servers.append(baseline)
    portal.wait_ready("/healthz", workers)
    baseline.wait_ready("/", workers)
    print(
        f"servers: {workers} gunicorn worker(s) x {threads} threads each (gthread); portal rate "
        "limits in " + ("Redis (shared)" if not no_redis else f"memory (no Redis: {no_redis})")
    )

    session = Session(base_url)
    session.sign_in(staff)
    path = f"/staff/messages/new?{urllib.parse.urlencode({'to': patient_id})}"
    with session.opener.open(base_url + path, timeout=30) as page:
        token = _CSRF.search(page.read().decode())
    if not token:
        raise BenchError("no form on the compose page")
    cookie = session.cookie_header()
    canary = new_canary()
    pdf = CanaryPdf(mib * MIB, canary)
    expected = sha256_of(pdf)

    def body() -> Multipart:
        return compose_body(token.group(1), [("bench-record.pdf", pdf)], subject="Bench upload")

    search = PlaintextSearch(portal, canary, [server_tmp, instance])
    blob_tmp = instance / "blobs" / "tmp"
    checked = check_run(portal_port, path, body(), cookie, len(pdf), blob_tmp, search)
    _verify(session, base_url, checked, expected)
    search.now()  # after: the message is sent and the worker idle again
    if search.found:
        raise BenchError(f"the file's plaintext was found on disk: {search.found[:5]}")

    ours, theirs, parse_only, small_reads = [], [], [], []
    for _ in range(repeat):
        got = timed(portal, lambda: send(portal_port, path, body(), cookie))
        _verify(session, base_url, got, expected)
        ours.append(got)
        theirs.append(_expect_ok(timed(baseline, lambda: send(base_port, "/", body()))))
        parse_only.append(_expect_ok(timed(baseline, lambda: send(base_port, "/parse", body()))))
        small_reads.append(_expect_ok(timed(baseline, lambda: send(base_port, "/64k", body()))))
    report(mib, repeat, ours, theirs, parse_only, small_reads, search)


def check_run(
    port: int,
    path: str,
    body: Multipart,
    cookie: str,
    file_size: int,
    blob_tmp: Path,
    search: PlaintextSearch,
) -> Upload:
    """One upload that pauses halfway for the plaintext search (not timed for the figures)."""
    paused = {"done": False}
    half = len(body) // 2

    def pause(sent: int) -> None:
        if not paused["done"] and sent >= half:
            paused["done"] = True
            # A third of the file in, less what the worker may hold unwritten (its write
            # buffer and the one segment the encryptor holds back).
            wait_for_part(blob_tmp, max(1, file_size // 3 - WRITE_BUFFER - SEGMENT_SIZE))
            search.now()

    return send(port, path, body, cookie, pause)


def _verify(session: Session, base_url: str, got: Upload, expected: str) -> None:
    if got.status != 302 or "/staff/messages/" not in got.location:
        raise BenchError(f"the upload answered {got.status} {got.location!r}")
    with session.opener.open(urllib.parse.urljoin(base_url, got.location), timeout=30) as page:
        shown = set(_SHA256.findall(page.read().decode()))
    if expected not in shown:
        raise BenchError("the status page does not show the file's SHA-256")


def _expect_ok(got: Upload) -> Upload:
    if got.status != 200:
        raise BenchError(f"the baseline answered {got.status}")
    return got


def _threads_option(threads: int) -> list[str]:
    """``--threads N`` when ``portal serve`` takes it (else it runs gunicorn's 4 per worker)."""
    probe = subprocess.run(
        [sys.executable, "-m", "portal", "serve", "--help"],
        env=clean_env(),
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        check=False,
    )
    return ["--threads", str(threads)] if "--threads" in probe.stdout else []


def report(
    mib: int,
    repeat: int,
    ours: list[Upload],
    theirs: list[Upload],
    parse_only: list[Upload],
    small_reads: list[Upload],
    search: PlaintextSearch,
) -> None:
    best_ours = max(u.mb_s for u in ours)
    best_theirs = max(u.mb_s for u in theirs)
    best_parse = max(u.mb_s for u in parse_only)
    ratio = best_ours / best_theirs
    rss = max(u.rss_growth_mib for u in ours)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"upload of a {mib} MiB PDF over loopback, best of {repeat} (MB/s = 10^6 B/s; load {load})"
    )
    print(
        f"  portal (staff form: parse, SHA-256, PDF check, encrypt, fsync): {best_ours:8.1f} MB/s"
    )
    print(
        f"  baseline (same gunicorn, body read to /dev/null):              {best_theirs:8.1f} MB/s"
    )
    print(
        f"  Werkzeug multipart parse alone, file dropped (information):    {best_parse:8.1f} MB/s"
    )
    print(
        "  baseline in 64 KiB reads, Werkzeug's default (information):    "
        f"{max(u.mb_s for u in small_reads):8.1f} MB/s, "
        f"{min(u.cpu_s_per_gb for u in small_reads):.2f} CPU-s/GB"
    )
    print(
        f"  portal / baseline: {ratio:.2f} (target >= {RATIO_TARGET:.2f}: "
        f"{'met' if ratio >= RATIO_TARGET else 'MISSED'}); per run: "
        f"{', '.join(f'{u.mb_s:.0f}' for u in ours)} vs "
        f"{', '.join(f'{u.mb_s:.0f}' for u in theirs)}"
    )
    # Best of each side is set by the baseline's luckiest run on a shared machine; the
    # paired ratios (each portal run over the baseline run just after it) are steadier.
    paired = sorted(o.mb_s / t.mb_s for o, t in zip(ours, theirs, strict=True))
    print(
        f"  paired per-run ratios, median (information): {paired[len(paired) // 2]:.2f} "
        f"({', '.join(f'{r:.2f}' for r in paired)})"
    )
    cpu_ours = min(u.cpu_s_per_gb for u in ours)
    cpu_theirs = min(u.cpu_s_per_gb for u in theirs)
    print(
        f"  server CPU-seconds per GB (workers, user + system; steadier than MB/s on a shared "
        f"machine): portal {cpu_ours:.2f}, baseline {cpu_theirs:.2f}, parse alone "
        f"{min(u.cpu_s_per_gb for u in parse_only):.2f}; baseline / portal: "
        f"{cpu_theirs / cpu_ours:.2f}"
    )
    print(
        f"  portal worker peak RSS growth during an upload: {rss:.1f} MiB (per run: "
        f"{', '.join(f'{u.rss_growth_mib:.1f}' for u in ours)}; target < {RSS_TARGET_MIB} MiB: "
        f"{'met' if rss < RSS_TARGET_MIB else 'MISSED'})"
    )
    print(
        f"  plaintext on disk: none (canary searched halfway through an upload and after it, in "
        f"{search.searched_files} open files and folder entries: worker descriptors, TMPDIR, "
        "instance and blob store)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=100, help="upload size in MiB")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each upload")
    args = parser.parse_args()
    try:
        run(args.mib, args.repeat)
    except BenchError as failed:
        print(f"bench_upload: error: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
