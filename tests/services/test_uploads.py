"""The upload pipeline: each piece counted, hashed, shown to every inspector and encrypted into a
temporary blob; refusals, limits and abandonment leave nothing; inspectors plug in as factories
(the PDF check, and the real ClamAV scanner of portal.security.scan)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pytest
from pypdf import PdfWriter

from portal.security.inspection import UploadRejected
from portal.security.scan import ScanRefused, ScanResult, ScanStream, Verdict
from portal.services import pdfcheck
from portal.services.uploads import (
    HASH_BEHIND,
    InspectorFactory,
    Staging,
    TooManyFiles,
    UploadPolicy,
    UploadRefused,
    UploadTooLarge,
    UploadView,
)
from portal.storage import FilesystemBlobStore, StorageUnavailable, read_decrypted
from tests.factories import MINIMAL_PDF
from tests.support.clamd import EICAR, Clamd
from tests.support.faults import fill, tiny_disk
from tests.support.uploads import MIB, CanaryPdf, new_canary


@pytest.fixture
def store(tmp_path: Path) -> FilesystemBlobStore:
    return FilesystemBlobStore(tmp_path / "blobs")


def temporary(store: FilesystemBlobStore) -> list[Path]:
    return list((store.root / "tmp").iterdir())


@dataclass
class Recorder:
    """An inspector that keeps what it saw; refuses at a given byte count or at the end."""

    view: UploadView
    refuse_after: int | None = None
    refuse_at_finish: bool = False
    chunks: list[bytes] = field(default_factory=list)
    finished: int = 0
    closed: int = 0

    def feed(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        if self.refuse_after is not None and sum(map(len, self.chunks)) > self.refuse_after:
            raise UploadRejected("This file is not wanted.", "unwanted")

    def finish(self) -> str:
        self.finished += 1
        if self.refuse_at_finish:
            raise UploadRejected("This file is not wanted either.", "unwanted-at-end")
        with self.view.open_plaintext() as stored:
            return hashlib.sha256(stored.read()).hexdigest()

    def close(self) -> None:
        self.closed += 1


class Recorders:
    """A factory of Recorders that remembers each it made."""

    def __init__(self, refuse_after: int | None = None, refuse_at_finish: bool = False) -> None:
        self.refuse_after, self.refuse_at_finish = refuse_after, refuse_at_finish
        self.made: list[Recorder] = []

    def __call__(self, view: UploadView) -> Recorder:
        recorder = Recorder(view, self.refuse_after, self.refuse_at_finish)
        self.made.append(recorder)
        return recorder


def pieces(data: bytes, size: int = 100_000) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_every_piece_reaches_every_inspector_then_the_store(store: FilesystemBlobStore) -> None:
    first, second = Recorders(), Recorders()
    staging = Staging(store, inspectors=[first, second])
    data = os.urandom(3 * MIB + 17)
    upload = staging.open("scan.pdf", "application/pdf")
    for piece in pieces(data):
        assert upload.write(piece) == len(piece)
    [accepted] = staging.accepted()
    digest = hashlib.sha256(data).hexdigest()
    assert (accepted.size, accepted.sha256, accepted.findings) == (
        len(data),
        digest,
        (digest, digest),
    )
    for made in (first.made, second.made):
        [recorder] = made
        assert b"".join(recorder.chunks) == data
        assert (recorder.finished, recorder.closed) == (1, 1)
        assert recorder.view.name == "scan.pdf"
        assert recorder.view.content_type == "application/pdf"
    assert list(store.iter_ids()) == []  # not a blob before keep
    blob_id = accepted.keep()
    assert temporary(store) == []
    assert b"".join(read_decrypted(store, staging.key, blob_id, accepted.object_id)) == data


def test_views_of_bytes_pass_uncopied_and_buffers_anyone_may_change_are_copied(
    store: FilesystemBlobStore,
) -> None:
    """A view of bytes (a slice of a parser's read) reaches the inspectors as it is; a
    bytearray, or a view of one, as a copy: its owner changing it afterwards changes
    nothing hashed, inspected or stored."""
    recorders = Recorders()
    staging = Staging(store, inspectors=[recorders])
    read = os.urandom(MIB)
    view = memoryview(read)[100 : 100 + 300_000]
    owned = bytearray(os.urandom(200_000))
    owned_view = memoryview(bytearray(os.urandom(100_000)))
    words = memoryview(bytes(range(256)) * 4).cast("I")  # not a byte view: counted in bytes
    upload = staging.open("scan.pdf")
    expected = bytes(view) + bytes(owned) + bytes(owned_view) + bytes(words)
    assert upload.write(view) == len(view)
    assert upload.write(owned) == len(owned)
    assert upload.write(owned_view) == len(owned_view)
    assert upload.write(words) == 1024
    owned[:] = b"\0" * len(owned)
    owned_view[:] = b"\0" * len(owned_view)
    [accepted] = staging.accepted()
    [recorder] = recorders.made
    first, *copies, last = recorder.chunks
    assert isinstance(first, memoryview)
    assert first.obj is read  # the very bytes, uncopied
    assert all(type(chunk) is bytes for chunk in copies)
    assert isinstance(last, memoryview)
    assert last.format == "B"
    assert len(last) == 1024
    assert b"".join(recorder.chunks) == expected
    assert (accepted.size, accepted.sha256) == (len(expected), hashlib.sha256(expected).hexdigest())
    blob_id = accepted.keep()
    assert b"".join(read_decrypted(store, staging.key, blob_id, accepted.object_id)) == expected


def test_sha256_is_hashed_on_a_thread_that_ends_with_its_file(store: FilesystemBlobStore) -> None:
    """With HASH_BEHIND, a file of several batches is hashed on a thread of its own (the
    digest the same), which ends when the file is sealed, or discarded halfway."""

    def hashing() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "upload-sha256"]

    staging = Staging(store)
    data = os.urandom(5 * MIB + 3)
    upload = staging.open("a.pdf")
    for piece in pieces(data, 256 * 1024):
        upload.write(piece)
    behind = hashing()
    assert len(behind) == (1 if HASH_BEHIND else 0)
    upload.seal()
    assert upload.sha256 == hashlib.sha256(data).hexdigest()
    assert not any(t.is_alive() for t in behind)
    halfway = staging.open("b.pdf")
    for piece in pieces(data[: 3 * MIB], 256 * 1024):
        halfway.write(piece)
    behind = hashing()
    assert len(behind) == (1 if HASH_BEHIND else 0)
    staging.discard()
    assert not any(t.is_alive() for t in behind)
    assert hashing() == []
    assert temporary(store) == []


def test_no_thread_for_the_sha256_hashes_it_on_the_callers(
    store: FilesystemBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process at its thread limit (start() raises RuntimeError): the file is hashed on the
    caller's thread, the digest the same, and a discard still releases everything (it
    joined a thread never started, raised, and hung on its third call)."""
    started = threading.Thread.start

    def no_hashing_thread(thread: threading.Thread) -> None:
        if thread.name == "upload-sha256":
            raise RuntimeError("can't start new thread")
        started(thread)

    monkeypatch.setattr(threading.Thread, "start", no_hashing_thread)
    staging = Staging(store)
    data = os.urandom(3 * MIB + 5)
    upload = staging.open("a.pdf")
    for piece in pieces(data, 256 * 1024):
        upload.write(piece)
    upload.seal()
    assert upload.sha256 == hashlib.sha256(data).hexdigest()
    halfway = staging.open("b.pdf")
    for piece in pieces(data, 256 * 1024):
        halfway.write(piece)
    for _ in range(3):  # the request's write path, its form's end and its teardown
        staging.discard()
    assert temporary(store) == []
    assert not [t for t in threading.enumerate() if t.name == "upload-sha256"]


def test_the_plaintext_is_never_read_back_but_through_the_store(
    store: FilesystemBlobStore,
) -> None:
    upload = Staging(store).open("scan.pdf")
    upload.write(b"%PDF-1.4 results")
    with pytest.raises(io.UnsupportedOperation):
        upload.read()
    with pytest.raises(io.UnsupportedOperation):
        upload.seek(3)
    assert upload.seek(0) == 0  # what a multipart parser does at the end of a part
    with pytest.raises(ValueError, match="not stored whole"):
        upload.open_plaintext().__enter__()
    upload.seal()
    with upload.open_plaintext() as plaintext:
        assert plaintext.read() == b"%PDF-1.4 results"
    for part in temporary(store):
        assert b"results" not in part.read_bytes()
    upload.discard()


def test_a_refusal_while_streaming_stops_the_file_there(store: FilesystemBlobStore) -> None:
    picky = Recorders(refuse_after=MIB)
    staging = Staging(store, inspectors=[picky])
    upload = staging.open("photo.pdf")
    upload.write(b"x" * MIB)
    assert len(temporary(store)) == 1
    upload.write(b"x")  # the inspector refuses this piece
    for _ in range(8):
        upload.write(b"y" * MIB)  # the rest of the part is only counted
    assert upload.size == 9 * MIB + 1
    with pytest.raises(UploadRefused) as refused:
        staging.accepted()
    assert str(refused.value) == "photo.pdf: This file is not wanted."
    assert refused.value.rejection.reason == "unwanted"
    [recorder] = picky.made
    assert sum(map(len, recorder.chunks)) == MIB + 1  # nothing fed after the refusal
    assert (recorder.finished, recorder.closed) == (0, 1)
    assert temporary(store) == []


def test_a_refusal_at_the_end_deletes_what_was_stored(store: FilesystemBlobStore) -> None:
    staging = Staging(store, inspectors=[Recorders(refuse_at_finish=True)])
    staging.add("a.pdf", io.BytesIO(b"whatever"))
    with pytest.raises(UploadRefused, match=r"a\.pdf: This file is not wanted either\."):
        staging.accepted()
    assert temporary(store) == []


def test_an_inspector_that_cannot_start_refuses_the_file(store: FilesystemBlobStore) -> None:
    def unreachable(_view: UploadView) -> Recorder:
        raise UploadRejected("The virus scanner is not answering.", "connect")

    later = Recorders()
    staging = Staging(store, inspectors=[unreachable, later])
    staging.add("a.pdf", io.BytesIO(b"data"))
    with pytest.raises(UploadRefused, match="not answering"):
        staging.accepted()
    assert later.made == []
    assert temporary(store) == []


def test_a_file_over_the_limit_is_stopped_and_deleted(store: FilesystemBlobStore) -> None:
    staging = Staging(store, max_bytes=MIB)
    upload = staging.open("big.pdf")
    upload.write(b"x" * MIB)
    with pytest.raises(UploadTooLarge, match=r"big\.pdf is larger than this portal accepts"):
        upload.write(b"x")
    assert temporary(store) == []
    with pytest.raises(ValueError, match="discarded"):
        upload.write(b"more")


def test_more_files_than_allowed_discards_them_all(store: FilesystemBlobStore) -> None:
    staging = Staging(store, max_files=2)
    staging.add("a.pdf", io.BytesIO(b"a"))
    staging.add("b.pdf", io.BytesIO(b"b"))
    with pytest.raises(TooManyFiles, match="at most 2 files"):
        staging.open("c.pdf")
    assert temporary(store) == []


def test_the_next_file_seals_the_one_before(store: FilesystemBlobStore) -> None:
    recorders = Recorders()
    staging = Staging(store, inspectors=[recorders])
    staging.open("a.pdf").write(b"first")
    staging.open("b.pdf")
    assert [r.finished for r in recorders.made] == [1]  # a.pdf is finished, b.pdf not begun


def test_an_empty_file_input_costs_nothing(store: FilesystemBlobStore) -> None:
    recorders = Recorders()
    staging = Staging(store, inspectors=[recorders])
    staging.open("")  # a browser's file input left empty: no name, no bytes
    staging.add("real.pdf", io.BytesIO(b"data"))
    assert [u.filename for u in staging.accepted()] == ["real.pdf"]
    assert len(recorders.made) == 1


def test_an_empty_file_with_a_name_is_inspected(store: FilesystemBlobStore) -> None:
    staging = Staging(store, inspectors=[pdfcheck.PdfInspector])
    staging.add("empty.pdf", io.BytesIO(b""))
    with pytest.raises(UploadRefused, match="not a PDF file"):
        staging.accepted()


def test_a_nameless_file_is_refused(store: FilesystemBlobStore) -> None:
    staging = Staging(store)
    staging.add("", io.BytesIO(b"content"))
    with pytest.raises(Exception, match="without a file name"):
        staging.accepted()


def test_discard_spares_what_was_kept_and_close_discards(store: FilesystemBlobStore) -> None:
    staging = Staging(store)
    kept = staging.add("kept.pdf", io.BytesIO(b"kept"))
    dropped = staging.add("dropped.pdf", io.BytesIO(b"dropped"))
    blob_id = kept.keep()
    staging.discard()
    staging.discard()
    assert list(store.iter_ids()) == [blob_id]
    assert temporary(store) == []
    with pytest.raises(ValueError, match="sealed, accepted"):
        dropped.keep()
    left = Staging(store).open("left.pdf")
    left.write(b"abandoned")
    left.close()  # what Werkzeug does with every file at the end of a request
    assert temporary(store) == []


def test_a_live_upload_survives_the_sweep(store: FilesystemBlobStore) -> None:
    upload = Staging(store).open("slow.pdf")
    upload.write(b"still arriving")
    [part] = temporary(store)
    old = time.time() - 7200
    os.utime(part, (old, old))
    assert store.sweep_temp() == 0
    upload.write(b" and done")
    upload.seal()
    assert upload.keep()


def test_a_policy_reads_its_settings_when_a_staging_starts(store: FilesystemBlobStore) -> None:
    limit = {"bytes": 10}
    policy = UploadPolicy("test", inspectors=list, max_bytes=lambda: limit["bytes"], max_files=3)
    first = policy.start(store)
    limit["bytes"] = 20
    second = policy.start(store)
    assert (first.max_bytes, second.max_bytes, second.max_files) == (10, 20, 3)
    assert first.policy is policy
    assert first.key != second.key  # each staging has a fresh data key


# --- the PDF check inside the pipeline -----------------------------------------------------


def encrypted_pdf() -> bytes:
    writer = PdfWriter()
    writer.add_blank_page(72, 72)
    writer.encrypt("secret-pass")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"Dear patient, your results are normal.", "This file is not a PDF file."),
        (b"<html>" + MINIMAL_PDF, "This file is not a PDF file."),
        (b"%PD", "This file is not a PDF file."),
        (b"%PDF-1.7\n" + b"\x89PNG junk" * 50, "could not be read as a PDF"),
        ("encrypted", "password-protected"),
    ],
    ids=["text", "polyglot", "short", "junk", "encrypted"],
)
def test_pdf_check_refusals(store: FilesystemBlobStore, data: bytes | str, message: str) -> None:
    staging = Staging(store, inspectors=[pdfcheck.PdfInspector])
    staging.add("scan.pdf", io.BytesIO(encrypted_pdf() if data == "encrypted" else data))
    with pytest.raises(UploadRefused, match=message):
        staging.accepted()
    assert temporary(store) == []


def test_a_not_pdf_is_refused_by_its_first_bytes(store: FilesystemBlobStore) -> None:
    staging = Staging(store, inspectors=[pdfcheck.PdfInspector])
    upload = staging.open("notes.pdf")
    upload.write(b"plain")
    upload.write(b"%PDF-" + MINIMAL_PDF)  # too late: the first five bytes decided
    upload.seal()
    assert upload.rejection is not None
    assert upload.rejection.reason == "not-pdf"
    assert temporary(store) == []


class CountingView:
    """The staged upload's view, counting the plaintext bytes an inspector reads back."""

    def __init__(self, view: UploadView) -> None:
        self.view = view
        self.read = 0

    @property
    def name(self) -> str:
        return self.view.name

    @property
    def content_type(self) -> str | None:
        return self.view.content_type

    @contextlib.contextmanager
    def open_plaintext(self) -> Iterator[BinaryIO]:
        with self.view.open_plaintext() as inner:
            yield _Counted(inner, self)


class _Counted(io.BufferedIOBase):
    def __init__(self, inner: BinaryIO, view: CountingView) -> None:
        super().__init__()
        self.inner, self.view, self.mode = inner, view, "rb"

    def read(self, size: int | None = -1) -> bytes:
        data = self.inner.read(size)
        self.view.read += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.inner.seek(offset, whence)

    def tell(self) -> int:
        return self.inner.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


def test_a_large_pdf_is_checked_without_reading_it_whole(store: FilesystemBlobStore) -> None:
    views: list[CountingView] = []

    def counted(view: UploadView) -> pdfcheck.PdfInspector:
        views.append(CountingView(view))
        return pdfcheck.PdfInspector(views[-1])

    staging = Staging(store, inspectors=[counted])
    pdf = CanaryPdf(8 * MIB, new_canary())
    upload = staging.open("big.pdf")
    for piece in pdf.pieces():
        upload.write(piece)
    [accepted] = staging.accepted()
    assert accepted.findings == (1,)  # one page
    assert views[0].read < len(pdf) // 50


def test_a_damaged_pdf_too_large_to_repair_in_memory_is_refused(
    store: FilesystemBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pypdf reads a file whole to rebuild a broken cross-reference table: past the bound
    (MAX_PDF_READ, made small here) the file is refused as damaged instead."""
    whole = CanaryPdf(2 * MIB, new_canary()).data()
    broken = whole[:-400] + whole[-380:]  # 20 bytes gone: the xref offset points astray
    monkeypatch.setattr(pdfcheck, "MAX_PDF_READ", MIB)
    staging = Staging(store, inspectors=[pdfcheck.PdfInspector])
    staging.add("broken.pdf", io.BytesIO(broken))
    with pytest.raises(UploadRefused, match="could not be read as a PDF"):
        staging.accepted()
    monkeypatch.setattr(pdfcheck, "MAX_PDF_READ", 4 * MIB)  # within the bound: pypdf repairs it
    again = Staging(store, inspectors=[pdfcheck.PdfInspector])
    again.add("broken.pdf", io.BytesIO(broken))
    assert again.accepted()[0].findings == (1,)


# --- a malware scanner plugged in ----------------------------------------------------------


def test_the_clamav_scanner_plugs_in_as_an_inspector(
    store: FilesystemBlobStore, clamd: Clamd
) -> None:
    """The INSTREAM scan (portal.security.scan) is fed as the file streams: one factory."""
    scanner = clamd.scanner()

    def clamav(_view: UploadView) -> ScanStream:
        return scanner.open()  # connects; ScanRefused (an UploadRejected) if clamd is down

    inspectors: list[InspectorFactory] = [pdfcheck.PdfInspector, clamav]
    clean = Staging(store, inspectors=inspectors)
    clean.add("clean.pdf", io.BytesIO(MINIMAL_PDF))
    [accepted] = clean.accepted()
    assert accepted.findings == (1, ScanResult(Verdict.CLEAN, len(MINIMAL_PDF)))
    clean.discard()

    infected = Staging(store, inspectors=inspectors)
    infected.add("infected.pdf", io.BytesIO(MINIMAL_PDF + b"%" + EICAR + b"\n"))
    with pytest.raises(UploadRefused) as refused:
        infected.accepted()
    assert isinstance(refused.value.rejection, ScanRefused)
    assert refused.value.rejection.result.verdict is Verdict.INFECTED
    assert "virus" in str(refused.value)
    assert temporary(store) == []
    assert list(store.iter_ids()) == []


def test_a_full_disk_met_by_the_pipeline_is_raised_and_nothing_kept(tmp_path: Path) -> None:
    with tiny_disk(tmp_path / "disk", "2m") as mount:
        store = FilesystemBlobStore(mount / "blobs")
        filler = fill(mount)
        upload = Staging(store).open("big.pdf")

        def send_and_seal() -> None:
            for _ in range(16):  # written behind the pipeline: told by a later call
                upload.write(os.urandom(256 * 1024))
            upload.seal()

        with pytest.raises(StorageUnavailable):
            send_and_seal()
        assert temporary(store) == []
        filler.unlink()
