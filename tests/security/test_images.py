"""Images decode whole within limits, and re-encoded for display come back as pixels only:
no EXIF, no GPS, no comments, nothing appended; HEIC as JPEG."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pillow_heif
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


def test_comments_xmp_appended_data_and_the_icc_profile_are_gone() -> None:
    # A profile lcms reads, with the uploader's bytes after it: the pixels are converted
    # to sRGB by it, and the profile is not kept (issue 14 item 4: it was copied verbatim).
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes() + b"PickupCam" * 20
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">PickupCam location</x:xmpmeta>'
    original = samples.jpeg(icc_profile=icc, comment=b"PickupCam note", xmp=xmp) + EICAR
    display = reencode_for_display(original, Kind.JPEG)
    with Image.open(io.BytesIO(display.data)) as back:
        assert not {"comment", "xmp", "exif", "icc_profile"} & set(back.info)
        pixel = back.convert("RGB").getpixel((40, 30))
    with Image.open(io.BytesIO(original)) as before:
        expected = before.convert("RGB").getpixel((40, 30))
    assert isinstance(pixel, tuple)
    assert isinstance(expected, tuple)
    assert all(abs(p - e) <= 8 for p, e in zip(pixel, expected, strict=True))  # sRGB to sRGB
    assert b"PickupCam" not in display.data
    assert EICAR not in display.data


@pytest.mark.parametrize(("fmt", "kind"), [("JPEG", Kind.JPEG), ("PNG", Kind.PNG)])
def test_an_icc_profile_that_is_not_one_is_dropped_not_copied(fmt: str, kind: Kind) -> None:
    junk = b"PickupCam<script>" * 40  # no ICC header: lcms cannot read it
    original = samples.image_file(fmt, icc_profile=junk)
    with Image.open(io.BytesIO(original)) as before:
        assert before.info["icc_profile"] == junk  # the test file does carry it
    display = reencode_for_display(original, kind)
    with Image.open(io.BytesIO(display.data)) as back:
        assert "icc_profile" not in back.info
        assert back.size == (64, 48)
    assert b"PickupCam" not in display.data


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


def gradient(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A ``size`` image made fast (``samples.picture`` sets pixels one by one)."""
    grey = Image.linear_gradient("L").resize(size)
    return Image.merge("RGB", (grey, grey.transpose(Image.Transpose.ROTATE_180), grey)).convert(
        mode
    )


@pytest.mark.parametrize(
    ("fmt", "kind", "mode"),
    [("JPEG", Kind.JPEG, "RGB"), ("PNG", Kind.PNG, "RGBA"), ("PNG", Kind.PNG, "P")],
)
def test_a_large_photo_is_shrunk_for_display_and_its_size_still_told(
    fmt: str, kind: Kind, mode: str
) -> None:
    original = samples.image_file(fmt, gradient((4200, 2800), mode))
    assert check_image(original, kind) == images.ImageInfo(kind, 4200, 2800)
    display = reencode_for_display(original, kind)
    assert (display.width, display.height) == (2048, 1365)
    with Image.open(io.BytesIO(display.data)) as back:
        assert back.size == (2048, 1365)
        back.load()


def test_a_tall_photo_is_shrunk_on_its_long_side_after_turning_upright() -> None:
    exif = samples.gps_exif(orientation=6).tobytes()  # stored 3000 x 1000, shown 1000 x 3000
    original = samples.image_file("JPEG", gradient((3000, 1000)), exif=exif)
    display = reencode_for_display(original, Kind.JPEG)
    assert (display.width, display.height) == (683, 2048)


def test_a_bomb_is_refused_from_its_header_without_decoding() -> None:
    # In a process of its own, for its peak memory (ru_maxrss): a 7070 x 7070 PNG (50 MP,
    # 6 KB on disk) passed the old 50 MP limit and took ~240 MB to re-encode.
    script = textwrap.dedent(
        """
        import resource
        from portal.security.content_types import ContentRejected, Kind
        from portal.security.images import reencode_for_display
        from tests.support import samples

        bomb = samples.png_bomb(7070, 7070)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            reencode_for_display(bomb, Kind.PNG)
            reason = "accepted"
        except ContentRejected as refused:
            reason = refused.reason
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(reason, grown)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    reason, grown_kib = done.stdout.split()
    assert reason == "too-many-pixels"
    assert int(grown_kib) < 20 * 1024  # KiB: nothing decoded


def test_the_decode_budget_refuses_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    original = samples.image_file("PNG", gradient((1000, 1000)))
    monkeypatch.setattr(images, "DECODE_BUDGET", 1000 * 1000 * 4 - 1)  # RGB: 4 bytes a pixel
    with pytest.raises(ContentRejected) as rejected:
        check_image(original, Kind.PNG)
    assert rejected.value.reason == "too-many-pixels"
    monkeypatch.setattr(images, "DECODE_BUDGET", 1000 * 1000 * 4)
    assert check_image(original, Kind.PNG).width == 1000


def many_scans(count: int) -> bytes:
    """A JPEG whose one scan is repeated ``count`` times (progressive JPEGs have about 10)."""
    data = samples.jpeg()
    sos, eoi = data.index(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:sos] + data[sos:eoi] * count + data[eoi:]


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding() -> None:
    with pytest.raises(ContentRejected) as rejected:
        check_image(many_scans(101), Kind.JPEG)  # MAX_JPEG_SCANS + 1
    assert "more than 100 passes" in str(rejected.value)
    progressive = samples.image_file("JPEG", gradient((640, 480)), progressive=True)
    assert 5 < images._jpeg_scans(progressive) <= 20
    assert check_image(progressive, Kind.JPEG).width == 640
    # Marker-like bytes in a comment or EXIF are not scans.
    commented = samples.jpeg(comment=b"\xff\xda" * 300, exif=samples.gps_exif().tobytes())
    assert check_image(commented, Kind.JPEG).width == 64


def test_libheifs_security_limits_are_put_back_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pillow_heif.options, "DISABLE_SECURITY_LIMITS", True)
    check_image(samples.heic(), Kind.HEIC)
    assert pillow_heif.options.DISABLE_SECURITY_LIMITS is False


def test_images_are_decoded_two_at_a_time_at_most() -> None:
    # Twenty files of a request, several requests: each waits for one of DECODE_SLOTS.
    data = samples.png()
    busy = 0
    most = 0
    lock = threading.Lock()
    real_decode = images._decode

    @contextlib.contextmanager
    def counting(data: bytes, kind: Kind) -> Iterator[object]:
        nonlocal busy, most
        with lock:
            busy += 1
            most = max(most, busy)
        try:
            time.sleep(0.02)
            with real_decode(data, kind) as decoded:  # the real decode, watched
                yield decoded
        finally:
            with lock:
                busy -= 1

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(images, "_decode", counting)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: check_image(data, Kind.PNG), range(16)))
    assert most == images.DECODE_SLOTS == 2


def _jpeg_sized(width: int, height: int) -> bytes:
    """A small baseline JPEG whose frame header claims ``width`` x ``height``."""
    data = bytearray(samples.jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_a_jpeg_header_past_the_jpeg_limit_is_refused() -> None:
    with pytest.raises(ContentRejected) as rejected:
        check_image(_jpeg_sized(9_000, 8_000), Kind.JPEG)  # 72 MP
    assert rejected.value.reason == "too-many-pixels"
    assert "more than 64 megapixels" in str(rejected.value)


def test_a_50_megapixel_phone_jpeg_is_taken_decoded_at_a_reduced_scale(tmp_path: Path) -> None:
    """A phone's 50 MP mode is a patient's ordinary photo: taken, shrunk for display, and
    decoded at a quarter scale (libjpeg), so a worker's memory barely moves."""
    photo = tmp_path / "photo.jpg"
    Image.new("L", (8_192, 6_144), 128).save(photo, "JPEG", quality=60)  # 50.3 MP
    script = textwrap.dedent(
        f"""
        import resource
        from pathlib import Path
        from PIL import Image
        import io
        from portal.security.content_types import Kind
        from portal.security.images import check_image, reencode_for_display

        data = Path({str(photo)!r}).read_bytes()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        info = check_image(data, Kind.JPEG)
        shown = reencode_for_display(data, Kind.JPEG)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        with Image.open(io.BytesIO(shown.data)) as back:
            print(info.width, info.height, *back.size, grown)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    width, height, shown_width, shown_height, grown_kib = map(int, done.stdout.split())
    assert (width, height) == (8_192, 6_144)
    assert (shown_width, shown_height) == (2_048, 1_536)
    assert grown_kib < 40 * 1024  # KiB: a full decode in grey alone would be 50 MB
