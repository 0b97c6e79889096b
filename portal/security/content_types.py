"""What an attachment really is: PDF, JPEG, PNG or HEIC, told by its content, never its name.

A file is accepted only when its first bytes are one of these formats' magic
(at offset 0), it matches the type its name or the browser declared, it carries
no second format in its first KiB (a polyglot), and the format's own library
opens it: pypdf for PDFs here (no password needed, at least one page), Pillow
for images (``portal.security.images``). ``portal.security.attachments`` puts
the checks together, for a seekable file or as an upload inspector. OWASP File
Upload Cheat Sheet: an allow-list of types, validated by content.

pypdf reads only the cross-reference table and the page tree, within its own
resource limits (pypdf.Configuration: page tree entries, stream and
decompression sizes), so memory stays bounded whatever the PDF.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from enum import StrEnum
from typing import IO

from pypdf import PasswordType, PdfReader

from portal.security.inspection import UploadRejected

MIB = 1024 * 1024
HEAD_BYTES = 1024  # magic, and the window PDF readers search for their header (ISO 32000-1 H.3)

# pypdf, Pillow's plugins and pillow-heif raise many types (SyntaxError, struct.error,
# ValueError, OSError, RuntimeError, KeyError, ...) for a damaged file: every Exception is
# caught and replaced by ours, whose message quotes none of the file.
LIBRARY_ERRORS = (Exception,)

# pypdf's warnings can quote the file's bytes, and file contents are PHI.
logging.getLogger("pypdf").setLevel(logging.CRITICAL)


class Kind(StrEnum):
    """The attachment types the portal accepts."""

    PDF = "pdf"
    JPEG = "jpeg"
    PNG = "png"
    HEIC = "heic"


ALL_KINDS = frozenset(Kind)
IMAGES = frozenset({Kind.JPEG, Kind.PNG, Kind.HEIC})
MEDIA_TYPES = {
    Kind.PDF: "application/pdf",
    Kind.JPEG: "image/jpeg",
    Kind.PNG: "image/png",
    Kind.HEIC: "image/heic",
}
NAMES = {Kind.PDF: "PDF", Kind.JPEG: "JPEG", Kind.PNG: "PNG", Kind.HEIC: "HEIC"}
_EXTENSIONS = {
    ".pdf": Kind.PDF,
    ".jpg": Kind.JPEG,
    ".jpeg": Kind.JPEG,
    ".png": Kind.PNG,
    ".heic": Kind.HEIC,
    ".heif": Kind.HEIC,
}
_DECLARED_TYPES = {
    **{media_type: kind for kind, media_type in MEDIA_TYPES.items()},
    "image/jpg": Kind.JPEG,
    "image/pjpeg": Kind.JPEG,
    "image/heif": Kind.HEIC,
}
_UNDECLARED_TYPES = {"", "application/octet-stream"}
# ISO/IEC 23008-12 (HEIF) brands of HEVC-coded still images (and the generic HEIF brands).
_HEIC_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
# A second format's marker in the first KiB: PDF readers find their header anywhere there,
# browsers sniff HTML and script from the first bytes.
_PDF_MARKER = b"%pdf-"
_MARKUP_MARKERS = (b"<html", b"<script", b"<!doctype", b"<svg", b"<body", b"<iframe", b"<?php")


class ContentRejected(UploadRejected):
    """The file is not an accepted type, does not match its name, or does not open."""


def sniff(head: bytes) -> Kind | None:
    """Return the type whose magic ``head`` (a file's first bytes) starts with, or None."""
    if head.startswith(b"%PDF-"):
        return Kind.PDF
    if head.startswith(b"\xff\xd8\xff"):
        return Kind.JPEG
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return Kind.PNG
    if head[4:8] == b"ftyp" and head[8:12] in _HEIC_BRANDS:
        return Kind.HEIC
    return None


def expected_kind(filename: str | None = None, media_type: str | None = None) -> Kind | None:
    """Return the type the uploader declared by the file's extension and media type.

    None when neither says (no extension, ``application/octet-stream``). Raises
    ContentRejected when either names a type the portal does not accept, or they disagree.
    """
    by_name: Kind | None = None
    suffix = filename.rpartition(".")[2].lower() if filename and "." in filename else ""
    if suffix:
        by_name = _EXTENSIONS.get("." + suffix)
        if by_name is None:
            raise _not_allowed(ALL_KINDS)
    by_type: Kind | None = None
    declared = (media_type or "").split(";")[0].strip().lower()
    if declared not in _UNDECLARED_TYPES:
        by_type = _DECLARED_TYPES.get(declared)
        if by_type is None:
            raise _not_allowed(ALL_KINDS)
    if by_name and by_type and by_name is not by_type:
        raise ContentRejected("This file's name and type disagree.", "mismatch")
    return by_name or by_type


def classify(
    head: bytes, *, declared: Kind | None = None, allowed: Iterable[Kind] = ALL_KINDS
) -> Kind:
    """Return the type of the file whose first bytes are ``head`` (its first KiB, or all of it).

    Raises ContentRejected when the file is empty, of no accepted type, not the
    ``declared`` type, or carries a second format's marker in its first KiB.
    """
    allowed = frozenset(allowed)
    if not head:
        raise ContentRejected("This file is empty.", "empty")
    kind = sniff(head)
    if kind is None and declared is not None and declared in allowed:
        raise ContentRejected(f"This file is not a {NAMES[declared]} file.", "mismatch")
    if kind is None or kind not in allowed:
        raise _not_allowed(allowed)
    if declared is not None and kind is not declared:
        raise ContentRejected(
            f"This file is a {NAMES[kind]} file, which does not match its name or type "
            f"({NAMES[declared]}).",
            "mismatch",
        )
    window = head[:HEAD_BYTES].lower()
    markers = _MARKUP_MARKERS if kind is Kind.PDF else (_PDF_MARKER, *_MARKUP_MARKERS)
    if any(marker in window for marker in markers):
        raise ContentRejected(
            "This file holds a second kind of content (such as a PDF or a web page inside "
            "an image), so it was not accepted.",
            "polyglot",
        )
    return kind


def check_pdf(stream: IO[bytes]) -> int:
    """Return the page count of the PDF in seekable ``stream`` (left at position 0).

    Raises ContentRejected when it does not start with ``%PDF-``, cannot be
    parsed, has no page, or needs a password to open. A PDF with only an owner
    password (print or copy restrictions) opens without a prompt and is accepted.
    """
    try:
        stream.seek(0)
        if stream.read(5) != b"%PDF-":
            raise damaged(Kind.PDF)
        stream.seek(0)
        pages = _count_pages(stream)
    finally:
        stream.seek(0)
    if pages < 1:
        raise damaged(Kind.PDF)
    return pages


def _count_pages(stream: IO[bytes]) -> int:
    try:
        reader = PdfReader(stream, strict=False)
        if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
            raise ContentRejected(
                "This PDF is password-protected. Remove the password and upload it again.",
                "encrypted",
            )
        return len(reader.pages)
    except ContentRejected:
        raise
    except LIBRARY_ERRORS:
        raise damaged(Kind.PDF) from None


def _not_allowed(allowed: frozenset[Kind]) -> ContentRejected:
    names = [NAMES[kind] for kind in Kind if kind in allowed]
    listed = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
    return ContentRejected(f"Only {listed} files can be attached.", "type-not-allowed")


def damaged(kind: Kind) -> ContentRejected:
    """The refusal of a file that claims to be ``kind`` but does not open as one."""
    return ContentRejected(
        f"This file could not be read as a {NAMES[kind]}; it may be damaged.", "damaged"
    )


_STORED_SUFFIXES = {"image/jpeg": (".jpg", ".jpeg"), "image/png": (".png",)}


def is_image(media_type: str | None) -> bool:
    """Whether a stored attachment of ``media_type`` is an image shown inline (JPEG or PNG)."""
    return media_type in _STORED_SUFFIXES


def inline_name(media_type: str | None) -> str:
    """The file name a photo is shown inline under (``photo.jpg``): not the uploader's,
    which may name the patient or the condition, and is not needed to show pixels."""
    suffixes = _STORED_SUFFIXES.get(media_type or "")
    return "photo" + (suffixes[0] if suffixes else "")


def stored_name(filename: str, media_type: str | None) -> str:
    """Return ``filename`` with the extension of what is stored (``rash.heic`` stored as a
    JPEG is served as ``rash.jpg``); unchanged when it already fits or for a PDF."""
    suffixes = _STORED_SUFFIXES.get(media_type or "")
    if suffixes is None or filename.lower().endswith(suffixes):
        return filename
    stem = filename.rpartition(".")[0] if "." in filename else filename
    return (stem or "photo") + suffixes[0]
