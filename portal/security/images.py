"""Images (JPEG, PNG, HEIC) decoded whole within limits, and re-encoded for inline display.

:func:`check_image` decodes every pixel with Pillow (pillow-heif for HEIC): a
damaged or truncated file fails, and one with more than MAX_PIXELS, or whose
decoding would take more than DECODE_BUDGET bytes, is refused from its header,
before any decoding (a decompression bomb). A JPEG is decoded at a reduced scale
(libjpeg's DCT scaling, ``Image.draft``) no smaller than what is shown, every
byte of it still read (a lossless JPEG cannot be: it is held to MAX_PIXELS), and one of
more than MAX_JPEG_SCANS scans, or of an unusual header, is refused.
Images are decoded in memory, so they are also capped in bytes (MAX_IMAGE_BYTES),
and at most DECODE_SLOTS of them at a time in a process (one waits at most
DECODE_WAIT_SECONDS for its turn, then is refused: try again later).

:func:`reencode_for_display` keeps only the pixels: turned upright, converted to
sRGB by their ICC colour profile (the profile itself is not kept: its bytes are
the uploader's), shrunk to at most DISPLAY_MAX_SIDE pixels on the long side.
EXIF (GPS location included), XMP, comments, the profile and anything appended
are gone, and HEIC becomes JPEG (OWASP File Upload Cheat Sheet: "image rewriting").
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pillow_heif
from PIL import Image, ImageCms, ImageFile, ImageOps

from portal.security.content_types import (
    IMAGES,
    LIBRARY_ERRORS,
    MIB,
    ContentRejected,
    Kind,
    damaged,
)

# A 24-megapixel phone photo (5712 x 4284) fits; under the old 50 MP a 7070 x 7070 PNG
# took ~450 MB to decode (issue 14 item 4).
MAX_PIXELS = 25_000_000
# A JPEG is decoded at a reduced scale (libjpeg's DCT scaling, no smaller than what is
# shown), so a 50 MP phone photo decodes to about 12 MP: its header may say more, and what
# is decoded is held to MAX_PIXELS and the budget below like any other image.
MAX_JPEG_PIXELS = 64_000_000
# What one decode may hold, estimated from the header (_decode_bytes): a 25 MP HEIC in RGB
# (libheif's buffer, then Pillow's copy) fits, as does a 25 MP RGBA PNG. Measured re-encoding
# a 5712 x 4284 photo (peak RSS growth, 2026-12-03): HEIC 177 MB, PNG 140 MB, progressive
# JPEG 94 MB, baseline JPEG 53 MB (decoded at half scale).
DECODE_BUDGET = 208 * MIB
# Images decoded (and re-encoded) at once in a process, whatever the number of requests,
# threads or files per request (up to 20): the others wait their turn (a 24 MP HEIC or PNG
# takes about 3 s, a JPEG 0.5 s). So a worker holds at most about DECODE_SLOTS x
# DECODE_BUDGET of decoded pixels; two keep both cores of the reference host busy. A
# constant, not a setting: the budget above is what to tune.
DECODE_SLOTS = 2
DISPLAY_MAX_SIDE = 2048  # pixels on the long side of what is stored and shown
MAX_JPEG_SCANS = 100  # SOS markers: a normal progressive JPEG has about 10; each costs a pass
# Before its first scan a JPEG is read segment by segment, and stray bytes between segments
# byte by byte, by Pillow's header parser (Python: 1 MiB of 0xFF fill takes it 0.5 s):
# a camera's file has about 10 segments and no stray bytes; more of either is refused.
MAX_JPEG_HEADER_SEGMENTS = 1_000
MAX_JPEG_HEADER_JUNK = 64 * 1024  # bytes
# How long a decode waits for a slot: behind a few 20-photo uploads (a large HEIC takes 3 s,
# two at a time) rather than holding its request, and the thread serving it, without end.
DECODE_WAIT_SECONDS = 30
MAX_IMAGE_BYTES = 50 * MIB  # images are held in memory to decode
JPEG_QUALITY = 85
_PIL_FORMATS = {Kind.JPEG: "JPEG", Kind.PNG: "PNG", Kind.HEIC: "HEIF"}
_DECODING = threading.BoundedSemaphore(DECODE_SLOTS)
_FILL = re.compile(rb"\xff+")  # 0xFF bytes before a marker (fill)
# Frame headers (SOFn): lossless (SOF3, 7, 11, 15) and progressive (SOF2, 6, 10, 14) ones.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # less DHT, JPG, DAC
_LOSSLESS = frozenset({0xC3, 0xC7, 0xCB, 0xCF})
_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
# The modes an ICC profile is applied to, by the profile's colour space, and what they become.
_TO_SRGB = {("RGB", "RGB "): "RGB", ("RGBA", "RGB "): "RGBA", ("CMYK", "CMYK"): "RGB"}


# Pillow's TIFF/EXIF debug records quote every tag, GPS position included: never log them.
logging.getLogger("PIL").setLevel(logging.INFO)

# Thumbnails, depth maps and auxiliary images inside a HEIC are never decoded: only the
# primary image is shown, and each extra image would cost memory. libheif's own security
# limits (image size, tiles, memory) stay on: see _keep_heif_limits.
pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)


@dataclass(frozen=True)
class ImageInfo:
    """A decoded image's type and size in pixels."""

    kind: Kind
    width: int
    height: int


@dataclass(frozen=True)
class DisplayImage:
    """An image re-encoded for inline display: new bytes (sRGB pixels) with no metadata."""

    data: bytes
    media_type: str
    width: int
    height: int


def check_image(data: bytes, kind: Kind) -> ImageInfo:
    """Return the size of the ``kind`` image in ``data``, after decoding every pixel.

    Raises ContentRejected when it is not that format, is damaged or truncated,
    or is larger than MAX_IMAGE_BYTES, MAX_PIXELS or DECODE_BUDGET (a decompression bomb).
    """
    with _decode_slot(), _decode(data, kind) as (_image, size):
        return ImageInfo(kind, *size)


def reencode_for_display(data: bytes, kind: Kind) -> DisplayImage:
    """Return the ``kind`` image in ``data`` re-encoded for inline display.

    The new file holds the pixels, turned upright by the EXIF orientation, in sRGB
    (by the ICC profile; a profile that cannot be read is taken as sRGB), shrunk to
    at most DISPLAY_MAX_SIDE on the long side; nothing else: no EXIF (GPS
    included), XMP, comments or profile. PNG stays PNG (alpha kept); JPEG and HEIC
    become JPEG. Raises ContentRejected as :func:`check_image` does.
    """
    with _decode_slot(), _decode(data, kind) as (decoded, _size):
        try:
            return _reencode(decoded, png=kind is Kind.PNG)
        except LIBRARY_ERRORS:  # a pixel format no display format holds (32-bit float, ...)
            raise _unsupported() from None


@contextlib.contextmanager
def _decode_slot() -> Iterator[None]:
    """Hold one of the DECODE_SLOTS; refuse (try again later) after DECODE_WAIT_SECONDS."""
    if not _DECODING.acquire(timeout=DECODE_WAIT_SECONDS):
        raise _busy()
    try:
        yield
    finally:
        _DECODING.release()


def _reencode(decoded: Image.Image, *, png: bool) -> DisplayImage:
    icc = decoded.info.get("icc_profile")
    pixels = _shrunk(decoded)
    ImageOps.exif_transpose(pixels, in_place=True)  # ours to change; saves a copy
    pixels = _display_pixels(_in_srgb(pixels, icc), png=png)
    pixels.info = {}  # nothing of the original's metadata may ride along, its profile neither
    out = io.BytesIO()
    if png:
        pixels.save(out, "PNG")
    else:
        pixels.save(out, "JPEG", quality=JPEG_QUALITY)
    media_type = "image/png" if png else "image/jpeg"
    return DisplayImage(out.getvalue(), media_type, pixels.width, pixels.height)


def _shrunk(image: Image.Image) -> Image.Image:
    """Return ``image`` (itself, shrunk in place) at most DISPLAY_MAX_SIDE on its long side.

    A 1-bit or palette image, or one with a transparent colour, is made 8-bit (with
    alpha) first, a copy, so that it is resampled rather than thinned out. The EXIF (for
    the orientation) stays in ``info`` until the caller drops it.
    """
    wanted = _made_8_bit(image)
    if wanted is not None:
        image = _with_info(image.convert(wanted), image)
    image.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.Resampling.LANCZOS)
    return image


def _made_8_bit(image: Image.Image) -> str | None:
    """The mode _shrunk copies ``image`` to before shrinking it, or None (shrunk as it is)."""
    if "transparency" in image.info and image.mode in {"1", "L", "P", "RGB"}:
        return "LA" if image.mode in {"1", "L"} else "RGBA"
    return {"1": "L", "P": "RGB", "PA": "RGBA"}.get(image.mode)


def _with_info(converted: Image.Image, original: Image.Image) -> Image.Image:
    converted.info = {k: v for k, v in original.info.items() if k != "transparency"}
    return converted


def _in_srgb(image: Image.Image, icc: object) -> Image.Image:
    """Return ``image`` converted from its ICC profile ``icc`` to sRGB (RGB, RGBA; CMYK
    becomes RGB), or as it is: without a profile, with one that cannot be read or does not
    fit its mode (taken as sRGB, as browsers take an image without one), and for grey."""
    if not isinstance(icc, bytes) or not icc:
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        mode = _TO_SRGB.get((image.mode, source.profile.xcolor_space))
        if mode is None:
            return image
        converted = ImageCms.profileToProfile(image, source, _SRGB, outputMode=mode)
    except LIBRARY_ERRORS:  # PyCMSError, OSError: a profile lcms cannot read or apply
        return image
    assert converted is not None  # None only with inPlace=True
    return converted


@contextlib.contextmanager
def _decode(data: bytes, kind: Kind) -> Iterator[tuple[Image.Image, tuple[int, int]]]:
    """Yield the fully decoded ``kind`` image in ``data`` and its size as its header gives
    it (a JPEG is decoded at a reduced scale); closed after. Raises ContentRejected.

    Pillow's verify() first (PNG: every chunk's CRC), from a first opening, as it
    requires; then a second opening decodes every pixel. The decoded size is checked
    again after decoding: pillow-heif takes the size libheif decodes, which may differ
    from the header's.
    """
    if kind not in IMAGES:
        raise damaged(kind)
    if len(data) > MAX_IMAGE_BYTES:
        raise image_too_large()
    layout = _jpeg_layout(data) if kind is Kind.JPEG else None
    if layout is not None and layout.scans > MAX_JPEG_SCANS:
        raise _too_many_scans()  # each scan is a pass over the whole image (CPU)
    _refuse_truncated()
    _keep_heif_limits()
    # A JPEG is decoded at a reduced scale, so its header may say more; not a lossless one.
    most = MAX_JPEG_PIXELS if layout is not None and not layout.lossless else MAX_PIXELS
    with _open(data, kind, most) as image:
        _guarded(kind, image.verify)
    image = _open(data, kind, most)
    try:
        size = image.size
        if layout is not None and not layout.lossless:
            image.draft(None, _display_size(size))  # a scale no smaller than what is shown
        if _decode_bytes(image, kind, layout, size) > DECODE_BUDGET:
            raise _too_large_to_process()
        _guarded(kind, image.load)  # a truncated or corrupt file fails here
        if _too_many_pixels(image.size) or _too_many_pixels(image.im.size):
            raise _bomb(MAX_PIXELS)
        yield image, size if kind is Kind.JPEG else image.size
    finally:
        image.close()


@dataclass(frozen=True)
class _JpegLayout:
    """What a JPEG's header says, up to its first scan (SOS)."""

    scans: int  # at most: every SOS marker from the first one on
    components: int  # in the frame (SOFn): 1 grey, 3 YCbCr, 4 CMYK
    first_scan_components: int  # fewer than the frame's: one scan per channel
    progressive: bool
    lossless: bool  # SOF3 and co: libjpeg cannot decode it at a reduced scale

    @property
    def full_coefficients(self) -> bool:
        """Whether libjpeg keeps every DCT coefficient of the full-size image while it
        decodes (a multi-scan image: progressive, or one scan per channel), whatever
        the scale it decodes at: 2 bytes a sample."""
        return self.progressive or self.first_scan_components < self.components


def _jpeg_layout(data: bytes) -> _JpegLayout:
    """Read the JPEG header in ``data`` as libjpeg does, up to the first scan (SOS).

    Libjpeg skips stray bytes between segments, 0xFF fill, FF00, TEM and RSTn, so
    this does too (a stop there would leave the rest of the file unread). Marker-like
    bytes inside segments (EXIF, a comment) are skipped with their segment. From the
    first SOS on, every FF DA counts as a scan: entropy-coded data never holds one
    (0xFF is stuffed as FF00), so the count is an upper bound, taken at C speed.
    Libjpeg has no scan limit of its own: thousands of tiny progressive scans make it
    pass over the whole image thousands of times.

    Raises ContentRejected for a header of more than MAX_JPEG_HEADER_SEGMENTS segments
    or MAX_JPEG_HEADER_JUNK stray bytes, and for one with no scan (damaged).
    """
    pos, junk, sof, components = 2, 0, 0, 0  # past SOI
    for _ in range(MAX_JPEG_HEADER_SEGMENTS):
        found = data.find(b"\xff", pos)
        if found < 0:
            break
        fill = _FILL.match(data, found)
        assert fill is not None  # data[found] is 0xFF
        junk += found - pos + fill.end() - found - 1
        pos = fill.end()  # the marker byte
        if junk > MAX_JPEG_HEADER_JUNK:
            raise _unusual_header()
        if pos + 4 > len(data):
            break
        marker = data[pos]
        if marker in {0x00, 0x01} or 0xD0 <= marker <= 0xD8:  # FF00, TEM, RSTn, SOI
            junk += 2
            pos += 1
            continue
        if marker == 0xD9:  # EOI before any scan
            break
        if marker in _SOF and pos + 9 <= len(data):
            sof, components = marker, data[pos + 8]
        if marker == 0xDA:
            return _JpegLayout(
                scans=data.count(b"\xff\xda", pos - 1),
                components=components,
                first_scan_components=data[pos + 3],
                progressive=sof in _PROGRESSIVE,
                lossless=sof in _LOSSLESS,
            )
        pos += 1 + int.from_bytes(data[pos + 1 : pos + 3], "big")
    else:
        raise _unusual_header()
    raise damaged(Kind.JPEG)  # no scan: no pixels


def _display_size(size: tuple[int, int]) -> tuple[int, int]:
    """``size`` fitted within DISPLAY_MAX_SIDE (as ``thumbnail`` will), for a JPEG's draft."""
    width, height = size
    scale = min(1.0, DISPLAY_MAX_SIDE / max(width, height, 1))
    return max(1, int(width * scale)), max(1, int(height * scale))


def _decode_bytes(
    image: Image.Image, kind: Kind, layout: _JpegLayout | None, header_size: tuple[int, int]
) -> int:
    """About the most memory decoding the opened ``image`` takes, from its header alone.

    Pillow stores a pixel in 1 byte (1, L, P), 2 (I;16) or 4 (all other modes, RGB
    included). libheif decodes into a buffer of its own that pillow-heif then copies.
    A 1-bit or palette PNG (or one with a transparent colour) is copied to 8-bit (with
    alpha, 4 bytes a pixel) to be shrunk (_shrunk). A multi-scan JPEG (progressive, or
    one scan per channel) keeps every DCT coefficient of the full-size image, 2 bytes a
    sample of each of its components (4 for CMYK), whatever the scale it is decoded at.
    """
    width, height = image.size
    per_pixel = 1 if image.mode in {"1", "L", "P"} else 2 if image.mode.startswith("I;16") else 4
    if kind is Kind.PNG and _made_8_bit(image) is not None:
        per_pixel += 4
    total = width * height * per_pixel
    if kind is Kind.HEIC:
        total *= 2
    if layout is not None and layout.full_coefficients:
        total += header_size[0] * header_size[1] * 2 * layout.components
    return total


def _too_many_pixels(size: tuple[int, int], most: int | None = None) -> bool:
    return size[0] * size[1] > (MAX_PIXELS if most is None else most)


def _refuse_truncated() -> None:
    """Make Pillow fail on a truncated file again, whoever switched that off.

    WeasyPrint (imported by portal.services.pdf) sets ``LOAD_TRUNCATED_IMAGES = True``
    for the whole process when it is imported, and Pillow then pads a truncated upload
    with grey instead of failing. Our letters embed only the portal's own images, so
    WeasyPrint loses nothing; set before every decode, since the import may come later.
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def _keep_heif_limits() -> None:
    """Keep libheif's security limits (image size, memory) on, whoever switched them off."""
    pillow_heif.options.DISABLE_SECURITY_LIMITS = False


def _open(data: bytes, kind: Kind, most: int) -> Image.Image:
    """Open (read the header of) the ``kind`` image in ``data``; refuse one of more than
    ``most`` pixels (a bomb) by its header."""
    try:
        image = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[kind]])
    except Image.DecompressionBombError:  # Pillow's own limit, far above ours
        raise _bomb(most) from None
    except LIBRARY_ERRORS:
        raise damaged(kind) from None
    if _too_many_pixels(image.size, most):
        image.close()
        raise _bomb(most)
    return image


def _guarded(kind: Kind, step: Callable[[], object]) -> None:
    try:
        step()
    except LIBRARY_ERRORS:
        raise damaged(kind) from None


def _display_pixels(image: Image.Image, *, png: bool) -> Image.Image:
    """Return ``image`` (itself, or a converted copy) in a mode its display format stores:
    alpha kept in PNG, flattened on white for JPEG; palette and other modes made RGB(A).
    16-bit grey is scaled to 8 bits first (a conversion would clip it to 0-255: all but
    black turns white); a transparent colour it has is dropped (a 16-bit value)."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        image = image.convert("I").point(lambda v: v / 257).convert("L")
        image.info.pop("transparency", None)
    alpha = image.mode in {"RGBA", "LA", "PA"} or "transparency" in image.info
    if png and alpha:
        wanted = (
            image.mode if image.mode in {"LA", "RGBA"} else "LA" if image.mode == "L" else "RGBA"
        )
        return image if image.mode == wanted else image.convert(wanted)
    if png:
        return image if image.mode in {"L", "RGB"} else image.convert("RGB")
    if image.mode in {"L", "RGB"}:
        return image
    if alpha:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def image_too_large() -> ContentRejected:
    """The refusal of an image over MAX_IMAGE_BYTES."""
    return ContentRejected(
        f"Images can be at most {MAX_IMAGE_BYTES // MIB} MiB; send a smaller photo.", "too-large"
    )


def _unsupported() -> ContentRejected:
    return ContentRejected(
        "This image's pixel format cannot be shown; save it as an ordinary JPEG or "
        "PNG and upload it again.",
        "unsupported-image",
    )


def _too_many_scans() -> ContentRejected:
    return ContentRejected(
        f"This JPEG is stored in more than {MAX_JPEG_SCANS} passes (progressive scans); "
        "save it again as an ordinary JPEG and upload it again.",
        "unsupported-image",
    )


def _bomb(most: int) -> ContentRejected:
    return ContentRejected(
        f"This image has more than {most // 1_000_000} megapixels; send a smaller photo.",
        "too-many-pixels",
    )


def _too_large_to_process() -> ContentRejected:
    """Over DECODE_BUDGET: within the pixel limits, but its format costs more to decode
    (a progressive or CMYK JPEG, a HEIC). The reason code is the pixel limit's: both are
    a decompression bomb's, and neither is audited."""
    return ContentRejected(
        "This image is too large to process; save it at a lower resolution or as an "
        "ordinary JPEG and upload it again.",
        "too-many-pixels",
    )


def _unusual_header() -> ContentRejected:
    return ContentRejected(
        f"This JPEG's header is unusual (more than {MAX_JPEG_HEADER_SEGMENTS} segments, or "
        "stray bytes); save it again as an ordinary JPEG and upload it again.",
        "unsupported-image",
    )


def _busy() -> ContentRejected:
    return ContentRejected("The server is busy processing photos; try again in a minute.", "busy")
