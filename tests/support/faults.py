"""Faults an operator meets, made real: a TCP proxy to cut the database, a tiny full disk.

The proxy stands between the portal and the shared PostgreSQL server, so an
outage is simulated without touching the server other tests use. The disk is a
real tmpfs mounted for the test (the kernel itself answers ENOSPC); mounting
needs root or CAP_SYS_ADMIN, which the CI container has.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

CHUNK = 64 * 1024


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``upstream``; :meth:`cut` drops every connection and
    refuses new ones until :meth:`restore`."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(16)
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return listener

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by cut()
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._conns += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and reset the open ones (the database "went away")."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it
        self._listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def restore(self) -> None:
        """Accept connections again on the same port."""
        self._listener = self._listen(self.port)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(CHUNK):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def tiny_disk(mount_point: Path, size: str = "16m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``mount_point`` for the block; unmount after."""
    mount_point.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount_point)],
        check=True,
        capture_output=True,
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(folder: Path) -> Path:
    """Write a file in ``folder`` until its file system is full; return the file."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as handle:
        for size in (CHUNK, 4096, 512, 1):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
    return filler
