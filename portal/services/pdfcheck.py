"""Upload checks: is this file a PDF that the patient will be able to open?

Run before an attachment is stored (``messages.create(..., validate=validate_pdf)``),
so a wrong file, a damaged one or one locked with a password is refused with an
error the sender can act on, instead of reaching the patient.

The stream is never read into memory whole: the magic check reads 5 bytes, and
pypdf seeks to the cross-reference table at the end and reads only the objects
it needs to count the pages.
"""

from __future__ import annotations

import io
import logging
from typing import IO

from pypdf import PasswordType, PdfReader

from portal.services.errors import ServiceError
from portal.services.messages import Upload, safe_filename

# ISO 32000-1 section 7.5.2: a PDF file begins with the header. Readers tolerate
# it anywhere in the first 1024 bytes (annex H.3), which lets a file that is
# also HTML or a script pass as a PDF (a polyglot; OWASP File Upload Cheat Sheet):
# we require it at offset 0.
MAGIC = b"%PDF-"

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
    damaged = f"{name} could not be read as a PDF; it may be damaged."
    try:
        reader = PdfReader(stream, strict=False)
        if _needs_password(reader):
            raise ServiceError(
                f"{name} is password-protected. Remove the password and upload it again."
            )
        pages = len(reader.pages)
    except ServiceError:
        raise
    except Exception:  # pypdf raises many types (PdfReadError, ValueError, KeyError, ...)
        raise ServiceError(damaged) from None
    if pages < 1:
        raise ServiceError(damaged)


def _needs_password(reader: PdfReader) -> bool:
    """Whether the PDF asks for a password to open.

    A PDF encrypted with an empty user password and only an owner password
    (print or copy restrictions) opens in every viewer without a prompt, so it
    is accepted; pypdf has already unlocked it with the empty password.
    """
    if not reader.is_encrypted:
        return False
    return reader.decrypt("") == PasswordType.NOT_DECRYPTED


def sniff_size(stream: IO[bytes]) -> int:
    """Return the size in bytes of seekable ``stream``, leaving its position where it was.

    Raises OSError (io.UnsupportedOperation) when the stream cannot seek.
    """
    position = stream.tell()
    try:
        return stream.seek(0, io.SEEK_END)
    finally:
        stream.seek(position)
