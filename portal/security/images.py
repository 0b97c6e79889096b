"""Images (JPEG, PNG, HEIC) decoded whole within limits, and re-encoded for inline display.

:func:`check_image` decodes every pixel with Pillow (pillow-heif for HEIC): a
damaged or truncated file fails, and one with more than MAX_PIXELS is refused
from its header, before any decoding (a decompression bomb). Images are decoded
in memory, so they are also capped in bytes (MAX_IMAGE_BYTES).

:func:`reencode_for_display` keeps only the pixels (turned upright) and the
colour profile: EXIF (GPS location included), XMP, comments and anything
appended are gone, and HEIC becomes JPEG (OWASP File Upload Cheat Sheet: "image
rewriting").
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass

import pillow_heif
from PIL import Image, ImageFile, ImageOps

from portal.security.content_types import (
    IMAGES,
    LIBRARY_ERRORS,
    MIB,
    ContentRejected,
    Kind,
    damaged,
)

MAX_PIXELS = 50_000_000  # a 48-megapixel phone photo fits; decoding one takes ~150 MB
MAX_IMAGE_BYTES = 50 * MIB  # images are held in memory to decode
JPEG_QUALITY = 85
_PIL_FORMATS = {Kind.JPEG: "JPEG", Kind.PNG: "PNG", Kind.HEIC: "HEIF"}
# Colour spaces whose ICC profile still fits after converting to the display mode.
_FAMILIES = {"1": "gray", "L": "gray", "LA": "gray", "RGB": "rgb", "RGBA": "rgb", "P": "rgb"}


# Pillow's TIFF/EXIF debug records quote every tag, GPS position included: never log them.
logging.getLogger("PIL").setLevel(logging.INFO)

# Thumbnails, depth maps and auxiliary images inside a HEIC are never decoded: only the
# primary image is shown, and each extra image would cost memory.
pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)


@dataclass(frozen=True)
class ImageInfo:
    """A decoded image's type and size in pixels."""

    kind: Kind
    width: int
    height: int


@dataclass(frozen=True)
class DisplayImage:
    """An image re-encoded for inline display: new bytes with no metadata but the ICC profile."""

    data: bytes
    media_type: str
    width: int
    height: int


def check_image(data: bytes, kind: Kind) -> ImageInfo:
    """Return the size of the ``kind`` image in ``data``, after decoding every pixel.

    Raises ContentRejected when it is not that format, is damaged or truncated,
    or is larger than MAX_IMAGE_BYTES or MAX_PIXELS (a decompression bomb).
    """
    with _decode(data, kind) as image:
        return ImageInfo(kind, image.width, image.height)


def reencode_for_display(data: bytes, kind: Kind) -> DisplayImage:
    """Return the ``kind`` image in ``data`` re-encoded for inline display.

    The new file holds the pixels, turned upright by the EXIF orientation, and the
    ICC colour profile, nothing else: no EXIF (GPS included), XMP or comments.
    PNG stays PNG (alpha kept); JPEG and HEIC become JPEG. Raises ContentRejected
    as :func:`check_image` does.
    """
    with _decode(data, kind) as decoded:
        try:
            return _reencode(decoded, png=kind is Kind.PNG)
        except LIBRARY_ERRORS:  # a pixel format no display format holds (32-bit float, ...)
            raise ContentRejected(
                "This image's pixel format cannot be shown; save it as an ordinary JPEG or "
                "PNG and upload it again.",
                "unsupported-image",
            ) from None


def _reencode(decoded: Image.Image, *, png: bool) -> DisplayImage:
    icc = decoded.info.get("icc_profile")
    source_family = _FAMILIES.get(decoded.mode)
    ImageOps.exif_transpose(decoded, in_place=True)  # ours to change; saves a copy
    pixels = _display_pixels(decoded, png=png)
    keep_icc = source_family is not None and source_family == _FAMILIES.get(pixels.mode)
    pixels.info = {}  # nothing of the original's metadata may ride along
    options: dict[str, object] = {"icc_profile": icc} if keep_icc and icc else {}
    out = io.BytesIO()
    if png:
        pixels.save(out, "PNG", **options)
    else:
        pixels.save(out, "JPEG", quality=JPEG_QUALITY, **options)
    media_type = "image/png" if png else "image/jpeg"
    return DisplayImage(out.getvalue(), media_type, pixels.width, pixels.height)


def _decode(data: bytes, kind: Kind) -> Image.Image:
    """Return the fully decoded ``kind`` image in ``data`` (close it); raises ContentRejected.

    Pillow's verify() first (PNG: every chunk's CRC), from a first opening, as it
    requires; then a second opening decodes every pixel.
    """
    if kind not in IMAGES:
        raise damaged(kind)
    if len(data) > MAX_IMAGE_BYTES:
        raise image_too_large()
    _refuse_truncated()
    with _open(data, kind) as image:
        _guarded(kind, image.verify)
    image = _open(data, kind)
    try:
        _guarded(kind, image.load)  # a truncated or corrupt file fails here
    except ContentRejected:
        image.close()
        raise
    return image


def _refuse_truncated() -> None:
    """Make Pillow fail on a truncated file again, whoever switched that off.

    WeasyPrint (imported by portal.services.pdf) sets ``LOAD_TRUNCATED_IMAGES = True``
    for the whole process when it is imported, and Pillow then pads a truncated upload
    with grey instead of failing. Our letters embed only the portal's own images, so
    WeasyPrint loses nothing; set before every decode, since the import may come later.
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def _open(data: bytes, kind: Kind) -> Image.Image:
    """Open (read the header of) the ``kind`` image in ``data``; refuse a bomb by its header."""
    try:
        image = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[kind]])
    except Image.DecompressionBombError:  # Pillow's own limit, far above ours
        raise _bomb() from None
    except LIBRARY_ERRORS:
        raise damaged(kind) from None
    if image.width * image.height > MAX_PIXELS:
        image.close()
        raise _bomb()
    return image


def _guarded(kind: Kind, step: Callable[[], object]) -> None:
    try:
        step()
    except LIBRARY_ERRORS:
        raise damaged(kind) from None


def _display_pixels(image: Image.Image, *, png: bool) -> Image.Image:
    """Return ``image`` (itself, or a converted copy) in a mode its display format stores:
    alpha kept in PNG, flattened on white for JPEG; palette and other modes made RGB(A)."""
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


def _bomb() -> ContentRejected:
    return ContentRejected(
        f"This image has more than {MAX_PIXELS // 1_000_000} megapixels; send a smaller photo.",
        "too-many-pixels",
    )
