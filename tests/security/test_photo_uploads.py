"""Photos through the upload pipeline: the stored blob is the re-encoded image (no EXIF, no
GPS, ever on disk in the clear or in the ciphertext's plaintext), typed by what is stored,
with its own size and SHA-256; the original's temporary blob is gone."""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from portal.security.attachments import Inspected
from portal.security.content_types import Kind, inline_name, is_image, stored_name
from portal.security.images import DisplayImage
from portal.services import pdfcheck
from portal.services.uploads import StagedUpload, Staging, UploadRefused
from portal.storage import FilesystemBlobStore, read_decrypted
from tests.factories import MINIMAL_PDF
from tests.support import samples


@pytest.fixture
def store(tmp_path: Path) -> FilesystemBlobStore:
    return FilesystemBlobStore(tmp_path / "blobs")


def stage(store: FilesystemBlobStore, name: str, data: bytes) -> tuple[Staging, StagedUpload]:
    staging = Staging(store, inspectors=[pdfcheck.AttachmentInspector])
    upload = staging.add(name, io.BytesIO(data))
    return staging, upload


def kept_plaintext(store: FilesystemBlobStore, staging: Staging, upload: StagedUpload) -> bytes:
    (accepted,) = staging.accepted()
    blob_id = accepted.keep()
    return b"".join(read_decrypted(store, staging.key, blob_id, upload.object_id))


def parts(store: FilesystemBlobStore) -> list[Path]:
    return list((store.root / "tmp").glob("*.part"))


def test_a_gps_jpeg_is_stored_re_encoded_without_its_metadata(
    store: FilesystemBlobStore,
) -> None:
    original = samples.jpeg(exif=samples.gps_exif().tobytes())
    assert b"PickupCam" in original
    staging, upload = stage(store, "rash.jpg", original)
    assert len(parts(store)) == 1  # the original's temporary blob was deleted
    stored = kept_plaintext(store, staging, upload)
    assert stored != original
    assert b"PickupCam" not in stored
    assert b"Exif" not in stored
    with Image.open(io.BytesIO(stored)) as image:
        assert image.format == "JPEG"
        assert not image.getexif()
        assert image.size == (64, 48)
    assert (upload.media_type, upload.replaced) == ("image/jpeg", True)
    assert upload.size == len(stored)
    assert upload.sha256 == hashlib.sha256(stored).hexdigest()
    assert parts(store) == []


def test_the_ciphertext_on_disk_holds_none_of_the_photo(store: FilesystemBlobStore) -> None:
    original = samples.png(exif=samples.gps_exif().tobytes())
    staging, upload = stage(store, "rash.png", original)
    (accepted,) = staging.accepted()
    accepted.keep()
    files = [p for p in Path(store.root).rglob("*") if p.is_file()]
    assert len(files) == 1
    on_disk = files[0].read_bytes()
    assert len(on_disk) > upload.size  # the re-encoded image, sealed
    for marker in (b"PickupCam", b"IHDR", b"\x89PNG"):
        assert marker not in on_disk


def test_a_large_photo_is_stored_shrunk(store: FilesystemBlobStore) -> None:
    grey = Image.linear_gradient("L").resize((4000, 3000))
    original = samples.image_file("JPEG", Image.merge("RGB", (grey, grey, grey)))
    staging, upload = stage(store, "rash.jpg", original)
    stored = kept_plaintext(store, staging, upload)
    with Image.open(io.BytesIO(stored)) as image:
        assert image.size == (2048, 1536)  # DISPLAY_MAX_SIDE on the long side
    assert upload.size == len(stored)
    staging.discard()


def test_the_stored_photos_plaintext_is_not_kept_in_the_findings(
    store: FilesystemBlobStore,
) -> None:
    staging, upload = stage(store, "rash.jpg", samples.jpeg())
    assert upload.replaced
    (found,) = [f for f in upload.findings if isinstance(f, Inspected)]
    assert (found.kind, found.display, found.replacement) == (Kind.JPEG, None, None)
    assert not [f for f in upload.findings if isinstance(f, bytes | DisplayImage)]
    staging.discard()


def test_an_icc_profile_is_not_stored(store: FilesystemBlobStore) -> None:
    staging, upload = stage(store, "rash.png", samples.png(icc_profile=b"PickupCam" * 50))
    stored = kept_plaintext(store, staging, upload)
    assert b"PickupCam" not in stored
    with Image.open(io.BytesIO(stored)) as image:
        assert "icc_profile" not in image.info
    staging.discard()


def test_a_heic_photo_is_stored_as_jpeg(store: FilesystemBlobStore) -> None:
    staging, upload = stage(store, "rash.heic", samples.heic(exif=samples.gps_exif().tobytes()))
    stored = kept_plaintext(store, staging, upload)
    with Image.open(io.BytesIO(stored)) as image:
        assert image.format == "JPEG"
        assert not image.getexif()
    assert upload.media_type == "image/jpeg"
    assert stored_name(upload.name, upload.media_type) == "rash.jpg"


def test_a_pdf_is_stored_as_uploaded_and_typed(store: FilesystemBlobStore) -> None:
    staging, upload = stage(store, "letter.pdf", MINIMAL_PDF)
    assert kept_plaintext(store, staging, upload) == MINIMAL_PDF
    assert (upload.media_type, upload.replaced) == ("application/pdf", False)
    assert upload.sha256 == hashlib.sha256(MINIMAL_PDF).hexdigest()


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("rash.jpg", MINIMAL_PDF, "does not match its name"),
        ("rash.jpg", b"<html><script>alert(1)</script></html>", "This file is not a JPEG file."),
        ("rash.jpg", samples.jpeg()[:300], "may be damaged"),
        ("rash.jpg", b"", "This file is empty."),
        ("rash.png", samples.png_bomb(9_000, 9_000), "megapixels"),
        ("rash.png", samples.png_bomb(7_070, 7_070), "more than 25 megapixels"),  # 50 MP
        ("rash.exe", b"MZ\x90\x00", "Only PDF, JPEG, PNG and HEIC files can be attached."),
    ],
    ids=["pdf-as-jpg", "html-as-jpg", "truncated", "empty", "bomb", "50-mp", "exe"],
)
def test_a_refused_file_leaves_nothing(
    store: FilesystemBlobStore, name: str, data: bytes, message: str
) -> None:
    staging, upload = stage(store, name, data)
    with pytest.raises(UploadRefused) as refused:
        staging.accepted()
    assert message in str(refused.value)
    assert upload.replaced is False
    assert parts(store) == []  # gone when refused, not only once the request ends
    assert list(store.iter_ids()) == []
    staging.discard()


def test_stored_names_follow_the_stored_type() -> None:
    assert stored_name("IMG_0001.HEIC", "image/jpeg") == "IMG_0001.jpg"
    assert stored_name("rash.JPG", "image/jpeg") == "rash.JPG"
    assert stored_name("scan.png", "image/png") == "scan.png"
    assert stored_name("letter.pdf", "application/pdf") == "letter.pdf"
    assert stored_name("photo", "image/jpeg") == "photo.jpg"
    assert (inline_name("image/jpeg"), inline_name("image/png")) == ("photo.jpg", "photo.png")
    assert [is_image(t) for t in ("image/jpeg", "image/png", "image/heic", None)] == [
        True,
        True,
        False,
        False,
    ]


def test_a_truncated_photo_is_refused_after_weasyprint_switched_truncation_off(
    store: FilesystemBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import portal.services.pdf  # noqa: F401  (imports WeasyPrint, as the web app does)

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # what WeasyPrint leaves
    staging, _upload = stage(store, "rash.jpg", samples.jpeg()[:-200])
    with pytest.raises(UploadRefused, match="may be damaged"):
        staging.accepted()
    staging.discard()
    assert parts(store) == []


def test_decoding_a_photo_logs_none_of_its_metadata(
    store: FilesystemBlobStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    staging, upload = stage(store, "rash.jpg", samples.jpeg(exif=samples.gps_exif().tobytes()))
    assert upload.replaced
    for leak in ("PickupCam", "GPS", "51.0"):
        assert leak not in caplog.text
    staging.discard()
