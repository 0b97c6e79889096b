"""Blob storage for ciphertext, behind one small interface.

Blobs hold only ciphertext (``portal.crypto.stream``) and are named by a random
id that says nothing about the patient, the message or the file. The default
``FilesystemBlobStore`` keeps them under one folder; a shared store (object
storage) can replace it by implementing ``BlobStore``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import queue
import re
import secrets
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from portal.crypto.stream import decrypt_stream, encrypt_stream

BLOB_ID_BYTES = 16
_BLOB_ID = re.compile(r"[0-9a-f]{32}")
_TMP_DIR = "tmp"
_TMP_SUFFIX = ".part"
DIR_MODE = 0o700
FILE_MODE = 0o600
WRITE_BUFFER = 1024 * 1024  # bytes; one write(2) per MiB, not per segment (64 KiB puts +35%)
WRITE_BEHIND = 2  # batches of WRITE_BUFFER a writer may have queued for its writing thread
# Every this many bytes the writing thread asks the kernel to start writing the file's new
# pages to disk (Linux sync_file_range, SYNC_FILE_RANGE_WRITE: it neither waits nor evicts
# a page, so the PDF check's read-back stays in the cache), so that keep()'s fsync has only
# the tail left to wait for. Advice only: elsewhere, or should it fail, nothing is done.
WRITEBACK_EVERY = 8 * 1024 * 1024
# A temporary file is created and then locked: one younger than this may not be locked yet.
TEMP_GRACE_SECONDS = 60
_PROBE_NAME = "writable-probe"


class BlobNotFound(KeyError):
    """No blob has this id (never stored, or deleted)."""


class StorageUnavailable(OSError):
    """The store cannot take a blob now (disk full, quota, read-only, I/O error); nothing kept.

    The message names only the errno, never a path or content.
    """


class BlobWriter(Protocol):
    """A blob being written piece by piece: no blob at all until ``keep``.

    For producers that push (an upload arriving from a request body) and for content
    that must be checked before it may become a blob. Whatever happens, exactly one of
    ``keep`` or ``abort`` ends it; a writer whose process dies is swept
    (``FilesystemBlobStore.sweep_temp``).
    """

    blob_id: str

    def write(self, data: bytes) -> None:
        """Append ``data``. Raises ``StorageUnavailable`` when the store has no room."""
        ...

    def reader(self) -> BinaryIO:
        """Return the bytes written so far, opened for seekable binary reading (caller closes)."""
        ...

    def keep(self) -> str:
        """Make the bytes a durable blob; return its id. ``StorageUnavailable``: nothing kept."""
        ...

    def abort(self) -> None:
        """Discard what was written; idempotent, and a no-op after ``keep``."""
        ...


class BlobStore(Protocol):
    """Where ciphertext blobs live. Ids are random and opaque."""

    def put(self, chunks: Iterable[bytes]) -> str:
        """Store the concatenated ``chunks`` durably; return the new blob's random id.

        Raises ``StorageUnavailable`` (and keeps nothing) when the store has no room.
        """
        ...

    def begin(self) -> BlobWriter:
        """Start a new blob, written piece by piece; raises ``StorageUnavailable``."""
        ...

    def open(self, blob_id: str) -> BinaryIO:
        """Return the blob opened for binary reading; raise ``BlobNotFound`` if absent."""
        ...

    def delete(self, blob_id: str) -> None:
        """Delete the blob; do nothing if it is already gone."""
        ...

    def exists(self, blob_id: str) -> bool:
        """Return whether the blob exists."""
        ...

    def iter_ids(self) -> Iterator[str]:
        """Yield the id of every stored blob, in no particular order."""
        ...

    def size(self, blob_id: str) -> int:
        """Return the blob's size in bytes; raise ``BlobNotFound`` if absent."""
        ...


class FilesystemBlobStore(BlobStore):
    """Blobs as files ``root/ab/abcdef...`` (two-character fan-out), folders 0700, files 0600."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        """Use (and create, mode 0700, if missing) the folder ``root``."""
        self.root = Path(root)
        self._tmp = self.root / _TMP_DIR
        self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        self._tmp.mkdir(mode=DIR_MODE, exist_ok=True)

    def __repr__(self) -> str:
        return f"<FilesystemBlobStore {self.root}>"

    def put(self, chunks: Iterable[bytes]) -> str:
        """Write ``chunks`` to a new blob durably; return its random id.

        Writes a temporary file, fsyncs it, renames it into place and fsyncs the
        folder. If anything fails (``chunks`` raising midway included), the
        temporary file is removed and the exception re-raised: no partial blob. A full
        disk, quota, read-only or I/O error is raised as ``StorageUnavailable``.
        """
        blob_id = secrets.token_hex(BLOB_ID_BYTES)
        self._write(blob_id, chunks)
        return blob_id

    def put_at(self, blob_id: str, chunks: Iterable[bytes]) -> None:
        """Store ``chunks`` under the given id, as :meth:`put` does (restoring a backup).

        Raises FileExistsError when the id is taken, ValueError for a malformed id.
        """
        if self.exists(blob_id):
            raise FileExistsError(f"blob {blob_id} exists")
        self._write(blob_id, chunks)

    def begin(self) -> _PartWriter:
        """Start a new blob: a locked temporary file, renamed into place by ``keep``.

        Raises ``StorageUnavailable`` when the temporary file cannot be created.
        """
        return _PartWriter(self, secrets.token_hex(BLOB_ID_BYTES))

    def _write(self, blob_id: str, chunks: Iterable[bytes]) -> None:
        with _unavailable_when_full():  # chunks failing with ENOSPC too, as they always did
            writer = _PartWriter(self, blob_id)
            try:
                for chunk in chunks:
                    writer.write(chunk)
                writer.keep()
            except BaseException:
                writer.abort()
                raise

    def open(self, blob_id: str) -> BinaryIO:
        """Return the blob opened for binary reading (caller closes it).

        Raises ``BlobNotFound`` if absent, ValueError for a malformed id.
        """
        try:
            return self._path(blob_id).open("rb")
        except FileNotFoundError:
            raise BlobNotFound(blob_id) from None

    def delete(self, blob_id: str) -> None:
        """Delete the blob; idempotent. Raises ValueError for a malformed id."""
        with contextlib.suppress(FileNotFoundError):
            self._path(blob_id).unlink()

    def exists(self, blob_id: str) -> bool:
        """Return whether the blob exists. Raises ValueError for a malformed id."""
        return self._path(blob_id).is_file()

    def iter_ids(self) -> Iterator[str]:
        """Yield the id of every stored blob (temporary files excluded)."""
        for fanout in self.root.iterdir():
            if fanout.name == _TMP_DIR or not fanout.is_dir():
                continue
            for entry in fanout.iterdir():
                if _BLOB_ID.fullmatch(entry.name) and entry.name[:2] == fanout.name:
                    yield entry.name

    def size(self, blob_id: str) -> int:
        """Return the blob's size in bytes. Raises ``BlobNotFound`` or ValueError (bad id)."""
        try:
            return self._path(blob_id).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(blob_id) from None

    def mtime(self, blob_id: str) -> float:
        """Return when the blob was written (epoch seconds). Raises ``BlobNotFound``."""
        try:
            return self._path(blob_id).stat().st_mtime
        except FileNotFoundError:
            raise BlobNotFound(blob_id) from None

    def sweep_temp(self, grace_seconds: float = TEMP_GRACE_SECONDS) -> int:
        """Remove temporary files whose writer is gone; return how many were removed.

        A put holds an exclusive ``flock`` on its temporary file until it ends, so a
        file nobody holds belongs to a killed process, however recent. Files younger
        than ``grace_seconds`` are left (created but not yet locked). The blob folder
        must be a local file system: on NFS, flock is emulated by per-process fcntl
        locks, which cannot tell a live writer thread of the same process.
        """
        cutoff = time.time() - grace_seconds
        removed = 0
        for entry in self._tmp.iterdir():
            # One file that cannot be checked (gone meanwhile, a stray folder, a lock the file
            # system refuses) must not stop the sweep, nor retention run's steps after it.
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff and _delete_if_abandoned(entry):
                    removed += 1
        return removed

    def writable(self) -> bool:
        """Return whether a small file can be written, synced and deleted in the temp folder."""
        probe = self._tmp / f"{_PROBE_NAME}-{secrets.token_hex(4)}{_TMP_SUFFIX}"
        try:
            _write_synced(probe, [b"\0" * 4096])
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
        return True

    def _path(self, blob_id: str) -> Path:
        if not isinstance(blob_id, str) or not _BLOB_ID.fullmatch(blob_id):
            raise ValueError("malformed blob id")
        return self.root / blob_id[:2] / blob_id

    def _ensure_fanout(self, directory: Path) -> None:
        if not directory.is_dir():
            directory.mkdir(mode=DIR_MODE, exist_ok=True)
            _fsync_dir(self.root)


def put_encrypted(
    store: BlobStore, key: bytes, object_id: str, src: BinaryIO | Iterable[bytes]
) -> str:
    """Encrypt ``src`` for ``object_id`` (``portal.crypto.stream``) into a new blob; return its id.

    Raises ValueError for a bad key; exceptions from ``src`` propagate and leave no blob.
    """
    return store.put(encrypt_stream(key, object_id, src))


def read_decrypted(store: BlobStore, key: bytes, blob_id: str, object_id: str) -> Iterator[bytes]:
    """Return an iterator of the verified plaintext of blob ``blob_id``; it closes the blob.

    Raises ``BlobNotFound``, and ``portal.crypto.ContentTampered`` here (bad
    header, wrong key or object id) or while iterating (later segments): a
    consumer must then abort, as ``decrypt_stream`` explains.
    """
    handle = store.open(blob_id)
    try:
        segments = decrypt_stream(key, object_id, handle)
    except BaseException:
        handle.close()
        raise
    return _ClosingIterator(segments, handle)


class _ClosingIterator(Iterator[bytes]):
    """Plaintext segments that close the blob at the end, on error, or on ``close()``.

    WSGI servers call ``close()`` on a response body, so an aborted download
    releases the file too.
    """

    def __init__(self, segments: Iterator[bytes], handle: BinaryIO) -> None:
        self._segments = segments
        self._handle = handle

    def __next__(self) -> bytes:
        try:
            return next(self._segments)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the blob; further iteration raises ValueError (closed file)."""
        self._handle.close()


# Errors that mean "no room or no disk now", as opposed to a bug or bad input.
_FULL_OR_BROKEN = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG})


def _delete_if_abandoned(path: Path) -> bool:
    """Delete ``path`` if no process holds its lock; return whether it was deleted."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)  # an exclusive lock may need write access
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a live put holds it
    else:
        path.unlink()
        return True
    finally:
        os.close(fd)


class _PartWriter(BlobWriter):
    """``tmp/<id>.part``, created 0600 and ``flock``-ed until ``keep`` or ``abort`` ends it.

    Writes are gathered (``writev``) into about ``WRITE_BUFFER`` bytes per system call,
    without copying the pieces, and written behind: a thread of the writer's own writes
    each full batch while the producer goes on (parsing, hashing, encrypting the next),
    with at most ``WRITE_BEHIND`` batches queued, so memory stays bounded and a busy disk
    (the kernel throttles writers of dirty pages) slows the producer only once the queue
    is full. ``reader`` and ``keep`` wait for it; its failure is raised by the next call.
    ``keep`` fsyncs the file, renames it into its fan-out folder and fsyncs that folder,
    as ``put`` always has.
    """

    def __init__(self, store: FilesystemBlobStore, blob_id: str) -> None:
        self.blob_id = blob_id
        self._store = store
        self._tmp = store._tmp / f"{blob_id}{_TMP_SUFFIX}"
        self._final = store._path(blob_id)
        with _unavailable_when_full():
            self._fd: int | None = _create_locked(self._tmp)
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._kept = False
        self._batches: queue.Queue[tuple[list[bytes], int] | None] | None = None
        self._behind: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._aborting = False

    def write(self, data: bytes) -> None:
        """Append ``data`` (kept by reference until written: do not mutate it).

        Raises StorageUnavailable when an earlier batch could not be written, ValueError
        once the writer is closed.
        """
        self._check()
        if data:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size >= WRITE_BUFFER or len(self._pending) >= _MAX_GATHER:
                self._hand_off()

    def reader(self) -> BinaryIO:
        """Write out everything, then open the temporary file for reading (the lock is kept)."""
        self._flush()
        return self._tmp.open("rb")

    def keep(self) -> str:
        """Write out everything, fsync, rename into place, fsync the folder; return the id."""
        if self._kept:
            return self.blob_id
        try:
            with _unavailable_when_full():
                self._flush()
                assert self._fd is not None  # _flush raised otherwise
                os.fsync(self._fd)
                self._store._ensure_fanout(self._final.parent)
                os.rename(self._tmp, self._final)
                _fsync_dir(self._final.parent)
        except BaseException:
            self._remove(self._final)  # the rename may be done, its fsync not
            self.abort()
            raise
        self._kept = True
        self._close()
        return self.blob_id

    def abort(self) -> None:
        """Close and delete the temporary file, what is not yet written dropped; idempotent."""
        if self._kept:
            return
        self._pending.clear()
        self._aborting = True
        self._wait_behind()
        self._close()
        self._remove(self._tmp)

    def _check(self) -> None:
        if self._fd is None:
            raise ValueError("blob writer is closed")
        if self._failure is not None:
            with _unavailable_when_full():
                raise self._failure

    def _hand_off(self) -> None:
        if self._batches is None:
            self._batches = queue.Queue(maxsize=WRITE_BEHIND)
            self._behind = threading.Thread(
                target=self._write_behind, name="blob-write-behind", daemon=True
            )
            self._behind.start()
        self._batches.put((self._pending, self._pending_size))  # waits while the queue is full
        self._pending, self._pending_size = [], 0

    def _write_behind(self) -> None:
        assert self._batches is not None  # made before this thread starts
        written = started = 0  # bytes written by this thread; writeback asked up to started
        while (batch := self._batches.get()) is not None:
            if self._failure is None and not self._aborting and self._fd is not None:
                try:
                    _write_all(self._fd, *batch)
                    written += batch[1]
                    if written - started >= WRITEBACK_EVERY:
                        start_writeback(self._fd, started, written - started)
                        started = written
                except BaseException as error:  # raised to the producer by its next call
                    self._failure = error

    def _wait_behind(self) -> None:
        """Let the write-behind thread finish what it was handed, and end it."""
        if self._behind is not None and self._batches is not None:
            self._batches.put(None)
            self._behind.join()
        self._behind = self._batches = None

    def _flush(self) -> None:
        if self._fd is None:
            raise ValueError("blob writer is closed")
        self._wait_behind()
        self._check()
        if not self._pending:
            return
        with _unavailable_when_full():
            _write_all(self._fd, self._pending, self._pending_size)
        self._pending.clear()
        self._pending_size = 0

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # releases the lock

    @staticmethod
    def _remove(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


_MAX_GATHER = 64  # pieces per writev, well under IOV_MAX (1024 on Linux)
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of the range's dirty pages, no wait


def _sync_file_range() -> Any:
    """libc's sync_file_range (called without the interpreter lock), or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    return call


_SYNC_RANGE = _sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing ``length`` bytes of ``fd`` from ``offset`` to disk,
    without waiting and without dropping them from the cache; return whether it took the
    advice (False off Linux or when the call fails: nothing else changes). Raises nothing."""
    return _SYNC_RANGE is not None and _SYNC_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0


@contextlib.contextmanager
def _unavailable_when_full() -> Iterator[None]:
    """Turn "no room or no disk" OSErrors into StorageUnavailable (errno only, no path)."""
    try:
        yield
    except StorageUnavailable:
        raise
    except OSError as error:
        if error.errno not in _FULL_OR_BROKEN:
            raise
        name = errno.errorcode.get(error.errno, "error")
        raise StorageUnavailable(error.errno, f"blob store: {name}") from None


def _write_all(fd: int, pieces: list[bytes], size: int) -> None:
    written = os.writev(fd, pieces)
    if written == size:
        return
    rest = memoryview(b"".join(pieces))[written:]  # a short write: rare on a regular file
    while rest:
        rest = rest[os.write(fd, rest) :]


def _create_locked(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until closed: tells a sweep this writer is alive
    except BaseException:
        os.close(fd)
        path.unlink()
        raise
    return fd


def _write_synced(path: Path, chunks: Iterable[bytes]) -> None:
    fd = _create_locked(path)
    with os.fdopen(fd, "wb", buffering=WRITE_BUFFER) as handle:
        for chunk in chunks:
            handle.write(chunk)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
