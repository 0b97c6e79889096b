"""The attachment checks put together, on a seekable file (validate) and as the upload
inspector (ContentInspector): both accept the same files and refuse the same ones."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image
from pypdf import PdfWriter

from portal.security import content_types, images
from portal.security.attachments import ContentInspector, Inspected, inspect_upload, validate
from portal.security.content_types import ContentRejected, Kind, check_pdf
from tests.support import samples
from tests.support.clamd import EICAR

GOOD: dict[Kind, Callable[[], bytes]] = {
    Kind.PDF: lambda: samples.pdf(pages=2),
    Kind.JPEG: lambda: samples.jpeg(exif=samples.gps_exif().tobytes()),
    Kind.PNG: samples.png,
    Kind.HEIC: lambda: samples.heic(exif=samples.gps_exif().tobytes()),
}


def _inspect(data: bytes, chunk: int = 7, **options: Any) -> Inspected:
    inspector = ContentInspector(**options)
    for start in range(0, len(data), chunk):
        inspector.feed(data[start : start + chunk])
    return inspector.finish()


def _rejected(data: bytes, **options: Any) -> ContentRejected:
    with pytest.raises(ContentRejected) as rejected:
        validate(io.BytesIO(data), **options)
    with pytest.raises(ContentRejected) as streamed:
        _inspect(data, chunk=100, **options)
    assert streamed.value.reason == rejected.value.reason  # both paths agree
    return rejected.value


@pytest.mark.parametrize("kind", list(Kind))
def test_each_accepted_type_is_recognised_by_content(kind: Kind) -> None:
    data = GOOD[kind]()
    checked = validate(io.BytesIO(data), declared=kind)
    assert (checked.kind, checked.size) == (kind, len(data))
    assert checked.media_type == content_types.MEDIA_TYPES[kind]
    inspected = _inspect(data)
    assert (inspected.kind, inspected.size, inspected.structure_checked) == (kind, len(data), True)


def test_pdf_pages_are_counted_both_ways() -> None:
    data = samples.pdf(pages=3)
    assert validate(io.BytesIO(data)).pages == 3
    assert _inspect(data).pages == 3


def test_validate_leaves_the_stream_at_the_start() -> None:
    stream = io.BytesIO(samples.png())
    stream.seek(50)
    validate(stream)
    assert stream.tell() == 0


def test_the_inspector_returns_the_display_copy_of_an_image() -> None:
    inspected = _inspect(samples.jpeg(exif=samples.gps_exif().tobytes()), chunk=100)
    assert inspected.display is not None
    with Image.open(io.BytesIO(inspected.display.data)) as back:
        assert not back.getexif()


@pytest.mark.parametrize(
    ("data", "declared"),
    [
        (samples.png(), Kind.PDF),
        (samples.pdf(), Kind.JPEG),
        (samples.jpeg(), Kind.PNG),
        (samples.heic(), Kind.JPEG),
    ],
)
def test_content_that_does_not_match_its_declared_type_is_rejected(
    data: bytes, declared: Kind
) -> None:
    rejected = _rejected(data, declared=declared)
    assert rejected.reason == "mismatch"
    assert "does not match" in rejected.message


@pytest.mark.parametrize(
    "data",
    [
        b"GIF89a" + bytes(100),
        b"PK\x03\x04" + bytes(2000),
        b"<!DOCTYPE html><html><script>alert(1)</script></html>",
        EICAR,
        b"MZ\x90\x00" + bytes(3000),
        b"\x00\x00\x00\x18ftypavif" + bytes(100),  # HEIF-family, but AVIF, not HEIC
    ],
    ids=["gif", "zip", "html", "eicar", "exe", "avif"],
)
def test_other_types_are_rejected_by_content(data: bytes) -> None:
    rejected = _rejected(data)
    assert rejected.reason == "type-not-allowed"
    assert rejected.message == "Only PDF, JPEG, PNG and HEIC files can be attached."


def test_a_narrower_allow_list_is_named_in_the_message() -> None:
    rejected = _rejected(samples.jpeg(), allowed={Kind.PDF})
    assert rejected.message == "Only PDF files can be attached."


def test_an_empty_file_is_rejected() -> None:
    assert _rejected(b"").reason == "empty"


@pytest.mark.parametrize(
    "data",
    [
        samples.jpeg(comment=b"%PDF-1.4 1 0 obj"),  # a PDF reader would open this "JPEG"
        samples.jpeg(comment=b"<script>alert(1)</script>"),
        b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF\x00" + b"%PDF-1.7\n" + samples.pdf(),
        samples.pdf()[:9] + b"%<html><body>" + samples.pdf()[9:],
    ],
    ids=["jpeg-pdf", "jpeg-script", "jpeg-magic-pdf", "pdf-html"],
)
def test_polyglots_are_rejected(data: bytes) -> None:
    rejected = _rejected(data)
    assert rejected.reason == "polyglot"


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (samples.jpeg()[:300], Kind.JPEG),
        (samples.png()[:60], Kind.PNG),
        (samples.heic()[:200], Kind.HEIC),
        (b"\x00\x00\x00\x18ftypheic" + bytes(2000), Kind.HEIC),
        (b"\x89PNG\r\n\x1a\n" + bytes(500), Kind.PNG),
        (b"%PDF-1.4\n%%EOF\n", Kind.PDF),
        (samples.pdf()[:200], Kind.PDF),
    ],
    ids=[
        "jpeg-cut",
        "png-cut",
        "heic-cut",
        "heic-empty-box",
        "png-no-chunks",
        "pdf-empty",
        "pdf-cut",
    ],
)
def test_damaged_files_are_rejected(data: bytes, kind: Kind) -> None:
    rejected = _rejected(data, declared=kind)
    assert rejected.reason == "damaged"
    assert "may be damaged" in rejected.message


def test_a_png_with_a_broken_checksum_is_rejected() -> None:
    data = bytearray(samples.png())
    data[29] ^= 0xFF  # the IHDR chunk's CRC
    assert _rejected(bytes(data)).reason == "damaged"


def test_a_password_protected_pdf_is_rejected() -> None:
    rejected = _rejected(samples.encrypted_pdf("secret"))
    assert rejected.reason == "encrypted"
    assert "password" in rejected.message


def test_a_pdf_with_only_an_owner_password_opens_and_is_accepted() -> None:
    writer = PdfWriter()
    writer.add_blank_page(width=612, height=792)
    writer.encrypt("", "owner-secret")
    out = io.BytesIO()
    writer.write(out)
    assert check_pdf(io.BytesIO(out.getvalue())) == 1


@pytest.mark.parametrize(
    ("width", "height"), [(8_000, 8_000), (14_000, 14_000)], ids=["64MP", "196MP"]
)
def test_a_decompression_bomb_is_rejected_from_its_header(width: int, height: int) -> None:
    bomb = samples.png_bomb(width, height)
    assert len(bomb) < 2 * 1024 * 1024  # small on the wire, gigabytes decoded
    rejected = _rejected(bomb)
    assert rejected.reason == "too-many-pixels"
    assert "megapixels" in rejected.message


def test_an_image_over_the_byte_limit_is_refused_as_it_streams() -> None:
    data = samples.jpeg() + bytes(20_000)
    inspector = ContentInspector(max_image_bytes=10_000)
    inspector.feed(data[:8_000])
    with pytest.raises(ContentRejected) as rejected:
        inspector.feed(data[8_000:12_000])  # refused here, not at the end
    assert rejected.value.reason == "too-large"
    big = samples.jpeg() + bytes(images.MAX_IMAGE_BYTES)
    with pytest.raises(ContentRejected, match="at most"):
        validate(io.BytesIO(big))


def test_a_wrong_type_is_refused_at_the_first_kib_not_at_the_end() -> None:
    inspector = ContentInspector()
    with pytest.raises(ContentRejected) as rejected:
        inspector.feed(b"PK\x03\x04" + bytes(content_types.HEAD_BYTES))
    assert rejected.value.reason == "type-not-allowed"


def test_a_large_pdf_streams_through_with_its_structure_left_to_check_pdf() -> None:
    data = samples.pdf(pages=40)
    inspected = _inspect(data, chunk=1000, pdf_buffer_bytes=len(data) // 2)
    assert (inspected.kind, inspected.structure_checked, inspected.pages) == (Kind.PDF, False, None)
    assert check_pdf(io.BytesIO(data)) == 40  # the caller's second step, on a seekable view


def test_a_large_pdf_without_its_end_is_refused_by_the_inspector() -> None:
    data = samples.pdf(pages=40)
    cut = data[: data.rindex(b"startxref")]
    with pytest.raises(ContentRejected) as rejected:
        _inspect(cut, chunk=1000, pdf_buffer_bytes=len(cut) // 2)
    assert rejected.value.reason == "damaged"


def test_a_large_pdf_is_parsed_through_the_uploads_seekable_view() -> None:
    data = samples.pdf(pages=40)
    upload = samples.StoredUpload("letter.pdf", "application/pdf", data)
    inspected = _inspect(
        data, chunk=1000, pdf_buffer_bytes=len(data) // 2, open_plaintext=upload.open_plaintext
    )
    assert (inspected.structure_checked, inspected.pages, upload.opened) == (True, 40, 1)


def test_a_large_locked_pdf_is_refused_through_the_uploads_seekable_view() -> None:
    data = samples.encrypted_pdf("secret", pages=40)
    upload = samples.StoredUpload("letter.pdf", None, data)
    with pytest.raises(ContentRejected) as rejected:
        _inspect(
            data,
            chunk=1000,
            pdf_buffer_bytes=len(data) // 2,
            open_plaintext=upload.open_plaintext,
        )
    assert rejected.value.reason == "encrypted"


def test_a_small_pdf_is_parsed_from_memory_without_reading_it_back() -> None:
    data = samples.pdf(pages=2)
    upload = samples.StoredUpload("letter.pdf", None, data)
    assert _inspect(data, open_plaintext=upload.open_plaintext).pages == 2
    assert upload.opened == 0


def test_the_inspector_factory_takes_the_declared_type_from_the_upload() -> None:
    photo = samples.StoredUpload("rash.jpg", "image/jpeg", samples.jpeg())
    inspector = inspect_upload(photo)
    inspector.feed(photo.data)
    assert inspector.finish().kind is Kind.JPEG
    renamed = samples.StoredUpload("results.pdf", "application/pdf", samples.png())
    inspector = inspect_upload(renamed)
    inspector.feed(renamed.data)  # under a KiB: the type is settled at the end
    with pytest.raises(ContentRejected) as rejected:
        inspector.finish()
    assert rejected.value.reason == "mismatch"
    with pytest.raises(ContentRejected) as refused:
        inspect_upload(samples.StoredUpload("setup.exe", None, b"MZ"))
    assert refused.value.reason == "type-not-allowed"
