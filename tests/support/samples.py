"""Small files of every attachment type, made on the spot: PDFs, JPEG, PNG and HEIC photos
(with GPS EXIF when asked), and hostile ones (polyglots, bombs, deep archives)."""

from __future__ import annotations

import contextlib
import io
import struct
import zipfile
import zlib
from collections.abc import Iterator
from typing import IO

from PIL import Image
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, NameObject

from portal.security import images  # noqa: F401  (registers the HEIC opener)

# A recognisable place: the tests check it is gone after re-encoding.
GPS = {1: "N", 2: (51.0, 30.0, 26.0), 3: "W", 4: (0.0, 7.0, 39.0)}
GPS_IFD = 0x8825
ORIENTATION = 0x0112
MAKE = 0x010F


def gps_exif(orientation: int = 1) -> Image.Exif:
    """EXIF with a GPS position, a camera make and ``orientation``."""
    exif = Image.Exif()
    exif[MAKE] = "PickupCam"
    exif[ORIENTATION] = orientation
    exif[GPS_IFD] = GPS
    return exif


def picture(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Image.Image:
    """A small image with a gradient (so encoders have something to encode)."""
    image = Image.new("RGB", size)
    image.putdata([(x * 4 % 256, y * 4 % 256, 128) for y in range(size[1]) for x in range(size[0])])
    return image.convert(mode)


def image_file(fmt: str, image: Image.Image | None = None, **options: object) -> bytes:
    """``image`` (default :func:`picture`) saved as ``fmt`` (JPEG, PNG, HEIF) with ``options``."""
    out = io.BytesIO()
    (image or picture()).save(out, fmt, **options)
    return out.getvalue()


def jpeg(**options: object) -> bytes:
    """A small JPEG; ``exif=gps_exif().tobytes()`` adds a location."""
    return image_file("JPEG", **options)


def png(**options: object) -> bytes:
    """A small PNG."""
    return image_file("PNG", **options)


def heic(**options: object) -> bytes:
    """A small HEIC photo (pillow-heif's x265 encoder)."""
    return image_file("HEIF", quality=80, **options)


def pdf(pages: int = 1, attachment: bytes | None = None) -> bytes:
    """A valid PDF of ``pages`` blank pages, with ``attachment`` as an embedded file when given."""
    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(width=612, height=792)
    if attachment is not None:
        writer.add_attachment("note.txt", attachment)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def pdf_with_content(content: bytes) -> bytes:
    """A one-page PDF whose page content stream holds ``content`` as is (uncompressed)."""
    writer = PdfWriter()
    page = writer.add_blank_page(width=612, height=792)
    stream = DecodedStreamObject()
    stream.set_data(content)
    page[NameObject("/Contents")] = writer._add_object(stream)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def pdf_with_flate_stream(data: bytes) -> bytes:
    """A hand-made PDF with one page whose content stream is ``data`` Flate-compressed
    (so the bytes appear nowhere in the file as they are)."""
    body = zlib.compress(data)
    objects = [
        b"<</Type/Catalog/Pages 2 0 R>>",
        b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
        b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]/Contents 4 0 R>>",
        b"<</Length %d/Filter/FlateDecode>>stream\n" % len(body) + body + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, obj in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj" % number + obj + b"endobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer<</Size %d/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def encrypted_pdf(user_password: str, pages: int = 1) -> bytes:
    """A PDF of ``pages`` blank pages that needs ``user_password`` to open."""
    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(width=612, height=792)
    writer.encrypt(user_password)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def nested_zip(data: bytes, depth: int) -> bytes:
    """``data`` zipped ``depth`` times over (deeper than a scanner's recursion limit)."""
    for _ in range(depth):
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as archive:
            archive.writestr("inner", data)
        data = out.getvalue()
    return data


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG of ``width`` x ``height`` black 1-bit pixels: tiny on disk, huge decoded."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte, then the packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack("!I", len(body)) + kind + body + struct.pack("!I", zlib.crc32(kind + body))
        )

    header = struct.pack("!IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


class StoredUpload:
    """A file as the upload path shows it to an inspector factory (``UploadSource``): its
    name, declared media type and a seekable view of the whole file."""

    def __init__(self, name: str, content_type: str | None, data: bytes) -> None:
        self.name = name
        self.content_type = content_type
        self.data = data
        self.opened = 0

    @contextlib.contextmanager
    def open_plaintext(self) -> Iterator[IO[bytes]]:
        """Yield a reader of the whole file (counting how often it was opened)."""
        self.opened += 1
        yield io.BytesIO(self.data)
