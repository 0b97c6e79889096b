"""Images decode whole within limits, and re-encoded for display come back as pixels only:
no EXIF, no GPS, no comments, nothing appended; HEIC as JPEG."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageCms

from portal.security import images
from portal.security.content_types import ContentRejected, Kind
from portal.security.images import check_image, reencode_for_display
from tests.support import samples
from tests.support.clamd import EICAR


def test_heic_decodes_and_becomes_jpeg_for_display() -> None:
    data = samples.heic(exif=samples.gps_exif().tobytes())
    info = check_image(data, Kind.HEIC)
    assert (info.width, info.height) == (64, 48)
    display = reencode_for_display(data, Kind.HEIC)
    assert display.media_type == "image/jpeg"
    with Image.open(io.BytesIO(display.data)) as back:
        assert back.format == "JPEG"
        assert back.size == (64, 48)
        assert not back.getexif()
        assert "exif" not in back.info


def test_gps_exif_is_gone_after_reencoding_a_jpeg() -> None:
    original = samples.jpeg(exif=samples.gps_exif().tobytes())
    with Image.open(io.BytesIO(original)) as before:
        assert before.getexif().get_ifd(samples.GPS_IFD)  # the test image does carry GPS
    display = reencode_for_display(original, Kind.JPEG)
    with Image.open(io.BytesIO(display.data)) as back:
        assert back.format == "JPEG"
        assert not back.getexif()
        assert not back.getexif().get_ifd(samples.GPS_IFD)
        assert not {"exif", "xmp", "comment"} & set(back.info)
    assert b"PickupCam" not in display.data
    assert b"Exif\0\0" not in display.data


def test_the_orientation_is_applied_before_exif_goes() -> None:
    # Orientation 6: the camera was turned; shown upright the picture is taller than wide.
    original = samples.jpeg(exif=samples.gps_exif(orientation=6).tobytes())
    display = reencode_for_display(original, Kind.JPEG)
    assert (display.width, display.height) == (48, 64)
    with Image.open(io.BytesIO(display.data)) as back:
        assert back.size == (48, 64)


def test_comments_xmp_and_appended_data_are_gone_and_the_icc_profile_stays() -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">PickupCam location</x:xmpmeta>'
    original = samples.jpeg(icc_profile=icc, comment=b"PickupCam note", xmp=xmp) + EICAR
    display = reencode_for_display(original, Kind.JPEG)
    with Image.open(io.BytesIO(display.data)) as back:
        assert back.info.get("icc_profile") == icc
        assert not {"comment", "xmp", "exif"} & set(back.info)
    assert b"PickupCam" not in display.data
    assert EICAR not in display.data


def test_png_stays_png_with_its_alpha_and_loses_its_text_and_exif() -> None:
    from PIL.PngImagePlugin import PngInfo

    text = PngInfo()
    text.add_text("Comment", "PickupCam")
    image = samples.picture(mode="RGBA")
    original = samples.png(image=image, pnginfo=text, exif=samples.gps_exif().tobytes())
    display = reencode_for_display(original, Kind.PNG)
    assert display.media_type == "image/png"
    with Image.open(io.BytesIO(display.data)) as back:
        assert (back.format, back.mode) == ("PNG", "RGBA")
        assert not back.getexif()
        assert "Comment" not in back.info
    assert b"PickupCam" not in display.data


@pytest.mark.parametrize(
    ("mode", "fmt", "kind", "expected_mode"),
    [
        ("P", "PNG", Kind.PNG, "RGB"),
        ("LA", "PNG", Kind.PNG, "LA"),
        ("L", "JPEG", Kind.JPEG, "L"),
        ("CMYK", "JPEG", Kind.JPEG, "RGB"),
        ("RGBA", "HEIF", Kind.HEIC, "RGB"),
    ],
)
def test_unusual_modes_are_reencoded_into_displayable_ones(
    mode: str, fmt: str, kind: Kind, expected_mode: str
) -> None:
    original = samples.image_file(fmt, samples.picture(mode=mode))
    display = reencode_for_display(original, kind)
    with Image.open(io.BytesIO(display.data)) as back:
        assert back.mode == expected_mode
        assert back.size == (64, 48)


def test_pixels_over_the_limit_are_refused_before_decoding() -> None:
    with pytest.raises(ContentRejected) as rejected:
        check_image(samples.png_bomb(8_000, 8_000), Kind.PNG)
    assert rejected.value.reason == "too-many-pixels"
    assert images.MAX_PIXELS < 8_000 * 8_000


def test_a_grey_png_with_a_transparent_colour_keeps_its_transparency() -> None:
    original = samples.image_file("PNG", samples.picture(mode="L"), transparency=128)
    display = reencode_for_display(original, Kind.PNG)
    with Image.open(io.BytesIO(display.data)) as back:
        assert back.mode == "LA"
        assert "transparency" not in back.info
