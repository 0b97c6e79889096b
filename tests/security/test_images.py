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
    # Not "more than 25 megapixels": a 1 MP image is refused by the budget alone.
    assert str(rejected.value) == (
        "This image is too large to process; save it at a lower resolution or as an "
        "ordinary JPEG and upload it again."
    )
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
    assert 5 < images._jpeg_layout(progressive).scans <= 20
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


# A flat grey JPEG written by hand, for the layouts Pillow does not write: one scan per
# channel, CMYK progressive, lossless. Every block's DC difference is 0 (code 00 in the
# standard luminance DC table) and its AC coefficients are all zero (EOB, code 1010).
_DC_BITS = bytes([0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
_AC_BITS = bytes([0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D])
_AC_VALUES = bytes.fromhex(
    "01020300041105122131410613516107227114328191a1082342b1c11552d1f0243362728209"
    "0a161718191a25262728292a3435363738393a434445464748494a535455565758595a636465"
    "666768696a737475767778797a838485868788898a92939495969798999aa2a3a4a5a6a7a8a9"
    "aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9ea"
    "f1f2f3f4f5f6f7f8f9fa"
)


def _segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body


def _entropy(blocks: int, bits: str) -> bytes:
    """``blocks`` blocks each coded as ``bits``, padded with 1 bits (never a 0xFF byte)."""
    repeat = next(n for n in range(1, 9) if n * len(bits) % 8 == 0)  # blocks a whole byte
    whole, rest = divmod(blocks, repeat)
    unit = int(bits * repeat, 2).to_bytes(len(bits) * repeat // 8, "big")
    tail = bits * rest
    tail += "1" * (-len(tail) % 8)
    return unit * whole + (int(tail, 2).to_bytes(len(tail) // 8, "big") if tail else b"")


def flat_jpeg(width: int, height: int, components: int, layout: str) -> bytes:
    """A flat grey JPEG: ``layout`` "interleaved" (one scan, as cameras write),
    "per-channel" (sequential, one scan per component) or "progressive" (a DC scan)."""
    frame = bytes([8]) + height.to_bytes(2, "big") + width.to_bytes(2, "big")
    frame += bytes([components]) + b"".join(bytes([c + 1, 0x11, 0]) for c in range(components))
    sof = 0xC2 if layout == "progressive" else 0xC0
    out = b"\xff\xd8" + _segment(0xDB, b"\x00" + b"\x01" * 64) + _segment(sof, frame)
    out += _segment(0xC4, b"\x00" + _DC_BITS + bytes(range(12)))
    out += _segment(0xC4, b"\x10" + _AC_BITS + _AC_VALUES)
    blocks = -(-width // 8) * -(-height // 8)
    everyone = bytes([components]) + b"".join(bytes([c + 1, 0]) for c in range(components))
    if layout == "progressive":  # DC only: Ss = Se = 0
        out += _segment(0xDA, everyone + b"\x00\x00\x00") + _entropy(blocks * components, "00")
    elif layout == "interleaved":
        out += _segment(0xDA, everyone + b"\x00\x3f\x00") + _entropy(blocks * components, "001010")
    else:
        for c in range(components):
            out += _segment(0xDA, bytes([1, c + 1, 0, 0x00, 0x3F, 0x00]))
            out += _entropy(blocks, "001010")
    return out + b"\xff\xd9"


def lossless_jpeg(width: int, height: int) -> bytes:
    """A flat grey lossless JPEG (SOF3; Pillow cannot write one): every difference 0."""
    frame = bytes([8]) + height.to_bytes(2, "big") + width.to_bytes(2, "big") + b"\x01\x01\x11\x00"
    out = b"\xff\xd8" + _segment(0xC3, frame)
    out += _segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")  # one code, "0": diff 0
    out += _segment(0xDA, b"\x01\x01\x00\x01\x00\x00")  # predictor 1
    return out + b"\x00" * -(-width * height // 8) + b"\xff\xd9"


def _run(script: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=300,
    )
    return done.stdout


def test_a_multi_scan_jpeg_is_costed_at_its_full_size_coefficients() -> None:
    """libjpeg keeps every coefficient of a multi-scan JPEG (progressive, or one scan per
    channel), 2 bytes a sample of each component, whatever the scale it decodes at. Before,
    8000 x 8000 in one scan per channel (2.2 MB) took 426 MB to re-encode, in CMYK 547 MB,
    and a 5477 x 5477 progressive CMYK one 259 MB: now refused from the header."""
    out = _run(
        """
        import resource
        from portal.security.content_types import ContentRejected, Kind
        from portal.security.images import check_image, reencode_for_display
        from tests.security.test_images import flat_jpeg

        files = [
            flat_jpeg(8000, 8000, 3, "per-channel"),
            flat_jpeg(8000, 8000, 4, "per-channel"),
            flat_jpeg(5477, 5477, 4, "progressive"),
        ]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for data in files:
            try:
                reencode_for_display(data, Kind.JPEG)
                print("accepted")
            except ContentRejected as refused:
                print(refused.reason, str(refused).startswith("This image is too large"))
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        # The same size in one scan, as cameras write it, is taken (decoded at 1/4 scale).
        ordinary = reencode_for_display(flat_jpeg(8000, 8000, 3, "interleaved"), Kind.JPEG)
        print(ordinary.width, ordinary.height)
        """
    ).splitlines()
    assert out[:3] == ["too-many-pixels True"] * 3
    assert int(out[3]) < 20 * 1024  # KiB: refused before decoding
    assert out[4] == "2048 2048"


def test_the_decode_budget_counts_the_coefficients_of_a_progressive_jpeg(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = samples.image_file("JPEG", gradient((640, 480)), progressive=True)
    cost = 640 * 480 * 4 + 640 * 480 * 2 * 3  # RGB pixels, and YCbCr coefficients
    monkeypatch.setattr(images, "DECODE_BUDGET", cost - 1)
    with pytest.raises(ContentRejected) as rejected:
        check_image(original, Kind.JPEG)
    assert str(rejected.value).startswith("This image is too large to process")
    monkeypatch.setattr(images, "DECODE_BUDGET", cost)
    assert check_image(original, Kind.JPEG).width == 640


def test_the_decode_budget_counts_libheifs_buffer_and_pillows_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = samples.heic()
    cost = 64 * 48 * 4 * 2
    monkeypatch.setattr(images, "DECODE_BUDGET", cost - 1)
    with pytest.raises(ContentRejected) as rejected:
        check_image(original, Kind.HEIC)
    assert str(rejected.value).startswith("This image is too large to process")
    monkeypatch.setattr(images, "DECODE_BUDGET", cost)
    assert check_image(original, Kind.HEIC).width == 64


def test_the_decode_budget_counts_the_8_bit_copy_of_a_palette_png(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = samples.image_file("PNG", gradient((1000, 1000), "P"))
    cost = 1000 * 1000 * (1 + 4)  # palette indices, then the RGB copy that is shrunk
    monkeypatch.setattr(images, "DECODE_BUDGET", cost - 1)
    with pytest.raises(ContentRejected):
        reencode_for_display(original, Kind.PNG)
    monkeypatch.setattr(images, "DECODE_BUDGET", cost)
    assert reencode_for_display(original, Kind.PNG).width == 1000


def test_the_decoded_size_is_checked_again_after_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    # Drafted at half scale for a 2048-pixel display: decoded 2050 x 50, header 4100 x 100.
    original = samples.image_file("JPEG", gradient((4100, 100)))
    monkeypatch.setattr(images, "MAX_PIXELS", 2050 * 50 - 1)
    with pytest.raises(ContentRejected) as rejected:
        check_image(original, Kind.JPEG)
    assert rejected.value.reason == "too-many-pixels"
    monkeypatch.setattr(images, "MAX_PIXELS", 2050 * 50)
    assert check_image(original, Kind.JPEG).width == 4100


def test_stray_bytes_do_not_hide_scans_from_the_count() -> None:
    # libjpeg (and Pillow) skip a stray byte between segments; the count stopped there.
    data = many_scans(101)
    after_app0 = 4 + int.from_bytes(data[4:6], "big")
    assert data[2:4] == b"\xff\xe0"
    with pytest.raises(ContentRejected) as rejected:
        check_image(data[:after_app0] + b"\x00" + data[after_app0:], Kind.JPEG)
    assert "more than 100 passes" in str(rejected.value)
    # One stray byte in an ordinary JPEG is still taken, as libjpeg takes it.
    plain = samples.jpeg()
    assert check_image(plain[:after_app0] + b"\x00" + plain[after_app0:], Kind.JPEG).width == 64


@pytest.mark.parametrize(
    "body",
    [b"\xff" * (45 << 20), b"\xff\xfe\x00\x02" * (45 << 18), b"\xff\xd0" * (45 << 19)],
    ids=["fill", "empty-comments", "restart-markers"],
)
def test_a_header_of_45_mib_of_markers_or_fill_is_refused_fast(body: bytes) -> None:
    # Idle, 2026-12-03: about 0.03 s each (the Python walk took 5-9 s, and Pillow's own
    # header parser as long again); the bound is generous for a loaded shared machine.
    data = b"\xff\xd8" + body
    started = time.perf_counter()
    with pytest.raises(ContentRejected):
        check_image(data, Kind.JPEG)
    assert time.perf_counter() - started < 2


def test_16_bit_grey_png_is_scaled_to_8_bits_not_clipped_white() -> None:
    ramp = b"".join((v * 257).to_bytes(2, "little") for v in range(256))
    buffer = io.BytesIO()
    Image.frombytes("I;16", (256, 4), ramp * 4).save(buffer, "PNG")
    display = reencode_for_display(buffer.getvalue(), Kind.PNG)
    with Image.open(io.BytesIO(display.data)) as back:
        assert back.mode == "L"
        assert [back.getpixel((x, 0)) for x in (0, 64, 128, 255)] == [0, 64, 128, 255]


def test_a_decode_waits_for_a_slot_only_so_long(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "DECODE_WAIT_SECONDS", 0.2)
    held = 0
    try:
        for _ in range(images.DECODE_SLOTS):  # both slots busy with other photos
            assert images._DECODING.acquire(timeout=5)
            held += 1
        started = time.perf_counter()
        with pytest.raises(ContentRejected) as rejected:
            check_image(samples.png(), Kind.PNG)
        assert time.perf_counter() - started < 5
    finally:
        for _ in range(held):
            images._DECODING.release()
    assert rejected.value.reason == "busy"
    assert str(rejected.value) == "The server is busy processing photos; try again in a minute."
    assert check_image(samples.png(), Kind.PNG).width == 64  # the slots are free again


def test_a_lossless_jpeg_is_decoded_whole_within_the_ordinary_limit() -> None:
    # libjpeg cannot decode lossless JPEG at a reduced scale: it was refused as damaged.
    display = reencode_for_display(lossless_jpeg(3000, 2000), Kind.JPEG)
    assert (display.width, display.height) == (2048, 1365)
    with pytest.raises(ContentRejected) as rejected:
        check_image(lossless_jpeg(6000, 4500), Kind.JPEG)  # 27 MP: not decoded at 1/4
    assert "more than 25 megapixels" in str(rejected.value)
