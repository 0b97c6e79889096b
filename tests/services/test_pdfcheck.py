"""Upload validation: only readable, unlocked PDFs with pages get through, and errors say which."""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Iterator
from typing import IO

import pytest
import weasyprint
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject

from portal.services.errors import ServiceError
from portal.services.messages import Upload
from portal.services.pdfcheck import sniff_size, validate_pdf
from tests.factories import MINIMAL_PDF

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00"


class CountingBytesIO(io.BytesIO):
    """A BytesIO that counts the bytes handed out, to show a check never reads it whole."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.bytes_read += len(chunk)
        return chunk

    def readline(self, size: int | None = -1) -> bytes:
        line = super().readline(size)
        self.bytes_read += len(line)
        return line


@pytest.fixture(scope="module")
def multipage_pdf() -> bytes:
    html = "".join(
        f"<h1>Page {n}</h1><p>{'Lorem ipsum dolor sit amet. ' * 200}</p>" for n in range(6)
    )
    pdf = weasyprint.HTML(string=html).write_pdf()
    assert pdf is not None
    return pdf


def encrypted_pdf(user_password: str, owner_password: str | None = None) -> bytes:
    writer = PdfWriter()
    writer.add_blank_page(width=612, height=792)
    writer.encrypt(user_password, owner_password)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def large_pdf(payload_bytes: int) -> bytes:
    """A valid one-page PDF whose page content stream is ``payload_bytes`` long."""
    writer = PdfWriter()
    page = writer.add_blank_page(width=612, height=792)
    content = DecodedStreamObject()
    content.set_data(b"% filler\n" * (payload_bytes // 9))
    page.replace_contents(content)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def check(data: bytes, name: str = "scan.pdf") -> io.BytesIO:
    stream = io.BytesIO(data)
    stream.seek(len(data) // 2)  # wherever the caller left it
    validate_pdf(Upload(name, stream))
    return stream


def refusal(data: bytes, name: str = "scan.pdf") -> tuple[str, io.BytesIO]:
    stream = io.BytesIO(data)
    with pytest.raises(ServiceError) as caught:
        validate_pdf(Upload(name, stream))
    return str(caught.value), stream


NOT_A_PDF = "scan.pdf is not a PDF file."
DAMAGED = "scan.pdf could not be read as a PDF; it may be damaged."
LOCKED = "scan.pdf is password-protected. Remove the password and upload it again."


def test_minimal_pdf_passes_and_rewinds() -> None:
    assert check(MINIMAL_PDF).tell() == 0


def test_real_multipage_pdf_passes(multipage_pdf: bytes) -> None:
    assert check(multipage_pdf).tell() == 0


HTML_POLYGLOT = b"<html><body><script>alert(document.cookie)</script></body></html>\n"


@pytest.mark.parametrize(
    "prefix", [b"\x00" * 200, b" ", HTML_POLYGLOT], ids=["nul", "space", "html"]
)
def test_header_must_be_at_offset_zero(prefix: bytes) -> None:
    """Issue 10 item 14: readers tolerate junk before %PDF-; a polyglot must not pass."""
    message, stream = refusal(prefix + MINIMAL_PDF)
    assert message == NOT_A_PDF
    assert stream.tell() == 0


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"Dear patient,\nyour results are normal.\n", "text"),
        (PNG, "png"),
        (b"", "empty"),
        (b" " * 1024 + MINIMAL_PDF, "header after the first KiB"),
        (b"%PD", "shorter than the magic"),
    ],
)
def test_not_a_pdf(data: bytes, why: str) -> None:
    message, stream = refusal(data)
    assert message == NOT_A_PDF, why
    assert stream.tell() == 0


def test_truncated_pdf_is_damaged(multipage_pdf: bytes) -> None:
    message, stream = refusal(multipage_pdf[: len(multipage_pdf) * 6 // 10])
    assert message == DAMAGED
    assert stream.tell() == 0


@pytest.mark.parametrize(
    "tail",
    [
        b"garbage\x00\xff not a pdf at all" * 10,
        b"1.4\n1 0 obj<</Type/Catalog/Pages 9 0 R>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n",
        b"1.7\n%%EOF\n",
    ],
)
def test_garbage_after_magic_is_damaged(tail: bytes) -> None:
    message, stream = refusal(b"%PDF-" + tail)
    assert message == DAMAGED
    assert stream.tell() == 0


def test_pdf_without_pages_is_damaged() -> None:
    writer = PdfWriter()
    out = io.BytesIO()
    writer.write(out)
    message, _ = refusal(out.getvalue())
    assert message == DAMAGED


def test_password_protected_pdf_is_refused() -> None:
    message, stream = refusal(encrypted_pdf("pw"))
    assert message == LOCKED
    assert stream.tell() == 0


def test_owner_password_only_pdf_opens_without_prompt_so_passes() -> None:
    # Print/copy restrictions with an empty user password: every viewer opens it.
    assert check(encrypted_pdf("", "owner-secret")).tell() == 0


def test_parser_messages_never_reach_the_user() -> None:
    secret = b"Quagmire Xylophonoma"
    message, _ = refusal(b"%PDF-1.4\n1 0 obj <</Name (" + secret + b") >> endobj\n" + secret)
    assert message == DAMAGED
    assert "Quagmire" not in message


def test_pypdf_warnings_quoting_content_stay_out_of_the_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    refusal(b"Xylophonoma " + MINIMAL_PDF)  # refused before pypdf could quote its header
    refusal(b"%PDF-1.4 Xylophonoma")
    assert not [r for r in caplog.records if r.name.startswith("pypdf")]
    assert "Xylophonoma" not in caplog.text


def test_error_shows_the_sanitised_file_name() -> None:
    stream = io.BytesIO(b"hello")
    with pytest.raises(ServiceError) as caught:
        validate_pdf(Upload("C:\\Users\\sam\\results<1>.txt", stream))
    assert caught.value.messages == ["results1.txt is not a PDF file."]


def test_spooled_temporary_file_works(multipage_pdf: bytes) -> None:
    with tempfile.TemporaryFile() as spooled:
        spooled.write(multipage_pdf)
        validate_pdf(Upload("scan.pdf", spooled))
        assert spooled.tell() == 0


def test_large_pdf_is_not_read_whole() -> None:
    data = large_pdf(8 * 1024 * 1024)
    stream = CountingBytesIO(data)
    validate_pdf(Upload("big.pdf", stream))
    assert stream.tell() == 0
    assert stream.bytes_read < len(data) // 10


@pytest.fixture
def temp_stream() -> Iterator[IO[bytes]]:
    with tempfile.TemporaryFile() as handle:
        handle.write(b"x" * 12345)
        handle.seek(100)
        yield handle


def test_sniff_size_keeps_position(temp_stream: IO[bytes]) -> None:
    assert sniff_size(temp_stream) == 12345
    assert temp_stream.tell() == 100
    assert sniff_size(io.BytesIO()) == 0
