"""Upload-test helpers: a large PDF carrying a canary, a multipart body streamed piece by
piece, a raw HTTP client that can stop or hang up mid-body, a served portal that reports how
much of each body it has read, and searches for plaintext in open files and folders.

The benchmark (bench/bench_upload.py) uses the PDF, the body and the searches too.
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
SEARCH_CHUNK = 4 * MIB


def new_canary() -> bytes:
    """A marker no file holds by chance: 'canary-' and 24 random hex digits."""
    return b"canary-" + secrets.token_hex(12).encode()


@dataclass(frozen=True)
class CanaryPdf:
    """A valid one-page PDF of about ``size`` bytes whose content stream repeats ``canary``
    on every line, so any slice of a few hundred bytes of it holds the canary.

    Made piece by piece (``pieces``), never whole: the benchmark's is 100 MiB.
    """

    size: int
    canary: bytes

    @property
    def _line(self) -> bytes:
        return b"% " + self.canary + b" filler of the upload tests and benchmark\n"

    @property
    def _lines(self) -> int:
        return max(1, (self.size - 1024) // len(self._line))  # the rest fits in 1 KiB

    def _objects(self) -> list[bytes]:
        return [
            b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
            b"1 0 obj\n<</Type/Catalog/Pages 2 0 R>>\nendobj\n",
            b"2 0 obj\n<</Type/Pages/Kids[3 0 R]/Count 1>>\nendobj\n",
            b"3 0 obj\n<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]/Contents 4 0 R>>\nendobj\n",
            b"4 0 obj\n<</Length %d>>\nstream\n" % (self._lines * len(self._line)),
        ]

    def _tail(self, content_end: int, offsets: list[int]) -> bytes:
        end = b"\nendstream\nendobj\n"
        xref = content_end + len(end)
        table = b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
        return (
            end
            + b"xref\n0 5\n0000000000 65535 f \n"
            + table
            + b"trailer\n<</Size 5/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % xref
        )

    def pieces(self, piece_size: int = MIB) -> Iterator[bytes]:
        """Yield the file in pieces of about ``piece_size`` bytes."""
        objects = self._objects()
        offsets, position = [], 0
        for obj in objects:
            offsets.append(position)
            position += len(obj)
        yield b"".join(objects)
        per_piece = max(1, piece_size // len(self._line))
        block = self._line * per_piece
        left = self._lines
        while left:
            count = min(left, per_piece)
            yield block if count == per_piece else self._line * count
            left -= count
        yield self._tail(position + self._lines * len(self._line), offsets[1:])

    def __len__(self) -> int:
        return sum(len(piece) for piece in self.pieces())

    def data(self) -> bytes:
        """The whole file (for small sizes)."""
        return b"".join(self.pieces())


@dataclass
class Part:
    """One part of a multipart body: a field (``value``) or a file (``pieces`` and its size)."""

    name: str
    value: bytes = b""
    filename: str | None = None
    pieces: Callable[[], Iterable[bytes]] | None = None
    size: int | None = None
    content_type: str | None = None
    headers: bytes = b""  # extra raw header lines, each ending in CRLF

    def head(self, boundary: bytes) -> bytes:
        disposition = b'form-data; name="%s"' % self.name.encode()
        if self.filename is not None:
            disposition += b'; filename="%s"' % self.filename.encode()
        lines = b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n"
        if self.content_type:
            lines += b"Content-Type: " + self.content_type.encode() + b"\r\n"
        return lines + self.headers + b"\r\n"


@dataclass
class Multipart:
    """A multipart/form-data body, streamed piece by piece with its exact length known."""

    parts: list[Part]
    boundary: bytes = field(
        default_factory=lambda: b"----upload-test-" + secrets.token_hex(8).encode()
    )

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary.decode()}"

    def pieces(self) -> Iterator[bytes]:
        for part in self.parts:
            yield part.head(self.boundary)
            if part.pieces is not None:
                yield from part.pieces()
            else:
                yield part.value
            yield b"\r\n"
        yield b"--" + self.boundary + b"--\r\n"

    def __len__(self) -> int:
        total = len(b"--" + self.boundary + b"--\r\n")
        for part in self.parts:
            body = part.size if part.pieces is not None else len(part.value)
            assert body is not None, "a streamed part needs its size"
            total += len(part.head(self.boundary)) + body + 2
        return total

    def data(self) -> bytes:
        return b"".join(self.pieces())


def compose_body(
    csrf: str,
    files: list[tuple[str, CanaryPdf | bytes]],
    subject: str = "Results",
    body: str = "Please see the attached results.",
) -> Multipart:
    """The staff compose form as a browser sends it: token and text fields, then the files."""
    parts = [
        Part("csrf_token", csrf.encode()),
        Part("subject", subject.encode()),
        Part("body", body.encode()),
        Part("body_format", b"text"),
    ]
    for name, content in files:
        if isinstance(content, CanaryPdf):
            pdf = content
            parts.append(
                Part(
                    "attachments",
                    filename=name,
                    pieces=pdf.pieces,
                    size=len(pdf),
                    content_type="application/pdf",
                )
            )
        else:
            parts.append(
                Part("attachments", content, filename=name, content_type="application/pdf")
            )
    parts.append(Part("expires_days", b"7"))
    return Multipart(parts)


# --- a raw HTTP client --------------------------------------------------------------------


@dataclass
class Answer:
    """What the server answered (status 0: nothing, the connection was dropped)."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def post(
    port: int,
    path: str,
    body: Multipart | bytes,
    *,
    cookie: str = "",
    content_type: str | None = None,
    chunked: bool = False,
    pause: Callable[[int], None] | None = None,
    stop_after: int | None = None,
    hang_up_after: int | None = None,
) -> Answer:
    """POST ``body`` piece by piece over a plain socket and return the answer.

    ``pause(sent)`` is called after each piece (a test waits there). ``stop_after``:
    stop sending once that many body bytes are out (half-closing the connection) and
    read the answer (a server that refused mid-body). ``hang_up_after``: close the
    connection once that many are out (a client that disconnects); returns status 0.
    ``chunked`` sends no Content-Length.
    """
    pieces = body.pieces() if isinstance(body, Multipart) else iter([body])
    kind = content_type or (body.content_type if isinstance(body, Multipart) else "text/plain")
    head = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: {kind}",
        "Connection: close",
    ]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}")
    if cookie:
        head.append(f"Cookie: {cookie}")
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sent = 0
        for piece in _split(pieces):
            if hang_up_after is not None and sent >= hang_up_after:
                sock.shutdown(socket.SHUT_RDWR)
                return Answer(0, {}, b"")
            if stop_after is not None and sent >= stop_after:
                sock.shutdown(socket.SHUT_WR)  # no more body; the answer can still be read
                break
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            sent += len(piece)
            if pause is not None:
                pause(sent)
        else:
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        return _read_answer(sock)
    finally:
        sock.close()


def _split(pieces: Iterable[bytes], size: int = 256 * 1024) -> Iterator[bytes]:
    for piece in pieces:
        for start in range(0, len(piece), size):
            yield piece[start : start + size]


def _read_answer(sock: socket.socket) -> Answer:
    received = bytearray()
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass  # the server closed with some of the body unread; what came before counts
    head, _, rest = bytes(received).partition(b"\r\n\r\n")
    if not head:
        return Answer(0, {}, b"")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
    }
    if headers.get("transfer-encoding") == "chunked":
        rest = _dechunk(rest)
    return Answer(status, headers, rest)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


# --- a served portal that reports how much of each body it read ---------------------------


class BodyMonitor:
    """WSGI middleware counting the request-body bytes the app has read, and requests done.

    Lets a test act at an exact point of an upload (``wait_read``) and know the server
    has finished with a request (``wait_done``), without sleeping.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._read = 0
        self._done = 0
        self._changed = threading.Condition()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        environ["wsgi.input"] = _Counting(environ["wsgi.input"], self._count)
        try:
            result = self.app(environ, start_response)
            try:
                return list(result)
            finally:
                if hasattr(result, "close"):
                    result.close()
        finally:
            with self._changed:
                self._done += 1
                self._changed.notify_all()

    def _count(self, size: int) -> None:
        with self._changed:
            self._read += size
            self._changed.notify_all()

    @property
    def done(self) -> int:
        with self._changed:
            return self._done

    def reset(self) -> None:
        with self._changed:
            self._read = 0

    def wait_read(self, size: int, timeout: float = 60) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self._read >= size, timeout), "body not read"

    def wait_done(self, count: int, timeout: float = 60) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self._done >= count, timeout), "still running"


@dataclass
class LiveServer:
    """An app behind werkzeug's threaded server on a loopback port, with its BodyMonitor."""

    port: int
    monitor: BodyMonitor
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def serve(app: Any) -> LiveServer:
    """Serve ``app`` (threaded, 127.0.0.1, a free port) until ``stop``."""
    from werkzeug.serving import make_server

    monitor = BodyMonitor(app)
    server = make_server("127.0.0.1", 0, monitor, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="upload-http", daemon=True)
    thread.start()
    return LiveServer(server.server_port, monitor, server, thread)


class _Counting:
    def __init__(self, inner: Any, count: Callable[[int], None]) -> None:
        self._inner = inner
        self._count = count

    def read(self, *args: Any) -> bytes:
        data: bytes = self._inner.read(*args)
        self._count(len(data))
        return data

    def readline(self, *args: Any) -> bytes:
        data: bytes = self._inner.readline(*args)
        self._count(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        count: int = self._inner.readinto(buffer)
        self._count(count or 0)
        return count

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# --- where plaintext may hide ----------------------------------------------------------------


def open_files_holding(needle: bytes, pid: int | str = "self") -> list[str]:
    """The open regular files of process ``pid`` (deleted ones included) that hold ``needle``.

    Each is read through ``/proc/<pid>/fd/<n>``, which reaches an unlinked file too.
    """
    found = []
    folder = Path(f"/proc/{pid}/fd")
    for entry in list(folder.iterdir()):
        try:
            if not stat.S_ISREG(os.stat(entry).st_mode):
                continue
            target = os.readlink(entry)
            with open(entry, "rb") as handle:  # a /proc magic link: reaches unlinked files
                if _holds(handle, needle):
                    found.append(target)
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue  # closed meanwhile
    return found


def files_holding(needle: bytes, *roots: Path) -> list[Path]:
    """The files under ``roots`` that hold ``needle``."""
    found = []
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                with path.open("rb") as handle:
                    if _holds(handle, needle):
                        found.append(path)
    return found


def _holds(handle: Any, needle: bytes) -> bool:
    tail = b""
    while chunk := handle.read(SEARCH_CHUNK):
        if needle in tail + chunk:
            return True
        tail = chunk[-(len(needle) - 1) :]
    return False


# --- a member of staff with the compose form open ----------------------------------------------


@dataclass(frozen=True)
class Composer:
    """A signed-in member of staff on the compose page for a registered patient."""

    path: str
    csrf: str
    cookie: str


def staff_composer(app: Any, password: str = "Correct horse battery staple 42") -> Composer:
    """Sign a member of staff in (test client), register a patient, open the compose form.

    The session is server-side, so its cookie works on any server of the same app.
    """
    from sqlalchemy import select

    from portal.extensions import db
    from portal.models import User
    from tests.browser_client import Browser, enrolled_user

    _, secret, _ = enrolled_user(app)
    browser = Browser(app)
    assert browser.sign_in("sam@example.org", password, secret).status_code == 302
    registered = browser.submit(
        "/staff/patients", {"email": "zq@example.org", "name": "Pat Upload", "dob": "1961-07-23"}
    )
    assert registered.status_code == 200
    with app.app_context():
        patient = db.session.scalar(select(User.public_id).where(User.email == "zq@example.org"))
    path = f"/staff/messages/new?to={patient}"
    cookie = browser.client.get_cookie(app.config["SESSION_COOKIE_NAME"])
    assert cookie is not None
    return Composer(path, browser.token(path), f"{cookie.key}={cookie.value}")


def stored(app: Any) -> dict[str, int]:
    """Messages, attachments, blobs and temporary (partial) blobs the app holds."""
    from portal.extensions import db
    from portal.models import Attachment, Message
    from portal.services import content

    with app.app_context():
        store = content.blob_store()
        return {
            "messages": db.session.query(Message).count(),
            "attachments": db.session.query(Attachment).count(),
            "blobs": len(list(store.iter_ids())),
            "partial": len(list((store.root / "tmp").iterdir())),
        }


NOTHING_STORED = {"messages": 0, "attachments": 0, "blobs": 0, "partial": 0}


def attachments_plaintext(app: Any) -> list[tuple[str, bytes, str, str]]:
    """Every attachment's (file name, decrypted content, stored SHA-256, SHA-256 of the content)."""
    import hashlib

    from portal.extensions import db
    from portal.models import Message
    from portal.services import content, messages

    found = []
    with app.app_context():
        for message in db.session.query(Message).order_by(Message.id):
            names = messages.read(db.session, message).filenames
            for attachment in message.attachments:
                data = b"".join(content.open_attachment(db.session, attachment))
                digest = hashlib.sha256(data).hexdigest()
                found.append((names[attachment.id], data, attachment.sha256, digest))
    return found
