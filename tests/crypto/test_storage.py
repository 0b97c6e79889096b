"""The filesystem blob store, and streaming encryption through it."""

from __future__ import annotations

import gc
import hashlib
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from portal.crypto.errors import ContentTampered
from portal.crypto.stream import SEGMENT_SIZE, ciphertext_size, plaintext_size
from portal.storage import (
    BlobNotFound,
    FilesystemBlobStore,
    put_encrypted,
    read_decrypted,
)

KEY = bytes(range(32))
MIB = 1024 * 1024


@pytest.fixture
def store(tmp_path: Path) -> FilesystemBlobStore:
    return FilesystemBlobStore(tmp_path / "blobs")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_put_open_size_exists_delete(store: FilesystemBlobStore) -> None:
    blob_id = store.put([b"abc", b"", b"def"])
    assert len(blob_id) == 32
    assert int(blob_id, 16) >= 0
    assert store.exists(blob_id)
    assert store.size(blob_id) == 6
    with store.open(blob_id) as handle:
        assert handle.read() == b"abcdef"
    assert list(store.iter_ids()) == [blob_id]
    store.delete(blob_id)
    assert not store.exists(blob_id)
    store.delete(blob_id)  # idempotent
    assert list(store.iter_ids()) == []


def test_layout_and_modes(store: FilesystemBlobStore, tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        open_store = FilesystemBlobStore(tmp_path / "open")
        blob_id = open_store.put([b"x"])
    finally:
        os.umask(previous)
    path = open_store.root / blob_id[:2] / blob_id
    assert path.is_file()
    assert mode(open_store.root) == 0o700
    assert mode(path.parent) == 0o700
    assert mode(open_store.root / "tmp") == 0o700
    assert mode(path) == 0o600


def test_ids_are_random_and_distinct(store: FilesystemBlobStore) -> None:
    ids = {store.put([b"same"]) for _ in range(20)}
    assert len(ids) == 20
    assert sorted(store.iter_ids()) == sorted(ids)


def test_missing_blob_is_not_found(store: FilesystemBlobStore) -> None:
    missing = "0" * 32
    with pytest.raises(BlobNotFound):
        store.open(missing)
    with pytest.raises(KeyError):
        store.size(missing)
    assert not store.exists(missing)


@pytest.mark.parametrize(
    "bad_id", ["../../etc/passwd", "", "A" * 32, "0" * 31, "0" * 33, "0" * 30 + "/x", "g" * 32]
)
def test_bad_ids_are_rejected(store: FilesystemBlobStore, bad_id: str) -> None:
    for operation in (store.open, store.delete, store.exists, store.size):
        with pytest.raises(ValueError, match="blob id"):
            operation(bad_id)


def test_failed_put_leaves_no_file(store: FilesystemBlobStore) -> None:
    def failing() -> Iterator[bytes]:
        yield b"x" * 1000
        raise RuntimeError("upload aborted")

    with pytest.raises(RuntimeError, match="upload aborted"):
        store.put(failing())
    assert files_under(store.root) == []
    assert list(store.iter_ids()) == []


def test_failed_encrypted_put_leaves_no_file(store: FilesystemBlobStore) -> None:
    def failing() -> Iterator[bytes]:
        yield os.urandom(SEGMENT_SIZE * 2)
        raise OSError("client went away")

    with pytest.raises(OSError, match="client went away"):
        put_encrypted(store, KEY, "attachment-1", failing())
    assert files_under(store.root) == []


def test_sweep_temp_removes_only_stale_files(store: FilesystemBlobStore) -> None:
    stale, fresh = store.root / "tmp" / "a.part", store.root / "tmp" / "b.part"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert store.sweep_temp(3600) == 1
    assert not stale.exists()
    assert fresh.exists()


def test_encrypted_round_trip_and_closing(store: FilesystemBlobStore) -> None:
    plaintext = os.urandom(SEGMENT_SIZE + 10)
    blob_id = put_encrypted(store, KEY, "attachment-1", [plaintext])
    assert store.size(blob_id) == ciphertext_size(len(plaintext))
    assert plaintext_size(store.size(blob_id)) == len(plaintext)
    with store.open(blob_id) as handle:
        assert plaintext not in handle.read()
    segments = read_decrypted(store, KEY, blob_id, "attachment-1")
    assert b"".join(segments) == plaintext
    assert segments._handle.closed  # type: ignore[attr-defined]


def test_read_decrypted_close_releases_file(store: FilesystemBlobStore) -> None:
    blob_id = put_encrypted(store, KEY, "attachment-1", [os.urandom(SEGMENT_SIZE * 3)])
    segments = read_decrypted(store, KEY, blob_id, "attachment-1")
    next(segments)
    segments.close()  # type: ignore[attr-defined]
    assert segments._handle.closed  # type: ignore[attr-defined]


def test_read_decrypted_under_other_object_is_tampered(store: FilesystemBlobStore) -> None:
    blob_id = put_encrypted(store, KEY, "attachment-1", [b"scan.pdf contents"])
    with pytest.raises(ContentTampered):
        read_decrypted(store, KEY, blob_id, "attachment-2")
    with pytest.raises(BlobNotFound):
        read_decrypted(store, KEY, "f" * 32, "attachment-1")


def deterministic_chunks(total: int, digest: hashlib._Hash) -> Iterator[bytes]:
    """Yield ``total`` bytes, 1 MiB at a time, different per chunk; hash them on the way."""
    for index in range(total // MIB):
        chunk = hashlib.sha256(index.to_bytes(8, "big")).digest() * (MIB // 32)
        digest.update(chunk)
        yield chunk


def test_200_mib_round_trip_keeps_memory_flat(store: FilesystemBlobStore) -> None:
    process = psutil.Process()
    gc.collect()
    baseline = process.memory_info().rss
    peak = baseline

    def sampled(chunks: Iterator[bytes]) -> Iterator[bytes]:
        nonlocal peak
        for chunk in chunks:
            peak = max(peak, process.memory_info().rss)
            yield chunk

    size = 200 * MIB
    sent = hashlib.sha256()
    blob_id = put_encrypted(store, KEY, "attachment-big", sampled(deterministic_chunks(size, sent)))
    assert store.size(blob_id) == ciphertext_size(size)
    received = hashlib.sha256()
    for segment in sampled(read_decrypted(store, KEY, blob_id, "attachment-big")):
        received.update(segment)
    peak = max(peak, process.memory_info().rss)
    assert received.hexdigest() == sent.hexdigest()
    print(f"peak RSS growth {(peak - baseline) / MIB:.1f} MiB")
    assert peak - baseline < 32 * MIB


def test_put_at_restores_a_blob_under_its_id_and_never_overwrites(
    store: FilesystemBlobStore,
) -> None:
    blob_id = "ab" + "0" * 30
    store.put_at(blob_id, [b"cipher", b"text"])
    assert store.open(blob_id).read() == b"ciphertext"
    assert mode(store.root / "ab" / blob_id) == 0o600
    with pytest.raises(FileExistsError):
        store.put_at(blob_id, [b"other"])
    assert store.open(blob_id).read() == b"ciphertext"
    with pytest.raises(ValueError, match="malformed"):
        store.put_at("../../escape", [b"x"])
    assert files_under(store.root) == [store.root / "ab" / blob_id]
