"""Blob storage for ciphertext, behind one small interface.

Blobs hold only ciphertext (``portal.crypto.stream``) and are named by a random
id that says nothing about the patient, the message or the file. The default
``FilesystemBlobStore`` keeps them under one folder; a shared store (object
storage) can replace it by implementing ``BlobStore``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from portal.crypto.stream import decrypt_stream, encrypt_stream

BLOB_ID_BYTES = 16
_BLOB_ID = re.compile(r"[0-9a-f]{32}")
_TMP_DIR = "tmp"
_TMP_SUFFIX = ".part"
DIR_MODE = 0o700
FILE_MODE = 0o600
WRITE_BUFFER = 1024 * 1024  # bytes; one write(2) per MiB, not per segment (64 KiB puts +35%)
# A temporary file is created and then locked: one younger than this may not be locked yet.
TEMP_GRACE_SECONDS = 60
_PROBE_NAME = "writable-probe"


class BlobNotFound(KeyError):
    """No blob has this id (never stored, or deleted)."""


class StorageUnavailable(OSError):
    """The store cannot take a blob now (disk full, quota, read-only, I/O error); nothing kept.

    The message names only the errno, never a path or content.
    """


class BlobStore(Protocol):
    """Where ciphertext blobs live. Ids are random and opaque."""

    def put(self, chunks: Iterable[bytes]) -> str:
        """Store the concatenated ``chunks`` durably; return the new blob's random id.

        Raises ``StorageUnavailable`` (and keeps nothing) when the store has no room.
        """
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

    def _write(self, blob_id: str, chunks: Iterable[bytes]) -> None:
        final = self._path(blob_id)
        tmp = self._tmp / f"{blob_id}{_TMP_SUFFIX}"
        try:
            _write_synced(tmp, chunks)
            self._ensure_fanout(final.parent)
            os.rename(tmp, final)
            _fsync_dir(final.parent)
        except BaseException as error:
            for leftover in (tmp, final):  # final too: the rename may be done, its fsync not
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
            if isinstance(error, OSError) and error.errno in _FULL_OR_BROKEN:
                name = errno.errorcode.get(error.errno, "error")
                raise StorageUnavailable(error.errno, f"blob store: {name}") from None
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


def _write_synced(path: Path, chunks: Iterable[bytes]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held until closed: tells a sweep this writer is alive
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
