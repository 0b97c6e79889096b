"""The attachment checks put together: for a seekable file, and as an upload inspector.

:func:`validate` checks a file that can be read at will (a CLI upload, a file on
disk). :class:`ContentInspector` checks one as it streams into the encrypted
store (``portal.services.uploads``): it settles the type from the first KiB,
holds an image (bounded) to decode and re-encode it at the end, and reads a large
PDF back through the upload's seekable ``open_plaintext`` view.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import IO, Protocol

from portal.security.content_types import (
    ALL_KINDS,
    HEAD_BYTES,
    MEDIA_TYPES,
    Kind,
    check_pdf,
    classify,
    damaged,
    expected_kind,
)
from portal.security.images import (
    MAX_IMAGE_BYTES,
    DisplayImage,
    ImageInfo,
    check_image,
    image_too_large,
    reencode_for_display,
)
from portal.security.inspection import Replacement

PDF_BUFFER_BYTES = 8 * 1024 * 1024  # ContentInspector parses PDFs up to this size itself
TAIL_BYTES = 1024  # where a PDF's %%EOF must be (as pypdf requires)


@dataclass(frozen=True)
class Checked:
    """What :func:`validate` found: the type, its media type and size, pages or pixels."""

    kind: Kind
    media_type: str
    size: int
    pages: int | None = None
    image: ImageInfo | None = None


@dataclass(frozen=True)
class Inspected:
    """What :class:`ContentInspector` found.

    ``structure_checked`` is False only for a PDF larger than PDF_BUFFER_BYTES
    inspected without ``open_plaintext``: its magic, first KiB and %%EOF were
    checked as it streamed, but pypdf needs random access, so the caller must run
    :func:`check_pdf` on a seekable view of it before accepting it. ``display`` is
    the re-encoded image (None for PDFs, and once it is stored: :meth:`without_replacement`).
    """

    kind: Kind
    media_type: str
    size: int
    structure_checked: bool
    pages: int | None = None
    display: DisplayImage | None = None

    @property
    def replacement(self) -> Replacement | None:
        """The re-encoded image to store in place of the upload (None for a PDF)."""
        if self.display is None:
            return None
        return Replacement(self.display.data, self.display.media_type)

    def without_replacement(self) -> Inspected:
        """This finding without the re-encoded image's bytes (plaintext), once they are stored."""
        return dataclasses.replace(self, display=None)


def validate(
    stream: IO[bytes], *, declared: Kind | None = None, allowed: Iterable[Kind] = ALL_KINDS
) -> Checked:
    """Return what the file in seekable ``stream`` is (stream left at position 0).

    Runs every check (:func:`classify`, then :func:`check_pdf` or
    :func:`check_image`). Raises ContentRejected on the first that fails.
    """
    try:
        stream.seek(0)
        kind = classify(stream.read(HEAD_BYTES), declared=declared, allowed=allowed)
        size = stream.seek(0, io.SEEK_END)
        if kind is Kind.PDF:
            return Checked(kind, MEDIA_TYPES[kind], size, pages=check_pdf(stream))
        if size > MAX_IMAGE_BYTES:
            raise image_too_large()
        stream.seek(0)
        return Checked(kind, MEDIA_TYPES[kind], size, image=check_image(stream.read(), kind))
    finally:
        stream.seek(0)


class ContentInspector:
    """An upload inspector (``feed``, ``finish``, ``close``) that checks the content as it streams.

    The type is settled (and a wrong one refused) once the first KiB has arrived.
    Images are held in memory, up to MAX_IMAGE_BYTES, and at the end decoded and
    re-encoded for display. PDFs up to PDF_BUFFER_BYTES are held and parsed with
    pypdf at the end; of a larger one only the first and last KiB are kept, and at
    the end pypdf reads it through ``open_plaintext`` (a seekable view of the whole
    file, such as ``StagedUpload.open_plaintext``), or, without one, it is left to
    the caller (see :attr:`Inspected.structure_checked`).
    """

    def __init__(
        self,
        *,
        declared: Kind | None = None,
        allowed: Iterable[Kind] = ALL_KINDS,
        max_image_bytes: int = MAX_IMAGE_BYTES,
        pdf_buffer_bytes: int = PDF_BUFFER_BYTES,
        open_plaintext: Callable[[], AbstractContextManager[IO[bytes]]] | None = None,
    ) -> None:
        self._declared = declared
        self._open_plaintext = open_plaintext
        self._allowed = frozenset(allowed)
        self._max_image_bytes = max_image_bytes
        self._pdf_buffer_bytes = pdf_buffer_bytes
        self._kind: Kind | None = None
        # The file so far, while it is kept whole. A BytesIO rather than a bytearray: its
        # getvalue() hands its buffer over uncopied, so an image is held once, not twice.
        self._held: io.BytesIO | None = io.BytesIO()
        self._tail = b""
        self._size = 0

    def feed(self, chunk: bytes | memoryview) -> None:
        """Take the next ``chunk``; raises ContentRejected as soon as the file is refused."""
        self._size += len(chunk)
        if self._held is not None:
            self._held.write(chunk)
        self._tail = (self._tail + chunk[-TAIL_BYTES:])[-TAIL_BYTES:]
        if self._kind is None and self._held is not None and self._size >= HEAD_BYTES:
            self._kind = self._classify()
        if self._kind is not None:
            self._check_size(self._kind)

    def finish(self) -> Inspected:
        """Check the whole file and return what it is; raises ContentRejected."""
        kind = self._kind or self._classify()
        media_type = MEDIA_TYPES[kind]
        held = self._held.getvalue() if self._held is not None else None  # not a copy
        self.close()
        if kind is not Kind.PDF:
            assert held is not None  # images are always held whole
            display = reencode_for_display(held, kind)
            return Inspected(kind, media_type, self._size, True, display=display)
        if held is not None:
            return Inspected(kind, media_type, self._size, True, check_pdf(io.BytesIO(held)))
        if b"%%EOF" not in self._tail:
            raise damaged(Kind.PDF)
        if self._open_plaintext is None:
            return Inspected(kind, media_type, self._size, False)
        with self._open_plaintext() as whole:
            return Inspected(kind, media_type, self._size, True, check_pdf(whole))

    def close(self) -> None:
        """Drop what is held; never raises."""
        self._held = None

    def _classify(self) -> Kind:
        head = self._held.getvalue()[:HEAD_BYTES] if self._held is not None else b""
        return classify(head, declared=self._declared, allowed=self._allowed)

    def _check_size(self, kind: Kind) -> None:
        if kind is not Kind.PDF and self._size > self._max_image_bytes:
            self.close()
            raise image_too_large()
        if kind is Kind.PDF and self._size > self._pdf_buffer_bytes:
            self._held = None  # a large PDF streams on; only its tail is kept


class UploadSource(Protocol):
    """What :func:`inspect_upload` needs of a file (``portal.services.uploads.UploadView``)."""

    @property
    def name(self) -> str:
        """The file's (sanitised) name, for its extension."""
        ...

    @property
    def content_type(self) -> str | None:
        """The media type the client declared."""
        ...

    def open_plaintext(self) -> AbstractContextManager[IO[bytes]]:
        """A seekable reader of the whole file, once it has ended."""
        ...


def inspect_upload(
    upload: UploadSource, *, allowed: Iterable[Kind] = ALL_KINDS
) -> ContentInspector:
    """Return the :class:`ContentInspector` of ``upload`` (an inspector factory).

    The declared type comes from its name and media type (:func:`expected_kind`,
    whose ContentRejected this raises), large PDFs are read back through its
    ``open_plaintext``.
    """
    declared = expected_kind(upload.name, upload.content_type)
    return ContentInspector(
        declared=declared, allowed=allowed, open_plaintext=upload.open_plaintext
    )
