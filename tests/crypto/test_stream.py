"""Segmented streaming AEAD: round trips, size helpers, and every kind of tampering."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portal.crypto.errors import ContentTampered
from portal.crypto.stream import (
    HEADER_SIZE,
    SEGMENT_SIZE,
    TAG_SIZE,
    ciphertext_size,
    decrypt_stream,
    encrypt_stream,
    plaintext_size,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
OID = "attachment-7f3a"
SEG = 64  # small segments so property tests cross many boundaries quickly
FULL = SEG + TAG_SIZE
SECRET = b"Diagnosis: patient Jane Roe, DOB 1970-01-01. "


def encrypt(plaintext: bytes, segment_size: int = SEG, key: bytes = KEY, oid: str = OID) -> bytes:
    return b"".join(encrypt_stream(key, oid, io.BytesIO(plaintext), segment_size))


def decrypt(blob: bytes, key: bytes = KEY, oid: str = OID) -> bytes:
    return b"".join(decrypt_stream(key, oid, io.BytesIO(blob)))


def segments(blob: bytes) -> tuple[bytes, list[bytes]]:
    """Split a SEG-sized stream into its header and sealed segments."""
    body = blob[HEADER_SIZE:]
    return blob[:HEADER_SIZE], [body[i : i + FULL] for i in range(0, len(body), FULL)]


def assert_tampered(blob: bytes, genuine: bytes, key: bytes = KEY, oid: str = OID) -> list[bytes]:
    """Decrypting must raise ContentTampered, never finish; what it yielded must be genuine."""
    yielded: list[bytes] = []
    with pytest.raises(ContentTampered) as excinfo:
        drain(key, oid, blob, yielded)
    assert genuine.startswith(b"".join(yielded))
    assert excinfo.value.__cause__ is None  # no cryptography exception leaks through
    assert SECRET[:10].decode() not in str(excinfo.value)
    return yielded


def drain(key: bytes, oid: str, blob: bytes, into: list[bytes]) -> None:
    """Collect every piece decryption yields, one at a time; the caller expects an exception."""
    for piece in decrypt_stream(key, oid, io.BytesIO(blob)):
        into.append(piece)


def flip(blob: bytes, index: int, bit: int = 0) -> bytes:
    mutable = bytearray(blob)
    mutable[index] ^= 1 << bit
    return bytes(mutable)


PLAIN = (SECRET * 8)[: SEG * 4 + 10]  # five segments: four full, one of 10 bytes
BLOB = encrypt(PLAIN)


class _ShortReads(io.RawIOBase):
    """A stream that returns at most 7 bytes per read, like a slow socket."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._data.read(min(size, 7) if size >= 0 else 7)


# Round trips


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 5 * SEG + 3])
def test_round_trip_boundary_sizes(size: int) -> None:
    plaintext = os.urandom(size)
    blob = encrypt(plaintext)
    assert len(blob) == ciphertext_size(size, SEG)
    assert plaintext_size(len(blob), SEG) == size
    assert decrypt(blob) == plaintext


@pytest.mark.parametrize(
    "size", [0, 1, SEGMENT_SIZE - 1, SEGMENT_SIZE, SEGMENT_SIZE + 1, 3 * SEGMENT_SIZE + 5]
)
def test_round_trip_real_segment_size(size: int) -> None:
    plaintext = os.urandom(size)
    blob = b"".join(encrypt_stream(KEY, OID, io.BytesIO(plaintext)))
    assert len(blob) == ciphertext_size(size)
    assert decrypt(blob) == plaintext


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=SEG * 9), st.lists(st.integers(min_value=0, max_value=200)))
def test_round_trip_any_size_and_chunking(plaintext: bytes, cuts: list[int]) -> None:
    chunks, rest = [], plaintext
    for cut in cuts:
        chunks.append(rest[:cut])
        rest = rest[cut:]
    chunks.append(rest)
    blob = b"".join(encrypt_stream(KEY, OID, iter(chunks), SEG))
    assert len(blob) == ciphertext_size(len(plaintext), SEG)
    assert decrypt(blob) == plaintext
    assert b"".join(decrypt_stream(KEY, OID, _ShortReads(blob))) == plaintext  # type: ignore[arg-type]


def test_empty_plaintext_is_one_final_empty_segment() -> None:
    pieces = list(encrypt_stream(KEY, OID, io.BytesIO(b""), SEG))
    assert len(pieces) == 2
    assert len(pieces[0]) == HEADER_SIZE
    assert len(pieces[1]) == TAG_SIZE
    assert list(decrypt_stream(KEY, OID, io.BytesIO(b"".join(pieces)))) == [b""]


def test_encrypt_yields_header_then_one_piece_per_segment() -> None:
    pieces = list(encrypt_stream(KEY, OID, io.BytesIO(PLAIN), SEG))
    assert pieces[0][:4] == b"PPS\x01"
    assert int.from_bytes(pieces[0][4:8], "big") == SEG
    assert [len(p) for p in pieces[1:]] == [FULL] * 4 + [10 + TAG_SIZE]


def test_decrypt_yields_segment_by_segment() -> None:
    assert [len(p) for p in decrypt_stream(KEY, OID, io.BytesIO(BLOB))] == [SEG] * 4 + [10]


def test_same_plaintext_encrypts_differently() -> None:
    assert encrypt(PLAIN) != encrypt(PLAIN)


def test_encrypt_is_lazy_and_reads_ahead_only_one_segment() -> None:
    consumed: list[int] = []

    def source() -> Iterator[bytes]:
        for i in range(10):
            consumed.append(i)
            yield bytes(SEG)

    stream = encrypt_stream(KEY, OID, source(), SEG)
    assert consumed == []
    next(stream)  # header
    next(stream)  # first segment needs the second read to know it is not last
    assert consumed == [0, 1]


@pytest.mark.parametrize("key", [b"", bytes(16), bytes(31), bytes(33)])
def test_bad_key_length_is_value_error(key: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        encrypt_stream(key, OID, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="32 bytes"):
        decrypt_stream(key, OID, io.BytesIO(BLOB))


@pytest.mark.parametrize("segment_size", [0, 15, 8 * 1024 * 1024 + 1])
def test_bad_segment_size_is_value_error(segment_size: int) -> None:
    with pytest.raises(ValueError, match="segment size"):
        encrypt_stream(KEY, OID, io.BytesIO(b"x"), segment_size)


def test_source_exception_propagates() -> None:
    def failing() -> Iterator[bytes]:
        yield b"a" * 100
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        b"".join(encrypt_stream(KEY, OID, failing(), SEG))


@pytest.mark.parametrize(
    ("size", "segment_size"), [(0, SEG), (1, SEG), (SEG, SEG), (10**9, SEGMENT_SIZE)]
)
def test_size_helpers_invert(size: int, segment_size: int) -> None:
    assert plaintext_size(ciphertext_size(size, segment_size), segment_size) == size


@pytest.mark.parametrize("size", [0, HEADER_SIZE, HEADER_SIZE + 15, HEADER_SIZE + FULL + 16])
def test_plaintext_size_rejects_impossible_sizes(size: int) -> None:
    with pytest.raises(ValueError, match="ciphertext"):
        plaintext_size(size, SEG)


# Tampering


@pytest.mark.parametrize("index", range(HEADER_SIZE))
def test_flipped_bit_in_header(index: int) -> None:
    assert_tampered(flip(BLOB, index), PLAIN)


@pytest.mark.parametrize("segment", [0, 2, 4])
@pytest.mark.parametrize("where", ["payload", "tag"])
def test_flipped_bit_in_segment(segment: int, where: str) -> None:
    start = HEADER_SIZE + segment * FULL
    end = min(start + FULL, len(BLOB))
    index = start + 3 if where == "payload" else end - 5
    yielded = assert_tampered(flip(BLOB, index, bit=7), PLAIN)
    assert len(yielded) <= segment  # the tampered segment itself is never released


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_single_bit_flip_is_detected(data: st.DataObject) -> None:
    plaintext = data.draw(st.binary(max_size=SEG * 4))
    blob = encrypt(plaintext)
    index = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    assert_tampered(flip(blob, index, bit), plaintext)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_truncation_is_detected(data: st.DataObject) -> None:
    plaintext = data.draw(st.binary(max_size=SEG * 4))
    blob = encrypt(plaintext)
    cut = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
    assert_tampered(blob[:cut], plaintext)


def test_dropped_final_segment_at_boundary() -> None:
    header, segs = segments(BLOB)
    yielded = assert_tampered(header + b"".join(segs[:-1]), PLAIN)
    assert b"".join(yielded) == PLAIN[: SEG * 3]  # genuine prefix, then the exception


def test_dropped_final_full_segment_at_boundary() -> None:
    plaintext = os.urandom(SEG * 3)
    header, segs = segments(encrypt(plaintext))
    assert_tampered(header + b"".join(segs[:-1]), plaintext)


@pytest.mark.parametrize("cut", [1, SEG // 2, FULL - 1])
def test_truncated_mid_segment(cut: int) -> None:
    assert_tampered(BLOB[: HEADER_SIZE + 2 * FULL + cut], PLAIN)


@pytest.mark.parametrize("length", [0, 3, HEADER_SIZE - 1, HEADER_SIZE])
def test_truncated_to_header_or_less(length: int) -> None:
    assert_tampered(BLOB[:length], PLAIN)


def test_dropped_middle_segment() -> None:
    header, segs = segments(BLOB)
    assert_tampered(header + b"".join(segs[:2] + segs[3:]), PLAIN)


def test_duplicated_segment() -> None:
    header, segs = segments(BLOB)
    assert_tampered(header + b"".join([*segs[:2], segs[1], *segs[2:]]), PLAIN)


def test_swapped_segments() -> None:
    header, segs = segments(BLOB)
    segs[1], segs[2] = segs[2], segs[1]
    assert_tampered(header + b"".join(segs), PLAIN)


def test_final_segment_moved_earlier() -> None:
    plaintext = os.urandom(SEG * 2)
    header, segs = segments(encrypt(plaintext))
    assert_tampered(header + segs[1] + segs[0], plaintext)


@pytest.mark.parametrize("extra", [b"\x00", bytes(TAG_SIZE), bytes(FULL), bytes(FULL * 2 + 3)])
def test_extra_trailing_bytes(extra: bytes) -> None:
    assert_tampered(BLOB + extra, PLAIN)


def test_segment_appended_after_final_full_segment() -> None:
    plaintext = os.urandom(SEG * 2)
    header, segs = segments(encrypt(plaintext))
    assert_tampered(header + b"".join(segs) + segs[0], plaintext)


def test_empty_stream_with_segment_appended() -> None:
    blob = encrypt(b"")
    assert_tampered(blob + blob[HEADER_SIZE:], b"")


def test_segment_from_another_stream_same_key() -> None:
    header, segs = segments(BLOB)
    _other_header, other = segments(encrypt(PLAIN))
    assert_tampered(header + b"".join(segs[:2] + other[2:3] + segs[3:]), PLAIN)


def test_header_from_another_stream_same_key() -> None:
    _header, segs = segments(BLOB)
    other_header, _other = segments(encrypt(PLAIN))
    assert_tampered(other_header + b"".join(segs), PLAIN)


def test_blob_moved_to_another_object_id() -> None:
    assert_tampered(BLOB, PLAIN, oid="attachment-other")


def test_object_id_encoding_is_unambiguous() -> None:
    # The length prefix keeps ids that share a byte prefix distinct.
    assert_tampered(encrypt(PLAIN, oid="ab"), PLAIN, oid="a")


def test_wrong_key() -> None:
    assert_tampered(BLOB, PLAIN, key=OTHER_KEY)


def test_wrong_key_is_detected_before_iteration_begins() -> None:
    with pytest.raises(ContentTampered):
        decrypt_stream(OTHER_KEY, OID, io.BytesIO(BLOB))


def test_tampered_final_segment_yields_genuine_prefix_then_raises() -> None:
    yielded = assert_tampered(flip(BLOB, len(BLOB) - 1), PLAIN)
    assert b"".join(yielded) == PLAIN[: SEG * 4]


def test_hostile_segment_size_in_header_is_refused() -> None:
    header = bytearray(BLOB[:HEADER_SIZE])
    header[4:8] = (2**31).to_bytes(4, "big")
    assert_tampered(bytes(header) + BLOB[HEADER_SIZE:], PLAIN)
