"""The blob store's piece-by-piece writer: no blob until keep, nothing left after abort, a
live writer's temporary file safe from the sweep, a full disk refused with nothing kept."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from portal.storage import WRITE_BUFFER, FilesystemBlobStore, StorageUnavailable
from tests.support.faults import fill, tiny_disk


@pytest.fixture
def store(tmp_path: Path) -> FilesystemBlobStore:
    return FilesystemBlobStore(tmp_path / "blobs")


def temporary(store: FilesystemBlobStore) -> list[Path]:
    return list((store.root / "tmp").iterdir())


def test_nothing_is_a_blob_until_kept(store: FilesystemBlobStore) -> None:
    writer = store.begin()
    writer.write(b"first ")
    writer.write(b"second")
    assert list(store.iter_ids()) == []
    assert [p.name for p in temporary(store)] == [f"{writer.blob_id}.part"]
    assert writer.keep() == writer.blob_id
    assert list(store.iter_ids()) == [writer.blob_id]
    assert temporary(store) == []
    with store.open(writer.blob_id) as blob:
        assert blob.read() == b"first second"
    writer.abort()  # after keep: nothing to undo
    assert store.exists(writer.blob_id)


def test_abort_leaves_nothing_and_is_idempotent(store: FilesystemBlobStore) -> None:
    writer = store.begin()
    writer.write(b"x" * (WRITE_BUFFER + 10))  # some flushed, some pending
    writer.abort()
    writer.abort()
    assert temporary(store) == []
    assert list(store.iter_ids()) == []
    with pytest.raises(ValueError, match="closed"):
        writer.write(b"late")


def test_reader_sees_everything_written_so_far(store: FilesystemBlobStore) -> None:
    writer = store.begin()
    pieces = [os.urandom(1000) for _ in range(100)]  # many small pieces, gathered per writev
    for piece in pieces:
        writer.write(piece)
    with writer.reader() as written:
        assert written.read() == b"".join(pieces)
    writer.write(b"more")
    with writer.reader() as written:
        assert written.read().endswith(b"more")
    writer.abort()


def test_a_live_writer_is_never_swept(store: FilesystemBlobStore) -> None:
    writer = store.begin()
    writer.write(b"an upload in progress")
    [part] = temporary(store)
    old = time.time() - 7200
    os.utime(part, (old, old))
    assert store.sweep_temp() == 0
    assert part.exists()
    writer.abort()


def test_put_still_writes_through_the_same_writer(store: FilesystemBlobStore) -> None:
    def pieces() -> Iterator[bytes]:
        yield b"a"
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError):
        store.put(pieces())
    assert temporary(store) == []
    assert list(store.iter_ids()) == []


def test_a_full_disk_is_refused_with_nothing_kept(tmp_path: Path) -> None:
    with tiny_disk(tmp_path / "disk", "2m") as mount:
        store = FilesystemBlobStore(mount / "blobs")
        filler = fill(mount)
        writer = store.begin()
        writer.write(b"z" * (2 * WRITE_BUFFER))  # a batch: written behind, and failing there
        with pytest.raises(StorageUnavailable) as full:
            writer.keep()
        assert "ENOSPC" in str(full.value)
        assert temporary(store) == []
        late = store.begin()
        late.write(b"z" * (2 * WRITE_BUFFER))
        with pytest.raises(StorageUnavailable):  # waits for the batch written behind
            late.reader()
        with pytest.raises(StorageUnavailable):  # and every call after says so again
            late.write(b"more")
        late.abort()
        assert temporary(store) == []
        filler.unlink()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_writeback_is_started_as_a_large_blob_is_written(
    store: FilesystemBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every WRITEBACK_EVERY bytes the writing thread starts the kernel's writeback of what
    it wrote (so keep()'s fsync has only the tail left): each range once, in order, the
    kernel takes the advice, and the blob's bytes are the same."""
    from portal import storage

    monkeypatch.setattr(storage, "WRITEBACK_EVERY", WRITE_BUFFER)
    advised: list[tuple[int, int, bool]] = []
    start = storage.start_writeback

    def counted(fd: int, offset: int, length: int) -> bool:
        taken = start(fd, offset, length)  # the real call
        advised.append((offset, length, taken))
        return taken

    monkeypatch.setattr(storage, "start_writeback", counted)
    data = os.urandom(WRITE_BUFFER)
    writer = store.begin()
    for _ in range(6):
        writer.write(data)
    blob_id = writer.keep()
    with store.open(blob_id) as stored:
        assert stored.read() == data * 6
    assert advised
    assert all(taken for _, _, taken in advised)
    assert [offset for offset, _, _ in advised] == [
        sum(length for _, length, _ in advised[:n]) for n in range(len(advised))
    ]


def test_writeback_advice_that_fails_changes_nothing(tmp_path: Path) -> None:
    """Advice only: a descriptor the kernel refuses it for (a pipe) is answered False, not
    an error that would fail an upload whose bytes are all written."""
    from portal import storage

    read_end, write_end = os.pipe()
    try:
        assert storage.start_writeback(write_end, 0, 4096) is False
    finally:
        os.close(read_end)
        os.close(write_end)
