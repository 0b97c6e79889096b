"""Upload checks: is this file a PDF that the patient will be able to open?

Run before an attachment is stored (``messages.create(..., validate=validate_pdf)``),
so a wrong file, a damaged one or one locked with a password is refused with an
error the sender can act on, instead of reaching the patient.

The stream is never read into memory whole: the magic check reads 5 bytes, and
pypdf seeks to the cross-reference table at the end and reads only the objects
it needs to count the pages.

:class:`PdfInspector` runs the same checks inside the upload pipeline
(``portal.services.uploads``): the magic on the first bytes as they stream past,
the rest at the end on the stored file, decrypted segment by segment, with no
single read larger than ``MAX_PDF_READ`` (pypdf reads a damaged file whole to
rebuild its cross-reference table: such a file over the bound is refused as damaged).
"""

from __future__ import annotations

import dataclasses
import io
import logging
from typing import IO, cast

from pypdf import PasswordType, PdfReader

from portal.crypto.errors import CryptoError
from portal.security.attachments import ContentInspector, Inspected
from portal.security.content_types import Kind, expected_kind
from portal.security.inspection import UploadRejected
from portal.services.errors import ServiceError
from portal.services.messages import Upload, safe_filename
from portal.services.uploads import UploadView

# ISO 32000-1 section 7.5.2: a PDF file begins with the header. Readers tolerate
# it anywhere in the first 1024 bytes (annex H.3), which lets a file that is
# also HTML or a script pass as a PDF (a polyglot; OWASP File Upload Cheat Sheet):
# we require it at offset 0.
MAGIC = b"%PDF-"
MAX_PDF_READ = 16 * 1024 * 1024  # bytes pypdf may ask for at once (memory stays bounded)
NOT_A_PDF = "This file is not a PDF file."
DAMAGED = "This file could not be read as a PDF; it may be damaged."
LOCKED = "This PDF is password-protected. Remove the password and upload it again."

# pypdf's warnings about a malformed upload can quote its bytes ("invalid pdf header:
# b'...'"), and file contents are PHI: keep them out of the logs. The sender gets our
# ServiceError instead. (Belongs with the other library levels in portal.logs.configure.)
logging.getLogger("pypdf").setLevel(logging.CRITICAL)


def validate_pdf(upload: Upload) -> None:
    """Check that ``upload`` is a readable PDF with at least one page that opens without a password.

    Returns None and leaves the stream at position 0, whatever the outcome.
    Raises ServiceError naming the file (its sanitised name, shown only to the
    sender) when it is not a PDF, cannot be parsed or has no page, or needs a
    password to open. pypdf's own messages never reach the caller: they may
    quote the file's content.
    """
    name = safe_filename(upload.filename)
    stream = upload.stream
    try:
        stream.seek(0)
        if stream.read(len(MAGIC)) != MAGIC:
            raise ServiceError(f"{name} is not a PDF file.")
        stream.seek(0)
        _check_readable(stream, name)
    finally:
        stream.seek(0)


def _check_readable(stream: IO[bytes], name: str) -> None:
    try:
        _count_pages(stream)
    except UploadRejected as refused:
        if refused.reason == "encrypted":
            raise ServiceError(
                f"{name} is password-protected. Remove the password and upload it again."
            ) from None
        raise ServiceError(f"{name} could not be read as a PDF; it may be damaged.") from None


def _needs_password(reader: PdfReader) -> bool:
    """Whether the PDF asks for a password to open.

    A PDF encrypted with an empty user password and only an owner password
    (print or copy restrictions) opens in every viewer without a prompt, so it
    is accepted; pypdf has already unlocked it with the empty password.
    """
    if not reader.is_encrypted:
        return False
    return reader.decrypt("") == PasswordType.NOT_DECRYPTED


class PdfInspector:
    """Upload inspector (``portal.security.inspection.Inspector``): a PDF the patient can open.

    ``feed`` refuses at once a file that does not start with ``%PDF-``; ``finish``
    parses the whole stored file with pypdf through ``UploadView.open_plaintext`` and
    returns its page count. Both raise UploadRejected (reasons ``not-pdf``,
    ``damaged``, ``encrypted``); the messages name no file and quote none of it.
    """

    def __init__(self, upload: UploadView) -> None:
        """Inspect ``upload`` (the factory signature of ``UploadPolicy.inspectors``)."""
        self._upload = upload
        self._head = b""

    def feed(self, chunk: bytes | memoryview) -> None:
        """Check the magic as soon as its bytes arrive; raise UploadRejected if it is wrong."""
        if len(self._head) < len(MAGIC):
            self._head += chunk[: len(MAGIC) - len(self._head)]
            if not MAGIC.startswith(self._head):
                raise UploadRejected(NOT_A_PDF, "not-pdf")

    def finish(self) -> int:
        """Return the page count of the stored file; raise UploadRejected when it cannot open.

        Raises ContentTampered when the stored ciphertext fails authentication.
        """
        if self._head != MAGIC:
            raise UploadRejected(NOT_A_PDF, "not-pdf")
        return stored_pages(self._upload)

    def close(self) -> None:
        """Nothing to release."""


class AttachmentInspector:
    """Upload inspector of an attachment: a PDF, JPEG, PNG or HEIC, told by its content.

    ``portal.security.attachments.ContentInspector`` settles the type from the first KiB
    (the file's name and declared type must agree with it), decodes an image whole (and
    re-encodes it: the finding's ``replacement`` is what the upload path stores) and
    parses a PDF it holds; a PDF too large to hold is parsed here at the end, as
    :class:`PdfInspector` does, through bounded reads of the stored file. ``finish``
    returns the ``Inspected`` finding. ``feed`` and ``finish`` raise UploadRejected
    (``ContentRejected``); a name or declared type the portal does not take is refused
    at the first ``feed``, so a malware scan before it still sees the whole file.
    """

    def __init__(self, upload: UploadView) -> None:
        """Inspect ``upload`` (the factory signature of ``UploadPolicy.inspectors``)."""
        self._upload = upload
        self._refused: UploadRejected | None = None
        declared: Kind | None = None
        try:
            declared = expected_kind(upload.name, upload.content_type)
        except UploadRejected as refused:
            self._refused = refused
        self._content = ContentInspector(declared=declared)

    def feed(self, chunk: bytes | memoryview) -> None:
        """Check the next ``chunk``; raise UploadRejected as soon as the file is refused."""
        if self._refused is not None:
            raise self._refused
        self._content.feed(chunk)

    def finish(self) -> Inspected:
        """Return what the file is; raise UploadRejected when it is refused.

        Raises ContentTampered when the stored ciphertext fails authentication.
        """
        if self._refused is not None:
            raise self._refused
        found = self._content.finish()
        if found.structure_checked:
            return found
        return dataclasses.replace(found, structure_checked=True, pages=stored_pages(self._upload))

    def close(self) -> None:
        """Drop what the content check holds."""
        self._content.close()


def stored_pages(upload: UploadView) -> int:
    """Return the page count of ``upload``'s stored PDF, read back in bounded reads.

    Raises UploadRejected (``damaged``, ``encrypted``), ContentTampered.
    """
    with upload.open_plaintext() as plaintext:
        try:
            # pypdf needs only read, seek and tell, which typeshed's IO cannot say.
            return _count_pages(cast(IO[bytes], _BoundedReads(plaintext)))
        except _ReadTooLarge:
            raise UploadRejected(DAMAGED, "damaged") from None


def _count_pages(stream: IO[bytes]) -> int:
    try:
        reader = PdfReader(stream, strict=False)
        if _needs_password(reader):
            raise UploadRejected(LOCKED, "encrypted")
        pages = len(reader.pages)
    except (UploadRejected, CryptoError, _ReadTooLarge):  # ours: a stored file failing its
        raise  # authentication is tampering, never "damaged"
    except Exception:  # pypdf raises many types; its messages may quote the file
        raise UploadRejected(DAMAGED, "damaged") from None
    if pages < 1:
        raise UploadRejected(DAMAGED, "damaged")
    return pages


class _ReadTooLarge(Exception):
    """pypdf asked for more than MAX_PDF_READ bytes at once."""


class _BoundedReads(io.BufferedIOBase):
    """A seekable reader that refuses any single read over ``MAX_PDF_READ`` bytes."""

    mode = "rb"  # pypdf warns about a stream without "b" in its mode

    def __init__(self, inner: IO[bytes], limit: int | None = None) -> None:
        super().__init__()
        self._inner = inner
        self._limit = MAX_PDF_READ if limit is None else limit
        self._size = sniff_size(inner)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        wanted = self._size - self._inner.tell() if size is None or size < 0 else size
        if wanted > self._limit:
            raise _ReadTooLarge
        return self._inner.read(wanted)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()


def sniff_size(stream: IO[bytes]) -> int:
    """Return the size in bytes of seekable ``stream``, leaving its position where it was.

    Raises OSError (io.UnsupportedOperation) when the stream cannot seek.
    """
    position = stream.tell()
    try:
        return stream.seek(0, io.SEEK_END)
    finally:
        stream.seek(position)
