"""The push-style encryptor and the random-access decryptor: the same wire format as
``encrypt_stream``/``decrypt_stream``, and every tampering still detected."""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portal.crypto.errors import ContentTampered
from portal.crypto.stream import (
    HEADER_SIZE,
    TAG_SIZE,
    SeekableDecryptor,
    StreamEncryptor,
    ciphertext_size,
    decrypt_stream,
    encrypt_stream,
    open_seekable,
)

KEY = bytes(range(32))
OID = "attachment-7f3a"
SEG = 64
FULL = SEG + TAG_SIZE


def push(plaintext: bytes, cuts: list[int], segment_size: int = SEG, oid: str = OID) -> bytes:
    """Encrypt ``plaintext`` handed in as pieces cut at ``cuts``."""
    encryptor = StreamEncryptor(KEY, oid, segment_size)
    out = [encryptor.header]
    start = 0
    for cut in [*sorted({min(c, len(plaintext)) for c in cuts}), len(plaintext)]:
        out += encryptor.update(plaintext[start:cut])
        start = cut
    out.append(encryptor.finalize())
    return b"".join(out)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=700), st.lists(st.integers(0, 700), max_size=12))
def test_pushed_pieces_make_the_pulled_format(plaintext: bytes, cuts: list[int]) -> None:
    blob = push(plaintext, cuts)
    assert len(blob) == ciphertext_size(len(plaintext), SEG)
    assert b"".join(decrypt_stream(KEY, OID, io.BytesIO(blob))) == plaintext
    pulled = b"".join(encrypt_stream(KEY, OID, io.BytesIO(plaintext), SEG))
    assert len(pulled) == len(blob)


def test_update_returns_only_whole_segments_and_holds_one_back() -> None:
    encryptor = StreamEncryptor(KEY, OID, SEG)
    assert encryptor.update(b"x" * SEG) == []  # exactly one segment: it may be the last
    assert [len(s) for s in encryptor.update(b"x")] == [FULL]
    assert [len(s) for s in encryptor.update(b"y" * (3 * SEG))] == [FULL] * 3
    assert len(encryptor.finalize()) == 1 + TAG_SIZE


def test_pieces_sealed_in_place_are_not_kept_by_reference() -> None:
    """Whole segments are sealed straight from the caller's buffer, the rest copied: a
    parser that reuses its buffer after ``update`` returns changes nothing of the stream."""
    plaintext = os.urandom(5 * SEG + 9)
    encryptor = StreamEncryptor(KEY, OID, SEG)
    out = [encryptor.header]
    buffer = bytearray(2 * SEG + 5)
    for start in range(0, len(plaintext), len(buffer)):
        piece = plaintext[start : start + len(buffer)]
        buffer[: len(piece)] = piece
        out += encryptor.update(memoryview(buffer)[: len(piece)])
        buffer[:] = b"\xff" * len(buffer)  # reused: overwritten before the next piece
    out.append(encryptor.finalize())
    assert b"".join(decrypt_stream(KEY, OID, io.BytesIO(b"".join(out)))) == plaintext


def test_finalize_once_and_no_update_after() -> None:
    encryptor = StreamEncryptor(KEY, OID, SEG)
    encryptor.finalize()
    with pytest.raises(ValueError, match="finalized"):
        encryptor.finalize()
    with pytest.raises(ValueError, match="finalized"):
        encryptor.update(b"late")


def test_bad_key_is_value_error() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        StreamEncryptor(b"short", OID)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_random_reads_return_the_plaintext(data: st.DataObject) -> None:
    plaintext = data.draw(st.binary(max_size=600))
    blob = push(plaintext, [])
    reader = open_seekable(KEY, OID, io.BytesIO(blob))
    assert reader.read() == plaintext
    for _ in range(8):
        start = data.draw(st.integers(0, len(plaintext) + 10))
        size = data.draw(st.integers(0, 200))
        reader.seek(start)
        assert reader.read(size) == plaintext[start : start + size]
    back = min(3, len(plaintext))
    assert reader.seek(-back, io.SEEK_END) == len(plaintext) - back
    assert reader.read() == plaintext[len(plaintext) - back :]


def test_only_the_segments_read_are_decrypted() -> None:
    plaintext = os.urandom(SEG * 10)
    source = io.BytesIO(push(plaintext, []))
    raw = SeekableDecryptor(KEY, OID, source)
    raw.seek(SEG * 4 + 3)
    piece = bytearray(10)
    assert raw.readinto(piece) == 10
    assert bytes(piece) == plaintext[SEG * 4 + 3 : SEG * 4 + 13]
    assert raw.readinto(bytearray(SEG)) == SEG - 13  # a short read at the segment's end


def test_a_flipped_bit_fails_the_segment_that_holds_it_only() -> None:
    plaintext = os.urandom(SEG * 5)
    blob = bytearray(push(plaintext, []))
    blob[HEADER_SIZE + 2 * FULL + 5] ^= 1
    reader = open_seekable(KEY, OID, io.BytesIO(bytes(blob)))
    assert reader.read(SEG) == plaintext[:SEG]
    reader.seek(2 * SEG)
    with pytest.raises(ContentTampered, match="segment 2"):
        reader.read(1)


@pytest.mark.parametrize("cut", [FULL, 2 * FULL, 1, FULL + 7])
def test_a_truncated_stream_fails_at_once(cut: int) -> None:
    blob = push(os.urandom(SEG * 3), [])
    with pytest.raises(ContentTampered):
        SeekableDecryptor(KEY, OID, io.BytesIO(blob[:-cut]))


def test_a_stream_of_another_object_or_key_fails_at_once() -> None:
    blob = push(b"results", [])
    with pytest.raises(ContentTampered):
        SeekableDecryptor(KEY, "another-object", io.BytesIO(blob))
    with pytest.raises(ContentTampered):
        SeekableDecryptor(bytes(32), OID, io.BytesIO(blob))


def test_an_empty_stream_is_verified_too() -> None:
    blob = bytearray(push(b"", []))
    assert open_seekable(KEY, OID, io.BytesIO(bytes(blob))).read() == b""
    blob[-1] ^= 1
    with pytest.raises(ContentTampered):
        SeekableDecryptor(KEY, OID, io.BytesIO(bytes(blob)))
