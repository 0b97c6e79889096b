"""Serving-test helpers: a signed-in patient over plain HTTP, and slow readers (a small
receive buffer, reads paced to a rate) that hold a real server's download slots."""

from __future__ import annotations

import hashlib
import http.client
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

from portal.security import otp
from tests.support.deploy import PASSWORD, PROXY_ADDRESS, Pickup

MIB = 1024 * 1024
SERVE_THREADS = 4  # the serving tests' `portal serve --workers 1 --threads 4 --download-slots 2`
SERVE_SLOTS = 2
SLOW_RCVBUF = 16 * 1024  # bytes; the kernel doubles it: far less than a download
PIECE = 16 * 1024
_CSRF = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')


class SmallBufferConnection(http.client.HTTPConnection):
    """HTTPConnection whose socket gets a small receive buffer before it connects, so the
    server's sends block as soon as this client stops reading (a slow phone)."""

    def __init__(self, host: str, port: int, *, rcvbuf: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.rcvbuf = rcvbuf

    def connect(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.settimeout(self.timeout)
        sock.connect((self.host, self.port))
        self.sock = sock


class HttpPatient:
    """A browser-like client of a real server: cookies, CSRF tokens, one connection per call."""

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.port = port
        self.timeout = timeout
        self.cookies: dict[str, str] = {}

    def cookie_header(self) -> str:
        return "; ".join(f"{name}={value}" for name, value in self.cookies.items())

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request on a new connection; return status, headers and the whole body."""
        connection = http.client.HTTPConnection(PROXY_ADDRESS, self.port, timeout=self.timeout)
        sent = {**({"Cookie": self.cookie_header()} if self.cookies else {}), **(headers or {})}
        try:
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        for header in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = header.partition("=")
            self.cookies[name] = rest.split(";", 1)[0]
        return response.status, dict(response.headers.items()), data

    def submit(self, path: str, fields: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        """GET the form for its CSRF token, then POST ``fields`` with it."""
        _, _, page = self.request("GET", path)
        found = _CSRF.search(page.decode())
        assert found, f"no form on {path}"
        body = urllib.parse.urlencode({"csrf_token": found.group(1), **fields}).encode()
        return self.request(
            "POST", path, body, {"Content-Type": "application/x-www-form-urlencoded"}
        )

    def sign_in(self, pickup: Pickup) -> None:
        """Password, then the current TOTP code; both must be accepted."""
        status, headers, _ = self.submit("/signin", {"email": pickup.email, "password": PASSWORD})
        assert (status, headers.get("Location")) == (302, "/signin/code"), status
        code = otp.code_at(pickup.secret, int(time.time() // otp.STEP_SECONDS))
        status, headers, _ = self.submit("/signin/code", {"code": code})
        assert status == 302, status
        assert "/signin" not in headers["Location"]


@dataclass
class SlowReader:
    """A download read at ``slow_rate`` bytes/s until ``fast`` is set, then at ``fast_rate``,
    in a thread of its own, through a small receive buffer.

    ``answered`` is set once the status and headers arrived (a 200 means the server's worker
    holds a download slot for this reader until it has sent the whole body).
    """

    port: int
    path: str
    cookie: str
    fast: threading.Event
    slow_rate: float = 64 * 1024
    fast_rate: float = 16 * MIB
    answered: threading.Event = field(default_factory=threading.Event)
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    size: int = 0
    sha256: str = ""
    error: str | None = None

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._leave = threading.Event()

    def start(self) -> SlowReader:
        self._thread.start()
        return self

    def hang_up(self, timeout: float = 60.0) -> None:
        """Close the connection mid-download, as a client going away does; wait for it."""
        self._leave.set()
        self.join(timeout)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"still reading after {timeout} s"

    def _run(self) -> None:
        connection = SmallBufferConnection(
            PROXY_ADDRESS, self.port, rcvbuf=SLOW_RCVBUF, timeout=120
        )
        try:
            connection.request("GET", self.path, headers={"Cookie": self.cookie})
            response = connection.getresponse()
            self.status, self.headers = response.status, dict(response.headers.items())
            self.answered.set()
            self._read_paced(response)
        except (OSError, http.client.HTTPException) as failed:
            self.error = repr(failed)
        finally:
            self.answered.set()
            connection.close()

    def _read_paced(self, response: http.client.HTTPResponse) -> None:
        digest = hashlib.sha256()
        began, budget_at = time.monotonic(), 0.0  # budget_at: seconds of reading allowed so far
        while not self._leave.is_set() and (piece := response.read(PIECE)):
            digest.update(piece)
            self.size += len(piece)
            rate = self.fast_rate if self.fast.is_set() else self.slow_rate
            budget_at += len(piece) / rate
            self._pause(began + budget_at)
        self.sha256 = digest.hexdigest()

    def _pause(self, until: float) -> None:
        """Wait until ``until`` (monotonic), the pace of the link; hanging up ends the wait,
        and ``fast`` ends a slow one."""
        while (left := until - time.monotonic()) > 0 and not self._leave.is_set():
            if self.fast.is_set():
                time.sleep(min(left, 0.1))
            elif self.fast.wait(min(left, 0.1)):
                return
