"""Output files the portal writes for people (exports, keys), without touching what a path names.

A regular file is written whole to a temporary file that this code creates in
the target's folder (``O_CREAT | O_EXCL``), and only that new file's mode is
set, before it is linked (or, to replace, renamed) into place. So an export
run as root with ``-o /dev/null`` writes into ``/dev/null`` and leaves its mode
alone, a symbolic link is replaced rather than followed, and no half-written
file is ever seen under the final name (CWE-732, CWE-59).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

PRIVATE_MODE = 0o600
PathLike = str | os.PathLike[str]


class OutputError(OSError):
    """The path cannot be written: it names a folder, a block device or a socket, or is gone."""


class OutputExists(OutputError):
    """The path names an existing regular file and the caller did not ask to replace it."""


@contextlib.contextmanager
def open_output(
    path: PathLike, *, replace: bool = False, mode: int = PRIVATE_MODE, encoding: str | None = None
) -> Iterator[IO[Any]]:
    """Yield a handle writing to ``path``: binary, or text in ``encoding`` (newlines as written).

    A FIFO or character device owned by this user or root is written as it is,
    its mode untouched (another user's is refused: it would receive the data). Otherwise
    a new regular file of ``mode`` takes the name when the block ends without an
    error (an error leaves nothing behind). Raises OutputExists when ``path`` is
    an existing regular file (or a link to one) and ``replace`` is false,
    OutputError for other kinds of file, and OSError when the folder is unusable.
    """
    target = Path(path)
    if _is_stream(target):
        with _open_stream(target, encoding) as handle:
            yield handle
        return
    if not replace and target.is_file():
        raise OutputExists(f"{target} exists; refusing to overwrite it")
    with _new_file(target, replace, mode, encoding) as handle:
        yield handle


def _is_stream(target: Path) -> bool:
    try:
        kind = os.stat(target).st_mode  # follows links: /dev/stdout leads to the pipe or tty
    except FileNotFoundError:
        return False
    if stat.S_ISFIFO(kind) or stat.S_ISCHR(kind):
        return True
    if not stat.S_ISREG(kind):
        raise OutputError(f"{target} is not a regular file, a FIFO or a character device")
    return False


@contextlib.contextmanager
def _open_stream(target: Path, encoding: str | None) -> Iterator[IO[Any]]:
    if os.stat(target).st_uid not in (0, os.geteuid()):  # checked again once opened
        raise OutputError(f"{target} belongs to another user; refusing to write into it")
    fd = os.open(target, os.O_WRONLY | os.O_NOCTTY)  # no O_CREAT, no O_TRUNC, no chmod
    opened = os.fstat(fd)
    if not (stat.S_ISFIFO(opened.st_mode) or stat.S_ISCHR(opened.st_mode)):  # swapped since
        os.close(fd)
        raise OutputError(f"{target} changed while it was being opened")
    if opened.st_uid not in (0, os.geteuid()):
        # Another user's FIFO or terminal (say a FIFO planted at /tmp/audit.csv, or a link
        # to it) would hand them the export: write only into our own or root's streams.
        os.close(fd)
        raise OutputError(f"{target} belongs to another user; refusing to write into it")
    with _fdopen(fd, encoding) as handle:
        yield handle


@contextlib.contextmanager
def _new_file(target: Path, replace: bool, mode: int, encoding: str | None) -> Iterator[IO[Any]]:
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with _fdopen(fd, encoding) as handle:
            os.fchmod(handle.fileno(), mode)  # the file we just made: exact, whatever the umask
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _publish(tmp, target, replace)
    finally:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, target: Path, replace: bool) -> None:
    if replace:
        os.replace(tmp, target)  # replaces a link itself, never what it points to
    else:
        try:
            os.link(tmp, target)  # atomic: fails if anything took the name meanwhile
        except FileExistsError:
            raise OutputExists(f"{target} exists; refusing to overwrite it") from None
    folder = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _fdopen(fd: int, encoding: str | None) -> IO[Any]:
    if encoding is None:
        return os.fdopen(fd, "wb")
    return os.fdopen(fd, "w", encoding=encoding, newline="")
