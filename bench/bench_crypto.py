"""Benchmark streaming encryption through the filesystem blob store against one-shot AES-GCM.

Run from the checkout: ``python bench/bench_crypto.py [--mib 200] [--repeat 3]``.

Streaming runs first, before anything allocates the whole file, so the peak RSS
growth it reports is the streaming path's alone. Targets: streaming throughput
at least 70% of raw one-shot AESGCM, and peak RSS growth under 32 MiB. Exits
non-zero only on an error (a round trip that does not match), never on a missed
target.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from portal.crypto.stream import SEGMENT_SIZE, decrypt_stream, encrypt_stream
from portal.storage import FilesystemBlobStore

MIB = 1024 * 1024
RATIO_TARGET = 0.70
RSS_TARGET_MIB = 32
SEGMENT_SIZES = (64 * 1024, 256 * 1024, 1024 * 1024)
OBJECT_ID = "bench-object"


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def deterministic_chunks(total: int, chunk: int = MIB) -> Iterator[bytes]:
    """Yield ``total`` pseudo-random bytes (SHA-256 counter mode), ``chunk`` at a time."""
    block = b"".join(hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(chunk // 32))
    for offset in range(0, total, chunk):
        prefix = hashlib.sha256(offset.to_bytes(8, "big")).digest()
        yield (prefix + block[32:])[: min(chunk, total - offset)]


def best_seconds(action: Callable[[], object], repeat: int) -> float:
    timings = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        timings.append(time.perf_counter() - start)
    return min(timings)


def stream_round(
    store: FilesystemBlobStore, key: bytes, source: Path, segment: int, repeat: int
) -> tuple[float, float, str]:
    """Return (encrypt seconds, decrypt seconds, blob id) for the best of ``repeat`` runs."""
    blob_ids: list[str] = []

    def encrypt() -> None:
        for stale in blob_ids:  # keep one blob on disk at a time
            store.delete(stale)
        blob_ids.clear()
        with source.open("rb") as src:
            blob_ids.append(store.put(encrypt_stream(key, OBJECT_ID, src, segment)))

    encrypt()  # warm-up: first-write effects (fan-out folders, disk cache) are not the code's
    enc = best_seconds(encrypt, repeat)
    blob_id = blob_ids.pop()

    def decrypt() -> None:
        with store.open(blob_id) as src:
            for _segment in decrypt_stream(key, OBJECT_ID, src):
                pass

    return enc, best_seconds(decrypt, repeat), blob_id


def _encrypt_to_void(key: bytes, source: Path, segment: int = SEGMENT_SIZE) -> None:
    with source.open("rb") as src:
        for _sealed in encrypt_stream(key, OBJECT_ID, src, segment):
            pass


def _copy_to_store(store: FilesystemBlobStore, source: Path) -> str:
    """The disk's share: the same put, plaintext, no encryption."""
    with source.open("rb") as src:
        return store.put(iter(lambda: src.read(SEGMENT_SIZE), b""))


def sha256_of(chunks: Iterator[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def verify(store: FilesystemBlobStore, key: bytes, blob_id: str, expected: str) -> None:
    with store.open(blob_id) as src:
        if sha256_of(decrypt_stream(key, OBJECT_ID, src)) != expected:
            raise SystemExit("ERROR: streaming round trip does not match the input")


def mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=200, help="file size in MiB")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (best kept)")
    args = parser.parse_args()
    size = args.mib * MIB
    key = AESGCM.generate_key(bit_length=256)

    with tempfile.TemporaryDirectory(prefix="bench-crypto-") as tmp:
        source = Path(tmp) / "plain.bin"
        digest = hashlib.sha256()
        with source.open("wb") as out:
            for chunk in deterministic_chunks(size):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())  # so its writeback does not slow the first measurement
        expected = digest.hexdigest()
        store = FilesystemBlobStore(Path(tmp) / "blobs")

        # 1. Streaming at the chosen segment size, first: its RSS is measured alone.
        # Growth = peak after - RSS now: an upper bound (counts any earlier, higher peak).
        rss_start = _current_rss_mib()
        enc, dec, blob_id = stream_round(store, key, source, SEGMENT_SIZE, args.repeat)
        verify(store, key, blob_id, expected)
        rss_growth = peak_rss_mib() - rss_start
        crypto_only = best_seconds(lambda: _encrypt_to_void(key, source), args.repeat)
        copy_only = best_seconds(lambda: store.delete(_copy_to_store(store, source)), args.repeat)

        # 2. Segment-size table (still streaming, still flat).
        table = []
        for segment in SEGMENT_SIZES:
            s_enc, s_dec, s_blob = stream_round(store, key, source, segment, args.repeat)
            verify(store, key, s_blob, expected)
            store.delete(s_blob)
            s_void = best_seconds(lambda s=segment: _encrypt_to_void(key, source, s), args.repeat)
            table.append((segment, size / MIB / s_enc, size / MIB / s_void, size / MIB / s_dec))

        # 3. Raw one-shot baseline on the same bytes, in memory.
        plaintext = source.read_bytes()
        nonce = os.urandom(12)
        aesgcm = AESGCM(key)
        raw_enc = best_seconds(lambda: aesgcm.encrypt(nonce, plaintext, None), args.repeat)
        sealed = aesgcm.encrypt(nonce, plaintext, None)
        raw_dec = best_seconds(lambda: aesgcm.decrypt(nonce, sealed, None), args.repeat)

    report(size, (enc, dec, crypto_only, copy_only), (raw_enc, raw_dec), rss_growth, table)
    return 0


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def report(
    size: int,
    streaming: tuple[float, float, float, float],
    raw: tuple[float, float],
    rss_growth: float,
    table: list[tuple[int, float, float, float]],
) -> None:
    mib = size / MIB
    enc, dec, crypto_only, copy_only = streaming
    raw_enc, raw_dec = raw
    print(f"file: {mib:.0f} MiB, segment size {SEGMENT_SIZE // 1024} KiB, best of runs")
    print(f"streaming encrypt (file -> store, fsync): {mib / enc:8.1f} MiB/s")
    print(f"streaming encrypt (file -> discard):      {mib / crypto_only:8.1f} MiB/s")
    print(f"plain copy, no crypto (file -> store):    {mib / copy_only:8.1f} MiB/s  (disk bound)")
    print(f"streaming decrypt (store -> discard):     {mib / dec:8.1f} MiB/s")
    print(f"raw AESGCM encrypt (one shot, in memory): {mib / raw_enc:8.1f} MiB/s")
    print(f"raw AESGCM decrypt (one shot, in memory): {mib / raw_dec:8.1f} MiB/s")
    for label, ratio in (
        ("encrypt via store / raw", raw_enc / enc),
        ("encrypt, crypto only / raw", raw_enc / crypto_only),
        ("decrypt via store / raw", raw_dec / dec),
    ):
        print(f"{label:<27} {ratio:7.1%}  target >= 70%  {mark(ratio >= RATIO_TARGET)}")
    print(
        f"peak RSS growth, streaming: {rss_growth:6.1f} MiB  target < {RSS_TARGET_MIB} MiB  "
        f"{mark(rss_growth < RSS_TARGET_MIB)}"
    )
    print("segment size   MiB/s: encrypt to store   encrypt to discard   decrypt")
    for segment, s_enc, s_void, s_dec in table:
        print(f"{segment // 1024:>9} KiB   {s_enc:23.1f}   {s_void:18.1f}   {s_dec:7.1f}")


if __name__ == "__main__":
    sys.exit(main())
