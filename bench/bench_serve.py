"""Benchmark serving (issue 13 item 2): one request while many slow clients download, beside
the same request idle; then concurrent bulk downloads beside Debian's nginx.

Run from the checkout: ``python bench/bench_serve.py [--mib 200] [--slow-clients 64]
[--rate-mb 2] [--fast-clients 8] [--samples 300] [--repeat 2]``.

One run, everything under one temporary directory (removed at the end):

- ``python -m portal db upgrade``, then ``python -m portal serve`` sized the way README
  "Serving" says for ``--slow-clients`` concurrent downloads (or ``--fast-clients`` on each
  worker, if more): two workers, download slots per worker = ceil(1.25 x clients / workers)
  (the kernel does not share connections out evenly), threads = slots + 4 (the default
  reserve for pages and health checks). Embedded
  default (SQLite, filesystem blobs), logs to a file. Two workers need shared rate limits:
  ``PORTAL_REDIS_URL`` is ``PORTAL_BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/15``);
  when no Redis answers, one worker holds every slot, and the run says so;
- the data is bench_pickup's (through the services): a patient with the ``--mib`` MiB record
  and patients with ten small messages each (one of them reads the inbox here);
- **slow clients**: a separate process (asyncio) opens ``--slow-clients`` connections, each
  with a 256 KiB receive buffer, and downloads the record on each, reading at
  ``--rate-mb`` MB/s (10**6 B/s) apiece. While every one of them streams, this process
  times one request at a time, 20 ms apart, each on its own keep-alive connection:
  ``GET /healthz`` (no cookie, as a load balancer asks) and ``GET /inbox`` (signed in),
  until ``--samples`` of each or the first download ends. The same requests are timed the
  same way while no download runs (idle: half the samples before, half after, pooled, as
  the machine's other load drifts). Figures: p50 and p99 beside idle; target p99 <= 3x
  idle; every download must end with all its bytes (target: none aborted; one refused with
  503 is reported as refused, and misses the target too). Also: the workers' RSS growth
  over the slow downloads, divided by their number;
- **bulk**: ``--fast-clients`` downloads of the record at once, as fast as the clients read
  (a process each, 1 MiB reads into a reused buffer), from the portal and then from nginx
  (Debian's package, started here on a temporary configuration: two worker processes,
  ``sendfile on``, no access log) serving the plaintext file; ``--repeat`` rounds of each,
  alternating, the best kept. Figures: aggregate MB/s (all bytes / the round's wall time),
  the ratio (target >= 0.70), the portal workers' peak RSS growth (target flat: < 32 MiB),
  and each server's CPU-seconds per GB (user + system of its master and workers over the
  round), steadier than MB/s on a shared machine.

Exits non-zero only on an error (a process that will not start, a failed sign-in, a bulk
download that comes up short), never on a missed target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import math
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_pickup import (  # noqa: E402 - after the path that finds it
    DEFAULT_REDIS_URL,
    MIB,
    ROOT,
    BenchError,
    RssSampler,
    Server,
    Session,
    clean_env,
    free_port,
    make_data,
    percentile,
    redis_problem,
    start,
    write_record,
)

P99_TARGET = 3.0  # p99 under load / p99 idle
BULK_TARGET = 0.70  # portal / nginx aggregate MB/s
RSS_TARGET_MIB = 32
SLOTS_HEADROOM = 1.25
RESERVED_THREADS = 4  # portal.config.DEFAULT_RESERVED_THREADS
SLOW_RCVBUF = 256 * 1024
SLOW_PIECE = 256 * 1024
PROBE_GAP_SECONDS = 0.02
PROBES = {"/healthz": False, "/inbox": True}  # path: sent with the patient's cookie
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


# --- slow clients (their own process) ---------------------------------------------------------


@dataclass
class SlowResult:
    status: int
    size: int
    error: str | None


async def _slow_download(
    port: int, path: str, cookie: str, rate: float, answered: Callable[[int], None]
) -> SlowResult:
    """GET ``path`` through a small receive buffer, reading at ``rate`` bytes/s."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
    sock.setblocking(False)
    buffer = memoryview(bytearray(SLOW_PIECE))
    status = 0
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\n\r\n"
        await loop.sock_sendall(sock, request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            count = await loop.sock_recv_into(sock, buffer)
            if not count:
                return SlowResult(0, 0, "closed before the headers")
            head += bytes(buffer[:count])
        header, _, body = head.partition(b"\r\n\r\n")
        status = int(header.split(b" ", 2)[1])
        answered(status)
        length = _content_length(header)
        received, began = len(body), loop.time()
        while received < length:
            count = await loop.sock_recv_into(sock, buffer[: min(SLOW_PIECE, length - received)])
            if not count:
                return SlowResult(status, received, "closed early")
            received += count
            ahead = began + received / rate - loop.time()
            if ahead > 0:
                await asyncio.sleep(ahead)
        return SlowResult(status, received, None)
    except OSError as failed:
        return SlowResult(status, 0, repr(failed))
    finally:
        if not status:
            answered(0)  # every download answers once, if only with its failure
        sock.close()


def _content_length(header: bytes) -> int:
    for line in header.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


async def _slow_all(
    port: int, path: str, cookie: str, count: int, rate: float, report: Any
) -> list[SlowResult]:
    statuses: list[int] = []
    everyone = asyncio.Event()

    def answered(status: int) -> None:
        statuses.append(status)
        if len(statuses) == count:
            everyone.set()

    tasks = [
        asyncio.create_task(_slow_download(port, path, cookie, rate, answered))
        for _ in range(count)
    ]
    await everyone.wait()
    report.put(("answered", list(statuses)))
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    report.put(("first_done", None))
    return list(await asyncio.gather(*tasks))


def slow_clients(port: int, path: str, cookie: str, count: int, rate: float, report: Any) -> None:
    """Entry of the slow-clients process: reports "answered", "first_done", then "done"."""
    results = asyncio.run(_slow_all(port, path, cookie, count, rate, report))
    report.put(("done", [(r.status, r.size, r.error) for r in results]))


# --- fast clients (a process each) ------------------------------------------------------------


def fast_download(port: int, path: str, cookie: str, start_at: float) -> tuple[float, float, int]:
    """GET ``path`` at full speed from ``start_at`` (monotonic, shared by all the clients);
    return (began, ended, bytes)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    buffer = memoryview(bytearray(MIB))
    headers = {"Cookie": cookie} if cookie else {}
    time.sleep(max(0.0, start_at - time.monotonic()))
    began, size = time.monotonic(), 0
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    if response.status != 200:
        return began, time.monotonic(), -response.status
    while count := response.readinto(buffer):
        size += count
    ended = time.monotonic()
    connection.close()
    return began, ended, size


@dataclass
class Round:
    mb_s: float
    cpu_s_per_gb: float
    rss_growth_mib: float


def server_cpu(server: Server) -> float:
    """User + system seconds of the server's master and its workers so far."""
    processes = [psutil.Process(server.process.pid), *server.workers()]
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def bulk_round(server: Server, path: str, cookie: str, clients: int, expected: int) -> Round:
    """``clients`` downloads at once; aggregate MB/s, CPU-seconds per GB, worker RSS growth."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(clients) as pool:
        pool.map(time.sleep, [0] * clients)  # the clients are up before the clock starts
        cpu_before = server_cpu(server)
        with RssSampler(server.workers()) as sampler:
            start_at = time.monotonic() + 0.5
            results = pool.starmap(fast_download, [(server.port, path, cookie, start_at)] * clients)
        cpu = server_cpu(server) - cpu_before
    if any(size != expected for _, _, size in results):
        raise BenchError(f"{server.name}: a bulk download came up short: {results}")
    seconds = max(e for _, e, _ in results) - min(b for b, _, _ in results)
    total = clients * expected
    return Round(total / seconds / 1e6, cpu / (total / 1e9), sampler.growth_mib())


# --- servers ------------------------------------------------------------------------------------


NGINX_CONF = """\
{user}worker_processes 2;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    types {{ application/pdf pdf; }}
    default_type application/octet-stream;
    client_body_temp_path {prefix}/client_body_temp;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


def start_nginx(tmp: Path, root: Path) -> Server:
    """Debian's nginx serving ``root`` on a free port, from a temporary prefix."""
    prefix, port = tmp / "nginx", free_port()
    prefix.mkdir()
    # As root, nginx's workers would switch to "nobody", who cannot enter this private folder.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, prefix=prefix, port=port, root=root))
    argv = [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    checked = subprocess.run([*argv, "-t"], capture_output=True, text=True, check=False)
    if checked.returncode != 0:
        raise BenchError(f"nginx -t failed: {checked.stderr.strip()}")
    server = start("nginx", [*argv, "-g", "daemon off;"], os.environ.copy(), port, tmp / "nx.log")
    server.wait_ready("/healthz", 2)
    return server


def start_portal(tmp: Path, env: dict[str, str], port: int, workers: int, clients: int) -> Server:
    slots = math.ceil(SLOTS_HEADROOM * clients / workers)
    argv = [sys.executable, "-m", "portal", "serve", "--port", str(port)]
    sizing = ["--workers", str(workers), "--threads", str(slots + RESERVED_THREADS)]
    portal = start("portal", [*argv, *sizing], env, port, tmp / "portal.log")
    portal.wait_ready("/healthz", workers)
    print(
        f"portal: {workers} gunicorn gthread worker(s) x {slots + RESERVED_THREADS} threads, "
        f"{slots} download slots each (--threads {slots + RESERVED_THREADS}, default reserve "
        f"of {RESERVED_THREADS})"
    )
    return portal


# --- timing -------------------------------------------------------------------------------------


def time_probes(port: int, cookie: str, samples: int, stop: Callable[[], bool]) -> dict[str, Any]:
    """Time PROBES one request at a time until ``samples`` each or ``stop()``; milliseconds."""
    connections = {p: http.client.HTTPConnection("127.0.0.1", port, timeout=300) for p in PROBES}
    timings: dict[str, list[float]] = {p: [] for p in PROBES}
    headers = {p: {"Cookie": cookie} if signed else {} for p, signed in PROBES.items()}
    for path, connection in connections.items():  # warm-up, not counted
        connection.request("GET", path, headers=headers[path])
        connection.getresponse().read()
    for _ in range(samples):
        for path, connection in connections.items():
            began = time.perf_counter()
            connection.request("GET", path, headers=headers[path])
            response = connection.getresponse()
            response.read()
            timings[path].append((time.perf_counter() - began) * 1000)
            if response.status != 200:
                raise BenchError(f"GET {path} answered {response.status}")
        if stop():
            break
        time.sleep(PROBE_GAP_SECONDS)
    for connection in connections.values():
        connection.close()
    return timings


def slow_phase(
    portal: Server, data_path: str, cookies: tuple[str, str], args: argparse.Namespace
) -> None:
    download_cookie, inbox_cookie = cookies
    # Idle before and after the downloads, pooled: the machine's other load drifts meanwhile.
    half = max(1, args.samples // 2)
    idle = time_probes(portal.port, inbox_cookie, half, lambda: False)
    context = multiprocessing.get_context("spawn")
    report = context.Queue()
    rate = args.rate_mb * 1e6
    clients = context.Process(
        target=slow_clients,
        args=(portal.port, data_path, download_cookie, args.slow_clients, rate, report),
    )
    began = time.monotonic()
    with RssSampler(portal.workers()) as sampler:
        clients.start()
        kind, statuses = report.get(timeout=300)
        if kind != "answered":
            raise BenchError(f"slow clients: {kind} before every download answered")
        first_done: list[bool] = []

        def stop() -> bool:
            if not first_done and not report.empty():
                first_done.append(True)
            return bool(first_done)

        loaded = time_probes(portal.port, inbox_cookie, args.samples, stop)
        while True:
            kind, results = report.get(timeout=args.mib * MIB / rate * 3 + 300)
            if kind == "done":
                break
    clients.join(60)
    seconds = time.monotonic() - began
    after = time_probes(portal.port, inbox_cookie, half, lambda: False)
    idle = {path: idle[path] + after[path] for path in PROBES}
    report_slow(args, statuses, results, idle, loaded, sampler.growth_mib(), seconds)


def report_slow(
    args: argparse.Namespace,
    statuses: list[int],
    results: list[tuple[int, int, str | None]],
    idle: dict[str, list[float]],
    loaded: dict[str, list[float]],
    rss_mib: float,
    seconds: float,
) -> None:
    expected = args.mib * MIB
    complete = sum(1 for status, size, error in results if status == 200 and size == expected)
    refused = sum(1 for status in statuses if status == 503)
    aborted = len(results) - complete - refused
    print(
        f"slow clients: {args.slow_clients} downloads of {args.mib} MiB at {args.rate_mb:g} MB/s "
        f"each ({seconds:.0f} s): {complete} complete, {refused} refused (503), "
        f"{aborted} aborted (target: all complete, none aborted: "
        f"{'met' if complete == len(results) else 'MISSED'})"
    )
    failures = sorted({error for status, _, error in results if error and status != 503})
    if failures:
        print(f"  aborted downloads' errors: {failures[:3]}")
    for path in PROBES:
        quiet, busy = idle[path], loaded[path]
        ratio = percentile(busy, 0.99) / percentile(quiet, 0.99)
        print(
            f"  GET {path:8} idle p50 {percentile(quiet, 0.5):7.1f} ms  p99 "
            f"{percentile(quiet, 0.99):7.1f} ms | under the downloads p50 "
            f"{percentile(busy, 0.5):7.1f} ms  p99 {percentile(busy, 0.99):7.1f} ms "
            f"({len(busy)} samples) | p99 ratio {ratio:.2f} (target <= {P99_TARGET:g}: "
            f"{'met' if ratio <= P99_TARGET else 'MISSED'})"
        )
    print(
        f"  portal workers' RSS growth over the slow downloads: {rss_mib:.1f} MiB "
        f"(~{rss_mib / max(1, complete) * 1024:.0f} KiB per download)"
    )


def bulk_phase(
    portal: Server, nginx: Server, portal_path: str, cookie: str, args: argparse.Namespace
) -> None:
    expected = args.mib * MIB
    ours: list[Round] = []
    theirs: list[Round] = []
    for _ in range(args.repeat):
        ours.append(bulk_round(portal, portal_path, cookie, args.fast_clients, expected))
        theirs.append(bulk_round(nginx, "/record.pdf", "", args.fast_clients, expected))
    best_ours = max(ours, key=lambda r: r.mb_s)
    best_theirs = max(theirs, key=lambda r: r.mb_s)
    ratio = best_ours.mb_s / best_theirs.mb_s
    rss = max(r.rss_growth_mib for r in ours)
    print(
        f"bulk: {args.fast_clients} concurrent downloads of {args.mib} MiB, best of "
        f"{args.repeat} (MB/s = 10^6 B/s, aggregate)"
    )
    print(
        f"  portal (decrypt + stream): {best_ours.mb_s:8.1f} MB/s  "
        f"{min(r.cpu_s_per_gb for r in ours):6.2f} CPU-s/GB"
    )
    print(
        f"  nginx (plaintext, sendfile): {best_theirs.mb_s:6.1f} MB/s  "
        f"{min(r.cpu_s_per_gb for r in theirs):6.2f} CPU-s/GB"
    )
    print(
        f"  portal / nginx: {ratio:.2f} (target >= {BULK_TARGET:.2f}: "
        f"{'met' if ratio >= BULK_TARGET else 'MISSED'}); portal workers' peak RSS growth "
        f"{rss:.1f} MiB (per round: {', '.join(f'{r.rss_growth_mib:.1f}' for r in ours)}; "
        f"target < {RSS_TARGET_MIB} MiB: {'met' if rss < RSS_TARGET_MIB else 'MISSED'})"
    )


# --- the run ------------------------------------------------------------------------------------


def uptime() -> str:
    done = subprocess.run(["uptime"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def measure(tmp: Path, servers: list[Server], args: argparse.Namespace) -> None:
    port = free_port()
    redis_url = os.environ.get("PORTAL_BENCH_REDIS_URL", DEFAULT_REDIS_URL)
    no_redis = redis_problem(redis_url)
    workers = 1 if no_redis else 2
    shared = {} if no_redis else {"PORTAL_REDIS_URL": redis_url}
    if no_redis:
        print(f"no Redis ({no_redis}): one portal worker, rate limits in its memory")
    base_url = f"http://127.0.0.1:{port}"
    env = clean_env(PORTAL_INSTANCE_DIR=str(tmp / "instance"), PORTAL_BASE_URL=base_url, **shared)
    upgrade = subprocess.run(
        [sys.executable, "-m", "portal", "db", "upgrade"],
        env=env,
        cwd=str(ROOT),
        capture_output=True,
    )
    if upgrade.returncode != 0:
        raise BenchError(f"portal db upgrade failed: {upgrade.stderr.decode()[-2000:]}")
    root = tmp / "static"
    root.mkdir()
    (root / "healthz").write_text("ok")
    write_record(root / "record.pdf", args.mib)
    os.environ.update({k: v for k, v in env.items() if k.startswith("PORTAL_")})
    data = make_data(root / "record.pdf", args.mib)
    # Every bulk download must stream even if the kernel hands them all to one worker.
    clients = max(args.slow_clients, args.fast_clients * workers)
    portal = start_portal(tmp, env, port, workers, clients)
    servers.append(portal)
    nginx = start_nginx(tmp, root)
    servers.append(nginx)
    downloader, reader = Session(base_url), Session(base_url)
    downloader.sign_in(data.downloader)
    reader.sign_in(data.readers[0])
    path = f"/messages/{data.message_id}/attachments/{data.attachment_id}/download"
    cookies = (downloader.cookie_header(), reader.cookie_header())
    slow_phase(portal, path, cookies, args)
    bulk_phase(portal, nginx, path, cookies[0], args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=200, help="record size in MiB")
    parser.add_argument("--slow-clients", type=int, default=64)
    parser.add_argument("--rate-mb", type=float, default=2.0, help="MB/s of each slow client")
    parser.add_argument("--fast-clients", type=int, default=8)
    parser.add_argument("--samples", type=int, default=300, help="timed requests of each kind")
    parser.add_argument("--repeat", type=int, default=2, help="bulk rounds of each server")
    args = parser.parse_args()
    print(f"uptime before: {uptime()}")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp_name:
            servers: list[Server] = []
            try:
                measure(Path(tmp_name), servers, args)
            finally:
                for server in servers:
                    server.stop()
    except BenchError as failed:
        print(f"bench_serve: error: {failed}", file=sys.stderr)
        return 1
    print(f"uptime after: {uptime()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
