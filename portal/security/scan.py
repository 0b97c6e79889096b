"""Malware scanning by ClamAV's daemon (clamd), fed each upload as it streams.

clamd's INSTREAM command (clamd(8)): the client sends ``zINSTREAM\\0``, then the
file as chunks, each prefixed with its length as a 4-byte unsigned big-endian
integer, then a zero-length chunk; clamd answers one NUL-terminated line,
``stream: OK``, ``stream: <signature> FOUND`` or ``<problem> ERROR``. A stream
longer than clamd's ``StreamMaxLength`` is answered ``INSTREAM size limit
exceeded. ERROR`` and the connection closed, possibly before the last chunk.

The plaintext goes straight from the request to the socket: nothing is written to
disk on the portal's side (clamd itself spools the stream into its
``TemporaryDirectory`` while it scans; README.md, Malware scanning).

Fail closed (OWASP ASVS 12.4.2, File Upload Cheat Sheet): anything but
``stream: OK`` refuses the file. A scanner that is down, slow past a timeout,
answers an error, or cannot scan the whole file (its size or recursion limits)
refuses it too: an unscanned file is never accepted.

Hand-written rather than a library: the PyPI clients (``clamd``, last released
in 2014, and its forks ``clamav-client`` and ``clamdpy``) take a file object and
read it themselves, while the upload path pushes chunks as they arrive; the
protocol is these few lines, with a timeout on every step.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import NoReturn

from portal.security.inspection import UploadRejected

CONNECT_TIMEOUT = 5.0  # seconds to reach clamd
SEND_TIMEOUT = 30.0  # seconds for clamd to take one chunk
# Seconds from the last chunk to the verdict: clamd scans the whole stream only then, and
# stops itself after MaxScanTime (Debian's default: 120 s).
VERDICT_TIMEOUT = 150.0
HANGUP_GRACE = 1.0  # seconds to read clamd's last words after it closed the connection
CHUNK_SIZE = 64 * 1024  # bytes per INSTREAM chunk (a fed chunk larger than this is split)
MAX_REPLY = 4096  # bytes: a longer answer is not clamd's
MAX_SIGNATURE = 120  # characters of a signature name kept (ClamAV's are far shorter)
_LENGTH = struct.Struct("!L")
_END = _LENGTH.pack(0)
_ADDRESS = re.compile(
    r"\[(?P<ip6>[0-9A-Fa-f:.]+)\]:(?P<port6>\d{1,5})|(?P<host>[\w.-]+):(?P<port>\d{1,5})"
)
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._:+-]")
# clamd reports a file it could not scan whole (AlertExceedsMax) as a detection with this prefix.
_LIMITS_EXCEEDED = "Heuristics.Limits.Exceeded"

log = logging.getLogger(__name__)


class Verdict(StrEnum):
    """What a scan concluded; only CLEAN (and NOT_SCANNED, when scanning is off) accept."""

    CLEAN = "clean"
    INFECTED = "infected"
    UNSCANNABLE = "unscannable"  # too large or too deep for the scanner's limits
    UNAVAILABLE = "unavailable"  # down, timed out, or answered an error: try again later
    NOT_SCANNED = "not-scanned"  # PORTAL_SCAN_UPLOADS=off


@dataclass(frozen=True)
class ScanResult:
    """One file's verdict, PHI-free: fit for the audit trail and logs.

    ``signature`` is clamd's name for what it found (INFECTED, or the limit an
    UNSCANNABLE file exceeded); ``reason`` a short code saying why a scan did not
    complete (``connect``, ``timeout``, ``connection-lost``, ``error-reply``,
    ``bad-reply``, ``size-limit``, ``scanner-limits``); ``size`` the bytes fed.
    """

    verdict: Verdict
    size: int
    signature: str | None = None
    reason: str | None = None

    @property
    def accepted(self) -> bool:
        """Whether the file may be stored."""
        return self.verdict in {Verdict.CLEAN, Verdict.NOT_SCANNED}


_REFUSALS = {
    Verdict.INFECTED: "This file contains a virus or other malware, so it was not accepted.",
    Verdict.UNSCANNABLE: (
        "This file could not be checked for viruses (it is too large or too deeply "
        "nested for the scanner), so it was not accepted."
    ),
    Verdict.UNAVAILABLE: ("The virus scanner is not available; please try again later."),
}


class ScanRefused(UploadRejected):
    """The scan did not find the file clean; ``result`` says why (audit it)."""

    def __init__(self, result: ScanResult) -> None:
        super().__init__(_REFUSALS[result.verdict], result.reason or result.verdict.value)
        self.result = result


@dataclass(frozen=True)
class ClamdAddress:
    """Where clamd listens: a Unix socket ``path``, or ``host`` and ``port`` (TCP)."""

    path: str | None = None
    host: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, raw: str) -> ClamdAddress:
        """Return the address in ``raw``: an absolute socket path, ``host:port`` or ``[ip6]:port``.

        Raises ValueError (with a message fit for a configuration error) otherwise.
        """
        value = raw.strip()
        if value.startswith("/"):
            return cls(path=value)
        match = _ADDRESS.fullmatch(value)
        port = int(match.group("port6") or match.group("port")) if match else 0
        if match is None or not 1 <= port <= 65535:
            raise ValueError(
                "expected clamd's socket path (/run/clamav/clamd.ctl) or host:port (127.0.0.1:3310)"
            )
        return cls(host=match.group("ip6") or match.group("host"), port=port)

    def connect(self, timeout: float) -> socket.socket:
        """Return a socket connected to clamd; OSError (TimeoutError included) when it cannot."""
        if self.path is None:
            return socket.create_connection((str(self.host), int(self.port or 0)), timeout=timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        return sock

    def __str__(self) -> str:
        return self.path if self.path is not None else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Timeouts:
    """Seconds allowed for each step of a scan (the defaults suit production)."""

    connect: float = CONNECT_TIMEOUT
    send: float = SEND_TIMEOUT
    verdict: float = VERDICT_TIMEOUT


class Scanner:
    """A clamd at ``address``; :meth:`open` starts the scan of one file.

    ``max_bytes`` (the portal's largest upload) refuses a longer stream as
    UNSCANNABLE before clamd's own limit does. Thread-safe: each scan has its
    own connection.
    """

    def __init__(
        self,
        address: ClamdAddress,
        *,
        timeouts: Timeouts | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.address = address
        self.timeouts = timeouts or Timeouts()
        self.max_bytes = max_bytes

    def open(self) -> ScanStream:
        """Connect and start an INSTREAM scan; return the :class:`ScanStream` to feed.

        Raises ScanRefused (UNAVAILABLE, reason ``connect`` or ``timeout``) when
        clamd cannot be reached, before any of the file is read.
        """
        try:
            sock = self.address.connect(self.timeouts.connect)
        except TimeoutError:
            raise _refusal(Verdict.UNAVAILABLE, 0, reason="timeout") from None
        except OSError:
            raise _refusal(Verdict.UNAVAILABLE, 0, reason="connect") from None
        stream = ScanStream(sock, self.timeouts, self.max_bytes)
        stream.start()
        return stream

    def scan(self, chunks: Iterable[bytes]) -> ScanResult:
        """Scan the file made of ``chunks`` and return its result (never raises ScanRefused)."""
        try:
            with self.open() as stream:
                for chunk in chunks:
                    stream.feed(chunk)
                return stream.finish()
        except ScanRefused as refused:
            return refused.result

    def ping(self) -> bool:
        """Whether clamd answers PING with PONG within the connect timeout."""
        try:
            with self.address.connect(self.timeouts.connect) as sock:
                sock.sendall(b"zPING\0")
                return _read_reply(sock, time.monotonic() + self.timeouts.connect) == b"PONG"
        except OSError:
            return False


class ScanStream:
    """One file's INSTREAM scan, an upload inspector: ``feed`` chunks, then ``finish``.

    Every refusal raises ScanRefused and closes the connection; the stream then
    stays refused (a later ``feed`` or ``finish`` raises the same refusal).
    """

    def __init__(self, sock: socket.socket, timeouts: Timeouts, max_bytes: int | None) -> None:
        self._sock: socket.socket | None = sock
        self._timeouts = timeouts
        self._max_bytes = max_bytes
        self._size = 0
        self._refused: ScanRefused | None = None

    @property
    def size(self) -> int:
        """Bytes fed so far."""
        return self._size

    def start(self) -> None:
        """Send the INSTREAM command (:meth:`Scanner.open` does); raises ScanRefused."""
        self._send(b"zINSTREAM\0")

    def feed(self, chunk: bytes | memoryview) -> None:
        """Send ``chunk`` to clamd. Raises ScanRefused when clamd does not take it
        (down, too slow, hung up) or the stream grew past ``max_bytes``."""
        self._check_open()
        self._size += len(chunk)
        if self._max_bytes is not None and self._size > self._max_bytes:
            self._refuse(ScanResult(Verdict.UNSCANNABLE, self._size, reason="size-limit"))
        view = memoryview(chunk)
        for start in range(0, len(view), CHUNK_SIZE):
            piece = view[start : start + CHUNK_SIZE]
            self._send(_LENGTH.pack(len(piece)) + piece)

    def finish(self) -> ScanResult:
        """End the stream and return the CLEAN result.

        Raises ScanRefused for every other verdict: INFECTED (with the signature),
        UNSCANNABLE, or UNAVAILABLE (no verdict within the timeout, an error answer).
        """
        self._check_open()
        self._send(_END)
        sock = self._sock
        assert sock is not None  # _check_open and _send leave it open or raise
        try:
            reply = _read_reply(sock, time.monotonic() + self._timeouts.verdict)
        except TimeoutError:
            self._refuse(ScanResult(Verdict.UNAVAILABLE, self._size, reason="timeout"))
        except OSError:
            self._refuse(ScanResult(Verdict.UNAVAILABLE, self._size, reason="connection-lost"))
        result = parse_reply(reply, self._size)
        self.close()
        if not result.accepted:
            self._refuse(result)
        return result

    def close(self) -> None:
        """Drop the connection (clamd abandons the scan); never raises."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ScanStream:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._refused is not None:
            raise self._refused
        if self._sock is None:
            raise RuntimeError("this scan is finished or closed")

    def _send(self, data: bytes) -> None:
        sock = self._sock
        assert sock is not None
        try:
            sock.settimeout(self._timeouts.send)
            sock.sendall(data)
        except TimeoutError:
            self._refuse(ScanResult(Verdict.UNAVAILABLE, self._size, reason="timeout"))
        except OSError:
            # clamd hangs up when the stream passes its StreamMaxLength, after saying so.
            self._refuse(self._last_words(sock))

    def _last_words(self, sock: socket.socket) -> ScanResult:
        try:
            reply = _read_reply(sock, time.monotonic() + HANGUP_GRACE)
        except OSError:
            reply = b""
        result = parse_reply(reply, self._size) if reply else None
        if result is None or result.accepted:
            return ScanResult(Verdict.UNAVAILABLE, self._size, reason="connection-lost")
        return result

    def _refuse(self, result: ScanResult) -> NoReturn:
        self.close()
        self._refused = _refusal(result.verdict, result.size, result.signature, result.reason)
        raise self._refused


class NotScanning:
    """The inspector when scanning is off (``PORTAL_SCAN_UPLOADS=off``): counts bytes, accepts."""

    def __init__(self) -> None:
        self._size = 0

    def feed(self, chunk: bytes | memoryview) -> None:
        """Count ``chunk``; never refuses."""
        self._size += len(chunk)

    def finish(self) -> ScanResult:
        """Return the NOT_SCANNED result."""
        return ScanResult(Verdict.NOT_SCANNED, self._size)

    def close(self) -> None:
        """Nothing to release."""


def parse_reply(reply: bytes, size: int) -> ScanResult:
    """Return the result clamd's INSTREAM answer ``reply`` (without its NUL) means."""
    line = reply.decode("ascii", "replace").strip()
    if line == "stream: OK":
        return ScanResult(Verdict.CLEAN, size)
    if line.startswith("stream: ") and line.endswith(" FOUND"):
        name = _UNSAFE_NAME.sub("_", line.removeprefix("stream: ").removesuffix(" FOUND"))
        name = name.strip()[:MAX_SIGNATURE] or "unnamed"
        if name.startswith(_LIMITS_EXCEEDED):
            return ScanResult(Verdict.UNSCANNABLE, size, name, "scanner-limits")
        return ScanResult(Verdict.INFECTED, size, name)
    if line == "INSTREAM size limit exceeded. ERROR":
        return ScanResult(Verdict.UNSCANNABLE, size, reason="size-limit")
    reason = "error-reply" if line.endswith(" ERROR") else "bad-reply"
    return ScanResult(Verdict.UNAVAILABLE, size, reason=reason)


def _read_reply(sock: socket.socket, deadline: float) -> bytes:
    """Return clamd's answer up to its NUL (or up to a hang-up); TimeoutError past ``deadline``."""
    received = bytearray()
    while b"\0" not in received and len(received) < MAX_REPLY:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        data = sock.recv(1024)
        if not data:
            break
        received += data
    return bytes(received.split(b"\0", 1)[0])


def _refusal(
    verdict: Verdict, size: int, signature: str | None = None, reason: str | None = None
) -> ScanRefused:
    """Return the refusal of a scan, logged (ids and codes only) for the operator."""
    log.warning(
        "upload refused by the malware scan",
        extra={"verdict": verdict.value, "reason": reason, "size": size},
    )
    return ScanRefused(ScanResult(verdict, size, signature, reason))
