"""What a file is, told from its first bytes and from what its uploader declared."""

from __future__ import annotations

import pytest

from portal.security.content_types import ContentRejected, Kind, classify, expected_kind, sniff
from tests.support import samples


@pytest.mark.parametrize(
    ("filename", "media_type", "expected"),
    [
        ("scan.pdf", "application/pdf", Kind.PDF),
        ("IMG_0001.JPG", None, Kind.JPEG),
        ("photo.jpeg", "image/jpeg", Kind.JPEG),
        ("IMG_0002.HEIC", "image/heic", Kind.HEIC),
        ("image.heif", "image/heif", Kind.HEIC),
        ("chart.png", "application/octet-stream", Kind.PNG),
        ("blob", None, None),
        (None, "", None),
        (None, "image/png; charset=binary", Kind.PNG),
    ],
)
def test_the_declared_type_comes_from_the_name_and_the_media_type(
    filename: str | None, media_type: str | None, expected: Kind | None
) -> None:
    assert expected_kind(filename, media_type) is expected


@pytest.mark.parametrize(
    ("filename", "media_type", "reason"),
    [
        ("report.pdf.exe", None, "type-not-allowed"),
        ("page.html", None, "type-not-allowed"),
        ("scan.pdf", "text/html", "type-not-allowed"),
        ("photo.jpg", "image/png", "mismatch"),
    ],
)
def test_declared_types_the_portal_does_not_take_are_rejected(
    filename: str, media_type: str | None, reason: str
) -> None:
    with pytest.raises(ContentRejected) as rejected:
        expected_kind(filename, media_type)
    assert rejected.value.reason == reason


def test_classify_needs_the_magic_at_offset_zero() -> None:
    assert classify(samples.pdf()) is Kind.PDF
    with pytest.raises(ContentRejected):
        classify(b"\n" + samples.pdf())  # readers accept this; we do not


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"%PDF-1.7", Kind.PDF),
        (b"\xff\xd8\xff\xe0", Kind.JPEG),
        (b"\x89PNG\r\n\x1a\n", Kind.PNG),
        (b"\x00\x00\x00\x18ftypheic", Kind.HEIC),
        (b"\x00\x00\x00\x18ftypmif1", Kind.HEIC),
        (b"\x00\x00\x00\x18ftypavif", None),
        (b"%PDF", None),
        (b"", None),
    ],
)
def test_magic_bytes(head: bytes, kind: Kind | None) -> None:
    assert sniff(head) is kind
