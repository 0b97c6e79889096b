"""Benchmark pickup: a 200 MiB record downloaded through the running portal, beside the same
plaintext served as a file by the same server software, and the raw decrypt rate; then the
inbox page's latency with 8 concurrent signed-in patients.

Run from the checkout: ``python bench/bench_pickup.py [--mib 200] [--repeat 3]``.

One run, everything under one temporary directory (removed at the end):

- ``python -m portal db upgrade`` then ``python -m portal serve --port P --workers 2``
  (gunicorn, gthread, loopback) with ``PORTAL_INSTANCE_DIR`` and ``PORTAL_BASE_URL`` set, on
  the embedded default (SQLite, filesystem blobs), logging at the production default (JSON
  lines to a file here, not the terminal). Two workers need shared rate limits, so
  ``PORTAL_REDIS_URL`` is set to ``PORTAL_BENCH_REDIS_URL`` (default
  ``redis://127.0.0.1:6379/15``, a database of its own, not the tests' 0); when that Redis
  does not answer, the portal and the static server run one worker each, and it says so;
- the data is made in this process through the services, in an app built from the same
  environment: a member of staff, nine enrolled patients (TOTP codes are single-use, so each
  concurrent client signs in as a patient of its own), a ``--mib`` MiB PDF-like file written
  to disk (a PDF header, then distinct 1 MiB blocks) and stored as an attachment with
  ``messages.create(..., validate=None)`` (it is not a real PDF), and ten small messages in
  each inbox client's inbox;
- **portal**: sign in over HTTP (stdlib ``urllib`` with a cookie jar; CSRF token from each
  form; password, then TOTP), then ``GET .../download`` read in 1 MiB pieces. psutil samples
  the RSS of each gunicorn worker every 50 ms; the figure is the largest growth over the
  RSS just before a download, over all the portal's downloads;
- **static**: the same file from a second gunicorn (same options: gthread, as many workers,
  4 threads) running a ten-line WSGI app that returns ``werkzeug.wsgi.FileWrapper`` over it
  in 256 KiB reads (the portal's segment size), read and hashed the same way. Also shown, for
  information only: the same server handing the file to ``sendfile`` (``wsgi.file_wrapper``);
- **decrypt**: ``portal.crypto.stream.decrypt_stream`` over the blob file on disk, in-process.

Each server first serves one download that the client hashes (SHA-256 must equal the
file's; that rate is printed too); then portal and static runs alternate, best of
``--repeat`` each, read into a reused buffer without hashing, because on a small machine the
client's SHA-256 would otherwise cap both rates and hide the difference. MB/s are 10**6
bytes per second.
Targets: portal at least 50% of the static rate; worker RSS growth under 64 MiB. Then
``GET /inbox``: 8 threads, each its own signed-in session on its own keep-alive connection,
50 requests each after one warm-up: p50 and p99. Exits non-zero only on an error (a process
that will not start, a failed sign-in, bytes that differ), never on a missed target.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import http.cookiejar
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024
READ_PIECE = MIB
RATIO_TARGET = 0.50
RSS_TARGET_MIB = 64
SAMPLE_SECONDS = 0.05
CLIENTS = 8
REQUESTS_PER_CLIENT = 50
INBOX_MESSAGES = 10
PASSWORD = "Correct horse battery staple 42"  # noqa: S105 - bench accounts only
STAFF_EMAIL = "bench-staff@example.org"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"  # a database of its own, not the tests' (0)
_CSRF = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')

STATIC_APP = '''\
"""The baseline: one file, served by gunicorn like the portal's downloads (bench only)."""
import os

from werkzeug.wsgi import FileWrapper

PATH = os.environ["BENCH_STATIC_FILE"]
HEADERS = [("Content-Type", "application/pdf"), ("Cache-Control", "no-store"),
           ("Content-Disposition", 'attachment; filename="record.pdf"'),
           ("X-Content-Type-Options", "nosniff")]


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/healthz":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]
    handle = open(PATH, "rb")
    size = os.fstat(handle.fileno()).st_size
    start_response("200 OK", [*HEADERS, ("Content-Length", str(size))])
    if environ.get("PATH_INFO") == "/sendfile":
        return environ["wsgi.file_wrapper"](handle, 256 * 1024)
    return FileWrapper(handle, 256 * 1024)
'''


class BenchError(RuntimeError):
    """Something that makes the figures meaningless: the run fails."""


# --- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the developer's PORTAL_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


@dataclass
class Server:
    """A gunicorn master started by this benchmark, with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def workers(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=False)

    def wait_ready(self, path: str, workers: int, timeout: float = 60.0) -> None:
        """Wait until ``path`` answers 200 and all ``workers`` are up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.name} exited ({self.process.returncode}); "
                    f"see {self.log}:\n{tail(self.log)}"
                )
            with contextlib.suppress(OSError, http.client.HTTPException):
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", path)
                status = connection.getresponse().status
                connection.close()
                if status == 200 and len(self.workers()) >= workers:
                    return
            time.sleep(0.2)
        raise BenchError(f"{self.name} did not answer on port {self.port}:\n{tail(self.log)}")

    def stop(self) -> None:
        """SIGTERM the master (it stops its workers), SIGKILL after 20 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                for worker in self.workers():
                    with contextlib.suppress(psutil.Error):
                        worker.kill()
                self.process.kill()
                self.process.wait(timeout=10)


def redis_problem(url: str) -> str | None:
    """None when Redis at ``url`` answers, else why not (one line)."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except redis.RedisError as err:
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def start(name: str, argv: list[str], env: dict[str, str], port: int, log: Path) -> Server:
    with log.open("ab") as out:
        process = subprocess.Popen(
            argv,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(ROOT),
        )
    return Server(name, process, port, log)


# --- data ------------------------------------------------------------------------------------


def write_record(path: Path, mib: int) -> str:
    """Write ``mib`` MiB: a PDF header, then distinct 1 MiB blocks; return the SHA-256."""
    digest = hashlib.sha256()
    block = bytes(range(256)) * (MIB // 256)
    with path.open("wb") as out:
        for index in range(mib):
            prefix = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" if index == 0 else index.to_bytes(8, "big")
            chunk = prefix + block[len(prefix) :]
            out.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Patient:
    email: str
    secret: str


@dataclass
class Data:
    downloader: Patient
    readers: list[Patient]
    message_id: str
    attachment_id: str
    blob_dir: str
    blob_id: str
    key: bytes
    object_id: str


def make_data(record: Path, mib: int) -> Data:
    """Create the accounts and messages through the services (this process's environment)."""
    from portal import create_app
    from portal.audit import NO_REQUEST, SYSTEM
    from portal.database import utcnow
    from portal.extensions import db
    from portal.security import otp
    from portal.services import accounts, keys, messages, signin

    app = create_app()

    def patient(session: Any, email: str, name: str) -> tuple[Any, Patient]:
        user = accounts.create_user(
            session,
            role="patient",
            email=email,
            name=name,
            actor=SYSTEM,
            meta=NO_REQUEST,
            dob=date(1970, 1, 1),
            password=PASSWORD,
        ).user
        secret, shown = signin.start_enrolment(session, user, None)
        step = int(utcnow().timestamp() // otp.STEP_SECONDS) - 1  # sign-in uses the next one
        signin.finish_enrolment(session, user, otp.code_at(secret, step), NO_REQUEST, shown)
        return user, Patient(email, secret)

    with app.app_context():
        session = db.session
        staff = accounts.create_user(
            session,
            role="staff",
            email=STAFF_EMAIL,
            name="Bench Staffer",
            actor=SYSTEM,
            meta=NO_REQUEST,
            password=PASSWORD,
        ).user
        expires = utcnow() + timedelta(days=7)
        owner, downloader = patient(session, "bench-download@example.org", "Dora Download")
        readers = []
        for n in range(CLIENTS):
            user, reader = patient(session, f"bench-inbox-{n}@example.org", f"Ina Inbox {n}")
            readers.append(reader)
            for m in range(INBOX_MESSAGES):
                messages.create(
                    session,
                    sender=staff,
                    recipient=user,
                    subject=f"Letter {m}",
                    body=f"Letter {m} for reader {n}.\n" * 20,
                    expires_at=expires,
                )
        session.commit()
        with record.open("rb") as stream:
            message = messages.create(
                session,
                sender=staff,
                recipient=owner,
                subject="Large record",
                body="The record is attached.",
                expires_at=expires,
                uploads=[messages.Upload("record.pdf", stream)],
                validate=None,
            )
        session.commit()
        attachment = message.attachments[0]
        if attachment.size != mib * MIB:
            raise BenchError(f"stored {attachment.size} bytes, expected {mib * MIB}")
        key = keys.unwrap(session, message.data_key_id)
        data = Data(
            downloader,
            readers,
            message.public_id,
            attachment.public_id,
            str(app.config["BLOB_DIR"]),
            attachment.blob_id,
            key,
            attachment.public_id,
        )
    app.extensions["engine"].dispose()
    return data


# --- HTTP clients ----------------------------------------------------------------------------


class Session:
    """A signed-in patient: urllib with a cookie jar for the forms, then raw connections."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def _form(self, path: str) -> str:
        with self.opener.open(self.base_url + path, timeout=30) as response:
            found = _CSRF.search(response.read().decode())
        if not found:
            raise BenchError(f"no form on {path}")
        return found.group(1)

    def _post(self, path: str, fields: dict[str, str]) -> tuple[str, str]:
        body = urllib.parse.urlencode({"csrf_token": self._form(path), **fields}).encode()
        with self.opener.open(self.base_url + path, data=body, timeout=30) as response:
            return response.geturl(), response.read().decode()

    def sign_in(self, who: Patient) -> None:
        """Password, then the current TOTP code; raises BenchError unless signed in."""
        from portal.security import otp

        landed, _ = self._post("/signin", {"email": who.email, "password": PASSWORD})
        if not landed.endswith("/signin/code"):
            raise BenchError(f"password step for {who.email} ended at {landed}")
        code = otp.code_at(who.secret, int(time.time() // otp.STEP_SECONDS))
        landed, _ = self._post("/signin/code", {"code": code})
        if "/signin" in landed:
            raise BenchError(f"code step for {who.email} ended at {landed}")

    def cookie_header(self) -> str:
        return "; ".join(f"{c.name}={c.value}" for c in self.jar)


@dataclass
class Download:
    seconds: float
    size: int
    sha256: str
    rss_growth_mib: float

    @property
    def mb_s(self) -> float:
        return self.size / self.seconds / 1e6


class RssSampler:
    """Samples the RSS of ``processes`` every 50 ms; growth is over the first sample."""

    def __init__(self, processes: list[psutil.Process]) -> None:
        self.processes = processes
        self.start_rss = {p.pid: p.memory_info().rss for p in processes}
        self.peak = dict(self.start_rss)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._sample()

    def _sample(self) -> None:
        for process in self.processes:
            with contextlib.suppress(psutil.Error):
                rss = process.memory_info().rss
                self.peak[process.pid] = max(self.peak[process.pid], rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def growth_mib(self) -> float:
        return max(self.peak[pid] - self.start_rss[pid] for pid in self.peak) / MIB


def download(
    port: int, path: str, server: Server, cookie: str = "", *, verify: bool = False
) -> Download:
    """GET ``path`` in 1 MiB pieces while sampling the workers' RSS.

    ``verify`` hashes the pieces (SHA-256); otherwise they are read into one reused buffer
    and dropped, so the client's hashing does not cap the rate being measured.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Cookie": cookie} if cookie else {}
    digest, size = hashlib.sha256(), 0
    buffer = memoryview(bytearray(READ_PIECE))
    with RssSampler(server.workers()) as sampler:
        began = time.perf_counter()
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        if response.status != 200:
            raise BenchError(f"GET {path}: {response.status} {response.read()[:200]!r}")
        while count := response.readinto(buffer):
            if verify:
                digest.update(buffer[:count])
            size += count
        seconds = time.perf_counter() - began
    connection.close()
    return Download(seconds, size, digest.hexdigest() if verify else "", sampler.growth_mib())


def decrypt_rate(data: Data, expected_size: int) -> float:
    """MB/s of decrypt_stream over the blob file on disk (segments consumed, not kept)."""
    from portal.crypto.stream import decrypt_stream
    from portal.storage import FilesystemBlobStore

    began, size = time.perf_counter(), 0
    with FilesystemBlobStore(data.blob_dir).open(data.blob_id) as src:
        for segment in decrypt_stream(data.key, data.object_id, src):
            size += len(segment)
    seconds = time.perf_counter() - began
    if size != expected_size:
        raise BenchError(f"decrypted {size} bytes, expected {expected_size}")
    return size / seconds / 1e6


@dataclass
class Latencies:
    samples: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def inbox_latency(base_url: str, port: int, readers: list[Patient]) -> Latencies:
    """Each reader signs in, then CLIENTS threads GET /inbox at once, 50 times each."""
    cookies = []
    for reader in readers:
        session = Session(base_url)
        session.sign_in(reader)
        cookies.append(session.cookie_header())
    result = Latencies()
    lock = threading.Lock()
    barrier = threading.Barrier(len(cookies))

    def client(cookie: str) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {"Cookie": cookie}
        mine: list[float] = []
        try:
            connection.request("GET", "/inbox", headers=headers)  # warm-up, not counted
            connection.getresponse().read()
            barrier.wait()
            for _ in range(REQUESTS_PER_CLIENT):
                began = time.perf_counter()
                connection.request("GET", "/inbox", headers=headers)
                response = connection.getresponse()
                page = response.read()
                mine.append(time.perf_counter() - began)
                if response.status != 200 or b"Letter 0" not in page:
                    raise BenchError(f"/inbox answered {response.status}")
        except Exception as failed:  # reported by the caller
            barrier.abort()
            with lock:
                result.errors.append(repr(failed))
        finally:
            connection.close()
        with lock:
            result.samples.extend(mine)

    threads = [threading.Thread(target=client, args=(c,)) for c in cookies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return result


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


# --- the run ---------------------------------------------------------------------------------


def run(mib: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-pickup-") as tmp_name:
        tmp = Path(tmp_name)
        servers: list[Server] = []
        try:
            measure(tmp, servers, mib, repeat)
        finally:
            for server in servers:
                server.stop()


def measure(tmp: Path, servers: list[Server], mib: int, repeat: int) -> None:
    portal_port, static_port = free_port(), free_port()
    base_url = f"http://127.0.0.1:{portal_port}"
    # More than one portal worker needs shared rate-limit counters (``portal serve`` refuses).
    redis_url = os.environ.get("PORTAL_BENCH_REDIS_URL", DEFAULT_REDIS_URL)
    no_redis = redis_problem(redis_url)
    workers = 1 if no_redis else 2
    shared = {} if no_redis else {"PORTAL_REDIS_URL": redis_url}
    env = clean_env(PORTAL_INSTANCE_DIR=str(tmp / "instance"), PORTAL_BASE_URL=base_url, **shared)
    upgrade = subprocess.run(
        [sys.executable, "-m", "portal", "db", "upgrade"],
        env=env,
        cwd=str(ROOT),
        capture_output=True,
        check=False,
    )
    if upgrade.returncode != 0:
        raise BenchError(f"portal db upgrade failed: {upgrade.stderr.decode()[-2000:]}")

    record = tmp / "record.pdf"
    began = time.perf_counter()
    expected = write_record(record, mib)
    os.environ.update({k: v for k, v in env.items() if k.startswith("PORTAL_")})
    data = make_data(record, mib)
    print(
        f"setup: {mib} MiB record written and stored encrypted, 9 patients enrolled "
        f"({time.perf_counter() - began:.1f} s)"
    )

    portal = start(
        "portal",
        [
            sys.executable,
            "-m",
            "portal",
            "serve",
            "--port",
            str(portal_port),
            "--workers",
            str(workers),
        ],
        env,
        portal_port,
        tmp / "portal.log",
    )
    servers.append(portal)
    static_dir = tmp / "static_app"
    static_dir.mkdir()
    (static_dir / "bench_static_app.py").write_text(STATIC_APP)
    static = start(
        "static",
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(workers),
            "--worker-class",
            "gthread",
            "--threads",
            "4",
            "--bind",
            f"127.0.0.1:{static_port}",
            "--chdir",
            str(static_dir),
            "--timeout",
            "120",
            "bench_static_app:app",
        ],
        clean_env(BENCH_STATIC_FILE=str(record)),
        static_port,
        tmp / "static.log",
    )
    servers.append(static)
    portal.wait_ready("/healthz", workers)
    static.wait_ready("/healthz", workers)
    print(
        f"servers: {workers} gunicorn worker(s) each; portal rate limits in "
        + ("Redis (shared)" if not no_redis else f"memory, per worker (no Redis: {no_redis})")
    )

    patient = Session(base_url)
    patient.sign_in(data.downloader)
    path = f"/messages/{data.message_id}/attachments/{data.attachment_id}/download"
    cookie = patient.cookie_header()
    checked = [
        download(portal_port, path, portal, cookie, verify=True),
        download(static_port, "/record.pdf", static, verify=True),
        download(static_port, "/sendfile", static, verify=True),
    ]
    for got in checked:
        if (got.size, got.sha256) != (mib * MIB, expected):
            raise BenchError(f"downloaded {got.size} bytes with another SHA-256")
    ours, theirs, sendfile = [checked[0]], [checked[1]], [checked[2]]
    for _ in range(repeat):
        ours.append(download(portal_port, path, portal, cookie))
        theirs.append(download(static_port, "/record.pdf", static))
        sendfile.append(download(static_port, "/sendfile", static))
    for got in [*ours, *theirs, *sendfile]:
        if got.size != mib * MIB:
            raise BenchError(f"downloaded {got.size} bytes, expected {mib * MIB}")
    decrypt = max(decrypt_rate(data, mib * MIB) for _ in range(repeat))

    best_ours = max(d.mb_s for d in ours[1:])
    best_static = max(d.mb_s for d in theirs[1:])
    best_sendfile = max(d.mb_s for d in sendfile[1:])
    rss = max(d.rss_growth_mib for d in ours)
    ratio = best_ours / best_static
    print(
        f"download of {mib} MiB over loopback, best of {repeat} (MB/s = 10^6 B/s); a first, "
        "hashed run of each: SHA-256 identical to the file "
        f"(portal {ours[0].mb_s:.0f} MB/s, static {theirs[0].mb_s:.0f} MB/s hashing)"
    )
    print(f"  portal (gunicorn, decrypt + stream):     {best_ours:8.1f} MB/s")
    print(f"  static file (same gunicorn, FileWrapper):{best_static:8.1f} MB/s")
    print(f"  static file via sendfile (information):  {best_sendfile:8.1f} MB/s")
    print(f"  raw decrypt_stream from disk:            {decrypt:8.1f} MB/s")
    print(
        f"  portal / static: {ratio:.2f} (target >= {RATIO_TARGET:.2f}: "
        f"{'met' if ratio >= RATIO_TARGET else 'MISSED'}); "
        f"portal / raw decrypt: {best_ours / decrypt:.2f}; "
        f"portal / sendfile: {best_ours / best_sendfile:.2f}"
    )
    print(
        f"  portal worker peak RSS growth during the download: {rss:.1f} MiB "
        f"(per run: {', '.join(f'{d.rss_growth_mib:.1f}' for d in ours)}; target < "
        f"{RSS_TARGET_MIB} MiB: {'met' if rss < RSS_TARGET_MIB else 'MISSED'}); "
        f"static server's: {max(d.rss_growth_mib for d in theirs):.1f} MiB"
    )

    latencies = inbox_latency(base_url, portal_port, data.readers)
    if latencies.errors:
        raise BenchError(f"inbox clients failed: {latencies.errors[:3]}")
    ms = [s * 1000 for s in latencies.samples]
    print(
        f"GET /inbox ({INBOX_MESSAGES} messages each), {CLIENTS} concurrent signed-in "
        f"clients x {REQUESTS_PER_CLIENT} requests ({len(ms)} in all): "
        f"p50 {percentile(ms, 0.50):.1f} ms, p99 {percentile(ms, 0.99):.1f} ms "
        f"(mean {statistics.fmean(ms):.1f}, max {max(ms):.1f})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=200, help="record size in MiB")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each download")
    args = parser.parse_args()
    try:
        run(args.mib, args.repeat)
    except BenchError as failed:
        print(f"bench_pickup: error: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
