"""Uploads: each file streams from its source into the encrypted blob store, inspected on the way.

No plaintext ever reaches a disk. Every piece of a file, as it arrives (from a
request body, or a file the CLI reads), is counted against the size limit, hashed
(SHA-256), handed to each inspector and encrypted (``portal.crypto.stream``) onto a
temporary blob (``BlobWriter``: ``tmp/<id>.part``, locked while its writer lives).
When the file ends, the last segment is written and each inspector finishes; an
inspector that needs random access (pypdf) reads the stored ciphertext back through
:meth:`StagedUpload.open_plaintext`, decrypted one segment at a time. Only when the
message is created does :meth:`StagedUpload.keep` rename the blob into place; a
refused, oversize, abandoned or interrupted upload is deleted (``discard``), and one
whose process died is swept at start-up and by ``portal retention run``.

Inspectors follow ``portal.security.inspection.Inspector`` (``feed``, ``finish``,
``close``; refuse by raising ``UploadRejected``) and plug in as factories in an
:class:`UploadPolicy`, each called with the :class:`UploadView` of one file when its
first byte arrives: the malware scan (``lambda view:
upload_scans.open_scan(settings)``, ``portal.security.scan``), the content check
(``portal.security.attachments.inspect_upload``), the PDF check
(``pdfcheck.PdfInspector``). Each ``finish()`` result is kept in
``StagedUpload.findings`` (a ScanResult to audit, say); a refusal in
``StagedUpload.rejection`` and ``UploadRefused.rejection``.

All files of one staging share one fresh data key, which becomes the message's
(``keys.create(..., raw=staging.key)``): the files are encrypted before the message
exists, and nothing needs encrypting twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, BinaryIO, Protocol

from portal.crypto.keyring import Keyring
from portal.crypto.stream import StreamEncryptor, open_seekable
from portal.models.types import new_public_id
from portal.security.inspection import Inspector, Typed, UploadRejected
from portal.services.errors import ServiceError
from portal.storage import BlobStore, BlobWriter

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

MAX_FILES = 20  # file parts per staging: each holds an open, locked temporary blob
# Pieces (of about 256 KiB from a parser) queued for a file's pipeline thread; 0: none,
# each piece hashed, inspected, encrypted on the caller's thread. 0 by measurement
# (100 MiB parsed in-process, five alternating runs, 2 cores at load 5, 2026-12-02): the
# thread costs CPU (queue hand-offs; SHA-256 lets go of the interpreter lock per piece
# and waits to get it back behind the parser) and, with no core to spare, overlaps
# nothing: 0.25-0.30 CPU-s and 0.30-0.47 s with it, 0.23-0.24 CPU-s and 0.29-0.42 s
# without. Through gunicorn at load 1.5-2 (bench/bench_upload.py, best of 5): 276 MB/s at
# 3.81 CPU-s/GB with it, 283 MB/s at 3.53 without: the same speed for more CPU. Still 0
# once the parser had stopped copying (portal.web.uploads._write_through), 2026-12-03:
# 100 MiB read from a socket as gunicorn reads it (8 KiB recvs; sent by another process),
# ten alternating runs at load 1.1-1.3: with it 0.277 s median, 3.39 CPU-s/GB (the whole
# process); without 0.343 s, 3.08; SHA-256 alone on a thread (HASH_BEHIND) 0.270 s,
# 3.19: as fast, for less CPU.
PIPELINE_DEPTH = 0
# Batches of about HASH_BATCH bytes queued for a file's SHA-256 thread (hashlib lets go of
# the interpreter lock while it hashes a large piece; SHA-256, ~0.7 CPU-s/GB here, is the
# largest cost of ours on the request's thread); 0: hashed on the thread that takes the
# pieces. 2 by measurement, 2026-12-03, the set-up above: at load 1.0-1.3 0.215 s median
# with it, 0.301 s without (eight alternating runs, CPU 2.67 CPU-s/GB either way); at load
# 3.6-4.2, no core to spare, 0.311 s and 0.309 s (2.38 and 2.31 CPU-s/GB). Through
# gunicorn (bench/bench_upload.py, six alternating runs of best-of-5 each at load 0.8-3.6)
# no difference shows through the noise: 245-287 MB/s at 2.96-4.01 CPU-s/GB with it,
# 206-314 MB/s at 2.77-4.29 without.
HASH_BEHIND = 2
HASH_BATCH = 1024 * 1024
READ_CHUNK = 256 * 1024  # bytes read at a time from a file the caller hands in
MAX_FILENAME = 255
# A piece of a file as the hasher, inspectors and encryptor are handed it: bytes, or a
# byte view of bytes (a slice of a parser's read), which no one can change meanwhile.
Piece = bytes | memoryview


def _piece(data: ReadableBuffer) -> Piece:
    """``data`` as a Piece: itself when it is bytes, a byte view of it when it is a view of
    bytes (neither copied), else a copy (a bytearray, say, which its owner may change
    while an inspector or the pipeline thread still holds it)."""
    if isinstance(data, bytes):
        return data
    view = memoryview(data)
    if isinstance(view.obj, bytes) and view.c_contiguous:
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    return bytes(view)


def safe_filename(raw: str) -> str:
    """Return a file name without paths or control characters, at most 255 characters."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable() and ch not in '"<>:|?*').strip(" .")
    return (name or "document.pdf")[:MAX_FILENAME]


class UploadView(Protocol):
    """What an inspector factory is given about one file (nothing it could write to)."""

    @property
    def name(self) -> str:
        """The file's sanitised name (PHI: shown to its uploader only, never logged)."""
        ...

    @property
    def content_type(self) -> str | None:
        """The media type the client declared for the file, if any."""
        ...

    def open_plaintext(self) -> contextlib.AbstractContextManager[BinaryIO]:
        """Return the whole file as a seekable reader, decrypted from the store as it is read.

        Only once the file has ended (in an inspector's ``finish``). Raises
        ContentTampered when the stored ciphertext fails authentication.
        """
        ...


InspectorFactory = Callable[[UploadView], Inspector[object]]


class UploadTooLarge(ServiceError):
    """A file passed the policy's size limit; what had been stored of it is deleted."""


class TooManyFiles(ServiceError):
    """More files than the policy allows at once; none of them is kept."""


class UploadRefused(ServiceError):
    """An inspector refused a file; ``rejection`` is its ``UploadRejected`` (to audit)."""

    def __init__(self, message: str, rejection: UploadRejected) -> None:
        super().__init__(message)
        self.rejection = rejection


@dataclass(frozen=True)
class UploadPolicy:
    """Which inspectors see a kind of upload, and its limits; read when a staging begins.

    ``inspectors`` and ``max_bytes`` are callables so that settings (a scanner
    switched on, ``PORTAL_MAX_UPLOAD``) apply from the next upload on.
    """

    name: str
    inspectors: Callable[[], Sequence[InspectorFactory]]
    max_bytes: Callable[[], int | None]
    max_files: int = MAX_FILES

    def start(self, store: BlobStore) -> Staging:
        """Return an empty staging under this policy, writing into ``store``."""
        return Staging(
            store,
            inspectors=self.inspectors(),
            max_bytes=self.max_bytes(),
            max_files=self.max_files,
            policy=self,
        )


class Staging:
    """The files of one request (or one CLI send), encrypted under one fresh data key.

    Files arrive one after the other (a multipart body holds one part at a time), so
    opening a file seals the previous one: only one is ever being written. Not
    thread-safe: one staging per request.
    """

    def __init__(
        self,
        store: BlobStore,
        *,
        inspectors: Sequence[InspectorFactory] = (),
        max_bytes: int | None = None,
        max_files: int = MAX_FILES,
        policy: UploadPolicy | None = None,
    ) -> None:
        """Start staging into ``store``; no file and no blob yet."""
        self.store = store
        self.key = Keyring.new_data_key()
        self.inspectors = tuple(inspectors)
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.policy = policy
        self.uploads: list[StagedUpload] = []

    def open(self, filename: str, content_type: str | None = None) -> StagedUpload:
        """Seal the file before (if any) and start the next; return it to ``write`` into.

        Raises TooManyFiles past ``max_files``, and whatever sealing the previous raises.
        """
        self.seal()
        if len(self.uploads) >= self.max_files:
            self.discard()
            raise TooManyFiles(f"Attach at most {self.max_files} files at a time.")
        upload = StagedUpload(self, filename, content_type)
        self.uploads.append(upload)
        return upload

    def add(self, filename: str, src: IO[bytes], content_type: str | None = None) -> StagedUpload:
        """Stream the readable ``src`` in as the next file, seal it and return it.

        Raises UploadTooLarge, TooManyFiles, or StorageUnavailable; a refusal by an
        inspector is kept in the returned upload's ``rejection``.
        """
        upload = self.open(filename, content_type)
        while chunk := src.read(READ_CHUNK):
            upload.write(chunk)
        upload.seal()
        return upload

    def seal(self) -> None:
        """End the file being written, if any: see :meth:`StagedUpload.seal`."""
        if self.uploads:
            self.uploads[-1].seal()

    def accepted(self) -> list[StagedUpload]:
        """Seal, then return every file chosen (empty file inputs left out).

        Raises UploadRefused for the first file an inspector refused, and ServiceError
        for a file sent without a name (no browser does that; a name is what the
        recipient sees).
        """
        self.seal()
        chosen = [upload for upload in self.uploads if upload.chosen]
        for upload in chosen:
            if not upload.filename.strip():
                raise ServiceError("A file was sent without a file name. Choose it again.")
            if upload.rejection is not None:
                raise UploadRefused(f"{upload.name}: {upload.rejection.message}", upload.rejection)
        return chosen

    def discard(self) -> None:
        """Delete every file not yet kept; idempotent. Returns None, raises nothing."""
        for upload in self.uploads:
            upload.discard()


class _Digest:
    """SHA-256 of one file's pieces, on a thread of its own when ``HASH_BEHIND`` (hashlib lets
    go of the interpreter lock while it hashes a large piece): fed batches of about
    ``HASH_BATCH`` bytes, at most ``HASH_BEHIND`` of them waiting. Pieces are kept, not
    copied, until hashed: bytes and views of bytes (``Piece``), which nothing changes."""

    def __init__(self) -> None:
        self._hasher = hashlib.sha256()
        self._batch: list[Piece] = []
        self._size = 0
        self._queue: queue.Queue[list[Piece] | None] | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None  # met by the hashing thread

    def update(self, piece: Piece) -> None:
        """Hash ``piece`` after those before it (at once, or on the hashing thread)."""
        if not HASH_BEHIND:
            self._hasher.update(piece)
            return
        self._batch.append(piece)
        self._size += len(piece)
        if self._size >= HASH_BATCH:
            self._hand_off()

    def hexdigest(self) -> str:
        """Return the digest of every piece so far, the hashing thread ended (the last batch
        hashed here); raises what the hashing thread met, if anything."""
        self.stop()
        if self._failure is not None:
            raise self._failure
        batch, self._batch, self._size = self._batch, [], 0
        for piece in batch:
            self._hasher.update(piece)
        return self._hasher.hexdigest()

    def stop(self) -> None:
        """End the hashing thread once it has hashed what it was handed; idempotent, and
        raises nothing (discard relies on it)."""
        thread, batches = self._thread, self._queue
        self._thread = self._queue = None
        if thread is not None and batches is not None:
            batches.put(None)
            thread.join()

    def _hand_off(self) -> None:
        batch, self._batch, self._size = self._batch, [], 0
        if self._queue is None:
            batches: queue.Queue[list[Piece] | None] = queue.Queue(maxsize=HASH_BEHIND)
            thread = threading.Thread(
                target=self._run, args=(batches,), name="upload-sha256", daemon=True
            )
            try:
                thread.start()
            except RuntimeError:  # no thread to be had now (a process at its limit):
                for piece in batch:  # hashed here, as with HASH_BEHIND 0
                    self._hasher.update(piece)
                return
            self._queue, self._thread = batches, thread
        self._queue.put(batch)  # waits while the queue is full: memory stays bounded

    def _run(self, batches: queue.Queue[list[Piece] | None]) -> None:
        while (batch := batches.get()) is not None:
            try:
                for piece in batch if self._failure is None else ():
                    self._hasher.update(piece)
            except BaseException as error:  # raised by hexdigest; the queue is still drained,
                self._failure = error  # lest the caller wait on it for ever


class StagedUpload(io.RawIOBase):
    """One file on its way into the store: written to (as a multipart parser writes a file
    part), never read back as plaintext except through :meth:`open_plaintext`.

    Nothing is created until the first byte arrives, so an empty file input costs nothing.
    Then the temporary blob and the inspectors are made (on the caller's thread, so that
    a full disk or a scanner out of reach is told at once), and each piece is inspected
    and encrypted as it is written, on the caller's thread (the blob's writes go behind,
    ``BlobWriter``), and hashed on a thread of the file's own (``HASH_BEHIND``; ``seal``
    waits for the digest). With ``PIPELINE_DEPTH`` above 0 a thread of the file's own
    does all that while the caller parses the next piece (at most that many queued); it
    costs more than it saves (see the constant). ``seal`` waits for it; a failure of it
    is raised by the next call. Either way a failure deletes what was stored. Pieces
    handed in as bytes, or as views of bytes, are not copied (``_piece``).
    """

    def __init__(self, staging: Staging, filename: str, content_type: str | None) -> None:
        """A file of ``staging`` named ``filename`` as its client gave it (PHI: never log it)."""
        super().__init__()
        self.filename = filename
        self._name = safe_filename(filename)
        self._content_type = content_type
        self.object_id = new_public_id()  # the attachment's public id, bound into the AAD
        self.size = 0
        self.sha256 = ""
        self.findings: tuple[object, ...] = ()  # each inspector's finish() result, in order
        # (up to the one that refused, if any)
        self.rejection: UploadRejected | None = None
        # What is stored: the type a content check found (None: no check said), and whether
        # its bytes are a replacement (an image re-encoded) rather than the upload's own.
        self.media_type: str | None = None
        self.replaced = False
        self.blob_id: str | None = None  # once kept
        self._staging = staging
        self._hasher = _Digest()
        self._writer: BlobWriter | None = None
        self._encryptor: StreamEncryptor | None = None
        self._inspectors: list[Inspector[object]] | None = None
        self._sealed = False
        self._discarded = False
        self._pieces: queue.Queue[Piece | None] | None = None
        self._pipeline: threading.Thread | None = None
        self._failure: BaseException | None = None

    @property
    def name(self) -> str:
        """The sanitised file name (``safe_filename``)."""
        return self._name

    @property
    def content_type(self) -> str | None:
        """The media type the client declared, if any."""
        return self._content_type

    @property
    def chosen(self) -> bool:
        """False for what a browser sends for a file input left empty: no name, no bytes."""
        return bool(self.filename) or self.size > 0

    def writable(self) -> bool:
        """Return True until the file is sealed."""
        return not self._sealed

    def write(self, data: ReadableBuffer) -> int:
        """Take the next piece of the file; return its length.

        Raises UploadTooLarge past the size limit (the stored part deleted first) and
        StorageUnavailable. A refusal by an inspector does not raise: it deletes what
        was stored, is kept in ``rejection``, and the rest of the file is counted only.
        Raises ValueError once the file is sealed or discarded.
        """
        if self._sealed or (self._discarded and self.rejection is None):
            raise ValueError("this upload is sealed or discarded")
        chunk = _piece(data)
        self.size += len(chunk)
        if self._staging.max_bytes is not None and self.size > self._staging.max_bytes:
            self.discard()
            raise UploadTooLarge(f"{self._name} is larger than this portal accepts.")
        self._raise_failure()
        if self.rejection is None and chunk and self._started() is not None:
            self._hand_off(chunk)
        return len(chunk)

    def read(self, size: int = -1) -> bytes:
        """Raise io.UnsupportedOperation: the plaintext is not kept (see ``open_plaintext``)."""
        raise io.UnsupportedOperation("an upload cannot be read back in plaintext")

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Allow only the rewind a multipart parser does at the end of a part; return 0.

        Raises io.UnsupportedOperation otherwise: the plaintext is not kept to seek in.
        """
        if (offset, whence) == (0, io.SEEK_SET):
            return 0
        raise io.UnsupportedOperation("an upload cannot be read back in plaintext")

    def seal(self) -> None:
        """End the file: write the last segment, let every inspector finish; idempotent.

        A refusal is kept in ``rejection`` (and the stored part deleted). Raises
        StorageUnavailable, and ContentTampered when an inspector re-reads the store.
        """
        if self._sealed:
            return
        self._sealed = True
        self._end_pipeline()
        try:
            self.sha256 = self._hasher.hexdigest()
        except BaseException:
            self.discard()
            raise
        self._raise_failure()
        if self.rejection is not None or self._discarded or not self.chosen:
            return
        started = self._started()
        if started is None:
            return
        writer, encryptor = started
        try:
            writer.write(encryptor.finalize())
            for inspector in self._inspectors or ():  # kept one by one: a scan's verdict
                self.findings += (inspector.finish(),)  # survives a later inspector's refusal
            self._store_replacement()
        except UploadRejected as refused:
            self._reject(refused)
        except BaseException:
            self.discard()
            raise
        finally:
            self._close_inspectors()

    def keep(self) -> str:
        """Rename the sealed, accepted file into the store; return its blob id.

        Raises ValueError for a file refused, discarded or not sealed (callers check
        ``Staging.accepted`` first), StorageUnavailable when the rename cannot be made durable.
        """
        if self.blob_id is not None:
            return self.blob_id
        if not self._sealed or self._discarded or self._writer is None:
            raise ValueError("only a sealed, accepted upload can be kept")
        self.blob_id = self._writer.keep()
        return self.blob_id

    def discard(self) -> None:
        """Delete what was stored, unless kept; idempotent, raises nothing."""
        self._discarded = True
        self._end_pipeline()
        self._hasher.stop()
        self._close_inspectors()
        if self._writer is not None and self.blob_id is None:
            self._writer.abort()

    def close(self) -> None:
        """Discard unless kept (Werkzeug closes every file at the end of a request)."""
        self.discard()
        super().close()

    @contextlib.contextmanager
    def open_plaintext(self) -> Iterator[BinaryIO]:
        """Yield the whole file as a seekable reader, decrypted from the store as it is read.

        For an inspector's ``finish`` (the last segment is written by then). Raises
        ValueError before that, ContentTampered for stored ciphertext that fails its check.
        """
        if not self._sealed or self._writer is None or self._discarded:
            raise ValueError("the upload is not stored whole")
        with self._writer.reader() as ciphertext:
            yield open_seekable(self._staging.key, self.object_id, ciphertext)

    def _store_replacement(self) -> None:
        """Take the first content finding's type; store its replacement, if any, in place of
        the upload: encrypted under the same key and object id into a new temporary blob,
        the upload's own deleted, ``size`` and ``sha256`` now the replacement's.

        The replacement is in memory (an image re-encoded, bounded by the image limits), so
        no plaintext reaches a disk here either. Raises StorageUnavailable.
        """
        typed = next((f for f in self.findings if isinstance(f, Typed)), None)
        if typed is None:
            return
        replacement = typed.replacement
        self.media_type = typed.media_type if replacement is None else replacement.media_type
        if replacement is None or self._writer is None:
            return
        writer = self._staging.store.begin()
        try:
            encryptor = StreamEncryptor(self._staging.key, self.object_id)
            writer.write(encryptor.header)
            for segment in encryptor.update(replacement.data):
                writer.write(segment)
            writer.write(encryptor.finalize())
        except BaseException:
            writer.abort()
            raise
        original, self._writer = self._writer, writer
        original.abort()
        self.size = len(replacement.data)
        self.sha256 = hashlib.sha256(replacement.data).hexdigest()
        self.replaced = True
        # The replacement's plaintext goes with it: the findings live on for the request.
        self.findings = tuple(f.without_replacement() if f is typed else f for f in self.findings)

    def _hand_off(self, chunk: Piece) -> None:
        if not PIPELINE_DEPTH:  # no pipeline thread: everything on the caller's
            try:
                self._take(chunk)
            except BaseException:
                self.discard()  # as a failure of the pipeline thread does (_raise_failure)
                raise
            return
        if self._pieces is None:
            self._pieces = queue.Queue(maxsize=PIPELINE_DEPTH)
            self._pipeline = threading.Thread(
                target=self._run_pipeline, name="upload-pipeline", daemon=True
            )
            self._pipeline.start()
        self._pieces.put(chunk)  # waits while the queue is full: memory stays bounded

    def _run_pipeline(self) -> None:
        assert self._pieces is not None  # made before this thread starts
        while (chunk := self._pieces.get()) is not None:
            if self.rejection is None and self._failure is None and not self._discarded:
                try:
                    self._take(chunk)
                except BaseException as error:  # raised to the caller by its next call
                    self._failure = error

    def _end_pipeline(self) -> None:
        """Let the pipeline thread finish the pieces it was handed (none, once discarded)."""
        if self._pipeline is not None and self._pieces is not None:
            self._pieces.put(None)
            self._pipeline.join()
        self._pipeline = self._pieces = None

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            self.discard()
            raise failure

    def _take(self, chunk: Piece) -> None:
        """Hash, inspect, encrypt and write one piece (on the pipeline thread)."""
        started = self._started()
        if started is None:
            return
        writer, encryptor = started
        self._hasher.update(chunk)
        try:
            for inspector in self._inspectors or ():
                inspector.feed(chunk)
        except UploadRejected as refused:
            self._reject(refused)
            return
        for segment in encryptor.update(chunk):
            writer.write(segment)

    def _started(self) -> tuple[BlobWriter, StreamEncryptor] | None:
        """The temporary blob and its encryptor, made with the inspectors on the first byte
        (or at the end, for an empty file); None once the file is refused."""
        if self._writer is None:
            self._writer = self._staging.store.begin()
            self._encryptor = StreamEncryptor(self._staging.key, self.object_id)
            self._writer.write(self._encryptor.header)
            self._inspectors = []
            try:
                for make in self._staging.inspectors:
                    self._inspectors.append(make(self))
            except UploadRejected as refused:  # a scanner out of reach refuses at once
                self._reject(refused)
        if self.rejection is not None or self._encryptor is None:
            return None
        return self._writer, self._encryptor

    def _reject(self, refused: UploadRejected) -> None:
        """Keep the refusal and delete what was stored (from either thread: no join here)."""
        self.rejection = refused
        self._discarded = True
        self._close_inspectors()
        if self._writer is not None:
            self._writer.abort()

    def _close_inspectors(self) -> None:
        for inspector in self._inspectors or ():
            with contextlib.suppress(Exception):  # close() never raises; a bug must not leak
                inspector.close()
        self._inspectors = None
