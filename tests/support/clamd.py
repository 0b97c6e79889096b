"""A private clamd for the tests, and fake scanners that never answer.

:class:`Clamd` runs Debian's ``/usr/sbin/clamd`` (package clamav-daemon) from a
temporary folder of its own: its own configuration, Unix socket, TCP port on
127.0.0.1, temporary directory and a signature database of one line, the EICAR
test signature as a ``.ndb`` body signature. No signatures are downloaded and
freshclam never runs; the Debian service (/etc/clamav, /run/clamav) is not used
or started. The limits match the portal's default PORTAL_MAX_UPLOAD, with
AlertExceedsMax on, as README.md's Malware scanning section asks of production.

:class:`SilentScanner` is a real Unix socket server that accepts connections
and never answers (reading everything, or reading nothing): a clamd that hangs.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from portal.config import SETTINGS
from portal.security.scan import ClamdAddress, Scanner, Timeouts

CLAMD = "/usr/sbin/clamd"
START_SECONDS = 60.0  # clamd loads its database in well under a second with one signature
STOP_SECONDS = 20.0
# The EICAR test file (eicar.org): 68 ASCII bytes every scanner reports, harmless.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
SIGNATURE = "Eicar-Test-Signature"
MAX_UPLOAD = next(s.default for s in SETTINGS if s.key == "MAX_UPLOAD")
_PR_SET_PDEATHSIG = 1
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes


def _die_with_parent() -> None:
    # In the child before exec: clamd gets SIGTERM when the test process dies, so a killed
    # pytest worker leaves no clamd behind.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Clamd:
    """clamd on a socket in ``folder`` (and on 127.0.0.1:``tcp_port``) until :meth:`stop`."""

    def __init__(self, folder: Path, stream_max_length: int = MAX_UPLOAD) -> None:
        self.folder = folder
        self.stream_max_length = stream_max_length
        socket_dir = folder
        if len(str(folder / "clamd.sock")) > _MAX_SOCKET_PATH:
            socket_dir = Path(tempfile.mkdtemp(prefix="clamd-"))
        self.socket_path = socket_dir / "clamd.sock"
        self.tcp_port = free_port()
        self.log = folder / "clamd.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> ClamdAddress:
        """The Unix socket address."""
        return ClamdAddress(path=str(self.socket_path))

    @property
    def tcp_address(self) -> str:
        """``127.0.0.1:port``, as PORTAL_CLAMD_SOCKET spells a TCP address."""
        return f"127.0.0.1:{self.tcp_port}"

    def scanner(self, timeouts: Timeouts | None = None, max_bytes: int | None = None) -> Scanner:
        """A portal Scanner of this clamd's Unix socket."""
        return Scanner(self.address, timeouts=timeouts, max_bytes=max_bytes)

    def start(self) -> None:
        """Write the database and configuration, start clamd and wait until it answers PING."""
        database = self.folder / "db"
        database.mkdir()
        (database / "eicar.ndb").write_text(f"{SIGNATURE}:0:*:{EICAR.hex()}\n")
        (self.folder / "tmp").mkdir()
        config = self.folder / "clamd.conf"
        config.write_text(self._config(database))
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [CLAMD, f"--config-file={config}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        self._wait_until_ready()

    def stop(self) -> None:
        """SIGTERM clamd (SIGKILL after STOP_SECONDS) and reap it."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_SECONDS)

    def _config(self, database: Path) -> str:
        size = self.stream_max_length
        return "\n".join(
            [
                f"LocalSocket {self.socket_path}",
                "LocalSocketMode 600",
                "FixStaleSocket yes",
                "TCPAddr 127.0.0.1",
                f"TCPSocket {self.tcp_port}",
                f"DatabaseDirectory {database}",
                f"TemporaryDirectory {self.folder / 'tmp'}",
                f"PidFile {self.folder / 'clamd.pid'}",
                f"LogFile {self.log}",
                "LogTime yes",
                "Foreground yes",
                "SelfCheck 3600",
                # Every byte the portal accepts is scanned, and a file too big or too deep
                # to scan whole is reported, never passed as OK.
                f"StreamMaxLength {size}",
                f"MaxFileSize {size}",
                f"MaxScanSize {size}",
                "AlertExceedsMax yes",
                "MaxThreads 4",
                "ReadTimeout 30",
                "CommandReadTimeout 5",
                "",
            ]
        )

    def _wait_until_ready(self) -> None:
        probe = Scanner(self.address, timeouts=Timeouts(connect=1.0))
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"clamd exited {self.process.returncode}:\n{self._log_tail()}")
            if probe.ping():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"clamd did not answer within {START_SECONDS} s:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


class SilentScanner:
    """A Unix socket server that accepts and never answers; ``reads``: whether it drains
    what it is sent (a clamd stuck scanning) or reads nothing (a clamd that stopped reading).
    """

    def __init__(self, folder: Path, *, reads: bool) -> None:
        self.path = folder / "silent.sock"
        self.reads = reads
        self.connections = 0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        self._listener.listen(8)
        self._listener.settimeout(
            0.05
        )  # accept() wakes to see stop(); unix sockets ignore shutdown
        self._stopped = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def address(self) -> ClamdAddress:
        """Its address, as a portal Scanner takes it."""
        return ClamdAddress(path=str(self.path))

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self._lock:
                self._conns.append(conn)
                self.connections += 1
            if self.reads:
                drain = threading.Thread(target=self._drain, args=(conn,), daemon=True)
                self._threads.append(drain)
                drain.start()

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    def stop(self) -> None:
        """Stop accepting, close every connection and wait for the threads."""
        self._stopped.set()
        self._threads[0].join(timeout=10)
        self._listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for thread in self._threads:
            thread.join(timeout=10)
