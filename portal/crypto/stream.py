"""Segmented streaming AEAD (STREAM construction) with AES-256-GCM.

The construction follows Hoang, Reyhanitabar, Rogaway and Vizár, "Online
Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance" (CRYPTO 2015),
as used by Tink's AesGcmHkdfStreaming and by age: the plaintext is cut into
fixed-size segments, each sealed with AES-256-GCM (NIST SP 800-38D) under a
nonce that carries the segment counter and a "last segment" flag. So a reader
can verify and release one segment at a time (flat memory), and reordering,
dropping, duplicating or truncating segments fails authentication.

Wire format::

    header  = b"PPS" || version (1 byte, 1) || segment size (4 bytes BE) || nonce prefix (7)
    segment = AES-256-GCM(key, nonce, plaintext segment, aad) = ciphertext || tag (16)
    nonce   = nonce prefix (7) || counter (4 bytes BE) || last flag (1 byte: 1 final, else 0)
    aad     = header || len(object id) (4 bytes BE) || object id (UTF-8)

Every segment but the last holds exactly ``segment size`` plaintext bytes; the
last holds 1 to ``segment size`` bytes, or 0 only when the whole plaintext is
empty (then it is the only segment). The AAD binds every segment to the header
and to the object id, so a blob copied under another object fails to decrypt.

A data key must encrypt at most one stream per random nonce prefix; services
give each message its own data key, so the 56-bit prefix only has to be unique
per key, which it is with overwhelming probability for the handful of blobs a
message holds.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterable, Iterator
from itertools import chain
from typing import TYPE_CHECKING, BinaryIO, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from portal.crypto.errors import ContentTampered

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

MAGIC = b"PPS"
VERSION = 1
NONCE_PREFIX_SIZE = 7
HEADER_SIZE = len(MAGIC) + 1 + 4 + NONCE_PREFIX_SIZE  # 15 bytes
TAG_SIZE = 16
KEY_SIZE = 32
MIN_SEGMENT_SIZE = 16  # bytes; tiny sizes exist only for property tests
MAX_SEGMENT_SIZE = 8 * 1024 * 1024  # bytes; bounds what a hostile header can make us buffer
MAX_SEGMENTS = 2**32  # the counter is 4 bytes

# 256 KiB, chosen by measurement (bench/bench_crypto.py, 200 MiB, 2-vCPU VM with AES-NI):
# encryption alone ran 5400-7700 MiB/s at 64 KiB, 6800-9600 at 256 KiB, 6400-9800 at
# 1 MiB (decryption alike), all above one-shot AESGCM on the whole file (1300-1800 MiB/s,
# which pays for a 200 MiB output buffer). Puts to the store were disk-bound and
# equal within noise at every size. 64 KiB pays ~25% in per-segment overhead; 1 MiB
# gains nothing over 256 KiB yet quadruples what each open stream buffers (a reader
# holds about two segments), which counts with many concurrent downloads.
SEGMENT_SIZE = 256 * 1024

_HEADER = struct.Struct(">3sBI7s")
_LAST = b"\x01"
_NOT_LAST = b"\x00"


def ciphertext_size(plaintext_size: int, segment_size: int = SEGMENT_SIZE) -> int:
    """Return the size in bytes of the stream that ``encrypt_stream`` makes of ``plaintext_size``.

    Raises ValueError for a negative size or a segment size out of bounds.
    """
    _check_segment_size(segment_size)
    if plaintext_size < 0:
        raise ValueError("plaintext size must not be negative")
    segments = max(1, -(-plaintext_size // segment_size))
    return HEADER_SIZE + plaintext_size + segments * TAG_SIZE


def plaintext_size(ciphertext_size: int, segment_size: int = SEGMENT_SIZE) -> int:
    """Return the plaintext size a well-formed stream of ``ciphertext_size`` bytes decrypts to.

    Useful for a Content-Length before decrypting. Raises ValueError when no
    stream ``encrypt_stream`` makes can have that size.
    """
    _check_segment_size(segment_size)
    body = ciphertext_size - HEADER_SIZE
    if body < TAG_SIZE:
        raise ValueError("ciphertext too short to be a stream")
    if body == TAG_SIZE:
        return 0
    full = segment_size + TAG_SIZE
    segments = -(-body // full)
    if body - (segments - 1) * full <= TAG_SIZE:
        raise ValueError("ciphertext size impossible for this segment size")
    return body - segments * TAG_SIZE


def encrypt_stream(
    key: bytes,
    object_id: str,
    src: BinaryIO | Iterable[bytes],
    segment_size: int = SEGMENT_SIZE,
) -> Iterator[bytes]:
    """Encrypt ``src`` (a binary file or an iterable of byte chunks) for ``object_id``.

    Returns an iterator that yields the header, then each sealed segment
    (plaintext segment + 16-byte tag); memory stays at about two segments.
    Raises ValueError at once for a key that is not 32 bytes or a segment size
    out of bounds. Exceptions from ``src`` propagate unchanged.
    """
    aesgcm = AESGCM(_check_key(key))
    _check_segment_size(segment_size)
    header = _HEADER.pack(MAGIC, VERSION, segment_size, os.urandom(NONCE_PREFIX_SIZE))
    return _encrypt_segments(aesgcm, header, _aad(header, object_id), src, segment_size)


def decrypt_stream(key: bytes, object_id: str, src: BinaryIO) -> Iterator[bytes]:
    """Decrypt a stream made by ``encrypt_stream`` for ``object_id``.

    Returns an iterator of plaintext segments, each yielded only after its tag
    verified. The header and the first segment are read and verified before this
    function returns, so a wrong key, a blob moved to another object or a broken
    start raise ``ContentTampered`` here, before a response has begun.

    Raises ``ContentTampered`` (here or while iterating) on any integrity
    failure: bad header, flipped bit, wrong key or object id, a dropped,
    duplicated or reordered segment, truncation, or data after the final
    segment. Segments yielded before the exception are genuine but the content
    is incomplete: a consumer such as an HTTP response must abort (drop the
    connection, never finish the body normally) when the iterator raises.
    Raises ValueError for a key that is not 32 bytes.
    """
    aesgcm = AESGCM(_check_key(key))
    header = _read_exact(src, HEADER_SIZE)
    segment_size = _parse_header(header)
    segments = _decrypt_segments(aesgcm, _aad(header, object_id), src, segment_size)
    first = next(segments)  # always at least one segment, or ContentTampered
    return chain((first,), segments)


class StreamEncryptor:
    """Push-style ``encrypt_stream``: plaintext handed in as it arrives, sealed segments out.

    For a producer that calls us (a multipart parser writing a file part) rather than one
    we can iterate. The output is byte-for-byte the wire format above: ``header``, then the
    segments ``update`` returns, then the final one ``finalize`` returns. One segment is
    held back (at most ``segment_size`` plaintext bytes) because a segment can only be
    sealed once it is known whether another follows. Not thread-safe.
    """

    def __init__(self, key: bytes, object_id: str, segment_size: int = SEGMENT_SIZE) -> None:
        """Start a stream for ``object_id``. Raises ValueError for a bad key or segment size."""
        self._aesgcm = AESGCM(_check_key(key))
        _check_segment_size(segment_size)
        self.header = _HEADER.pack(MAGIC, VERSION, segment_size, os.urandom(NONCE_PREFIX_SIZE))
        self._aad = _aad(self.header, object_id)
        self._prefix = self.header[-NONCE_PREFIX_SIZE:]
        self._size = segment_size
        self._pending = bytearray()
        self._counter = 0
        self._done = False

    def update(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Take ``data``; return the segments it completed (often none), in order.

        Raises ValueError after ``finalize`` or past the 2**32-segment limit.
        """
        if self._done:
            raise ValueError("stream already finalized")
        # Sealed straight from ``data`` where it holds whole segments: only the piece that
        # completes the held-back segment and the new held-back rest are copied.
        sealed: list[bytes] = []
        with memoryview(data) as raw, raw.cast("B") as view:
            start = 0
            if self._pending:
                need = self._size - len(self._pending)
                if len(view) <= need:  # no byte after the segment yet: it may be the last
                    self._pending += view
                    return sealed
                self._pending += view[:need]
                sealed.append(self._seal(self._pending, last=False))
                self._pending.clear()
                start = need
            while len(view) - start > self._size:  # strictly more: this one is not last
                sealed.append(self._seal(view[start : start + self._size], last=False))
                start += self._size
            self._pending += view[start:]
        return sealed

    def finalize(self) -> bytes:
        """Return the final segment (the rest of the plaintext, possibly empty); call once.

        Raises ValueError when called twice.
        """
        if self._done:
            raise ValueError("stream already finalized")
        self._done = True
        final = self._seal(self._pending, last=True)
        self._pending = bytearray()
        return final

    def _seal(self, piece: bytes | bytearray | memoryview, *, last: bool) -> bytes:
        if self._counter >= MAX_SEGMENTS:
            raise ValueError("plaintext too long for one stream")
        sealed = self._aesgcm.encrypt(
            _nonce(self._prefix, self._counter, last=last), piece, self._aad
        )
        self._counter += 1
        return sealed


class SeekableDecryptor(io.RawIOBase):
    """Random-access plaintext of a stream ``encrypt_stream`` made, verified segment by segment.

    For readers that seek (a PDF parser reads the cross-reference table at the end, then
    objects anywhere): each ``read`` decrypts and authenticates only the segments it
    touches, and keeps the last one, so memory stays at one segment whatever the size.
    The final segment is opened with the "last" nonce flag, so a stream cut at a segment
    boundary fails as it does for ``decrypt_stream``. Raises ``ContentTampered`` (at
    construction for a bad header or an impossible size, on ``read`` for a segment that
    fails authentication). Wrap it in ``io.BufferedReader`` for readers that expect full reads.
    """

    def __init__(self, key: bytes, object_id: str, src: BinaryIO) -> None:
        """Read and check the header of ``src`` (seekable); raise ContentTampered or ValueError."""
        super().__init__()
        self._aesgcm = AESGCM(_check_key(key))
        self._src = src
        src.seek(0)
        header = _read_exact(src, HEADER_SIZE)
        self._segment = _parse_header(header)
        self._aad = _aad(header, object_id)
        self._prefix = header[-NONCE_PREFIX_SIZE:]
        total = src.seek(0, io.SEEK_END)
        try:
            self._length = plaintext_size(total, self._segment)
        except ValueError:
            raise ContentTampered("stream truncated or malformed") from None
        self._count = max(1, -(-self._length // self._segment))
        self._position = 0
        self._cached: tuple[int, bytes] | None = None
        self._open(
            self._count - 1
        )  # the end first: a truncated or empty-but-forged stream fails now

    def readable(self) -> bool:
        """Return True."""
        return True

    def seekable(self) -> bool:
        """Return True."""
        return True

    def tell(self) -> int:
        """Return the plaintext position."""
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move to a plaintext position (any ``whence``); return it. ValueError if negative."""
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: WriteableBuffer) -> int:
        """Fill ``buffer`` from the current segment (a short read at its end); 0 at the end."""
        if self._position >= self._length:
            return 0
        index, within = divmod(self._position, self._segment)
        plaintext = self._open(index)
        with memoryview(buffer) as target:
            count = min(len(target), len(plaintext) - within)
            target[:count] = plaintext[within : within + count]
        self._position += count
        return count

    def _open(self, index: int) -> bytes:
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        last = index == self._count - 1
        self._src.seek(HEADER_SIZE + index * (self._segment + TAG_SIZE))
        sealed = _read_exact(self._src, self._segment + TAG_SIZE)
        plaintext = _open_segment(
            self._aesgcm, _nonce(self._prefix, index, last=last), sealed, self._aad
        )
        self._cached = (index, plaintext)
        return plaintext


def open_seekable(key: bytes, object_id: str, src: BinaryIO) -> io.BufferedReader:
    """Return a buffered, seekable reader of the verified plaintext of ``src``.

    See ``SeekableDecryptor``; closing the reader does not close ``src``. Raises
    ``ContentTampered`` (here or while reading) and ValueError for a bad key.
    """
    return io.BufferedReader(SeekableDecryptor(key, object_id, src))


def _encrypt_segments(
    aesgcm: AESGCM,
    header: bytes,
    aad: bytes,
    src: BinaryIO | Iterable[bytes],
    segment_size: int,
) -> Iterator[bytes]:
    yield header
    prefix = header[-NONCE_PREFIX_SIZE:]
    pieces = _plaintext_segments(src, segment_size)
    current = next(pieces, b"")
    counter = 0
    for following in pieces:  # read ahead one segment to know which one is last
        yield aesgcm.encrypt(_nonce(prefix, counter, last=False), current, aad)
        current, counter = following, counter + 1
        if counter >= MAX_SEGMENTS:
            raise ValueError("plaintext too long for one stream")
    yield aesgcm.encrypt(_nonce(prefix, counter, last=True), current, aad)


def _decrypt_segments(
    aesgcm: AESGCM, aad: bytes, src: BinaryIO, segment_size: int
) -> Iterator[bytes]:
    prefix = aad[HEADER_SIZE - NONCE_PREFIX_SIZE : HEADER_SIZE]
    full = segment_size + TAG_SIZE
    current = _read_exact(src, full)
    counter = 0
    while True:
        following = _read_exact(src, full) if len(current) == full else b""
        last = not following
        if len(current) < TAG_SIZE or counter >= MAX_SEGMENTS:
            raise ContentTampered(f"stream truncated or malformed at segment {counter}")
        plaintext = _open_segment(aesgcm, _nonce(prefix, counter, last=last), current, aad)
        if last and not plaintext and counter > 0:
            raise ContentTampered("stream ends with an empty segment")
        yield plaintext
        if last:
            return
        current, counter = following, counter + 1


def _open_segment(aesgcm: AESGCM, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
    try:
        return aesgcm.decrypt(nonce, sealed, aad)
    except InvalidTag:
        counter = int.from_bytes(nonce[NONCE_PREFIX_SIZE:-1], "big")
        raise ContentTampered(f"segment {counter} failed authentication") from None


def _plaintext_segments(src: BinaryIO | Iterable[bytes], size: int) -> Iterator[bytes]:
    """Yield full segments of ``size`` bytes, then the non-empty remainder if any."""
    if hasattr(src, "read"):
        while piece := _read_exact(cast(BinaryIO, src), size):
            yield piece
        return
    buffer = bytearray()
    for chunk in src:  # a BinaryIO is an Iterable[bytes] too; the read path returned
        buffer += chunk
        while len(buffer) >= size:
            with memoryview(buffer) as view:
                piece = bytes(view[:size])
            del buffer[:size]
            yield piece
    if buffer:
        yield bytes(buffer)


def _read_exact(src: BinaryIO, size: int) -> bytes:
    """Read ``size`` bytes, fewer only at end of file (raw files may return short reads)."""
    data = src.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    remaining = size - len(data)
    while remaining and (more := src.read(remaining)):
        parts.append(more)
        remaining -= len(more)
    return b"".join(parts)


def _parse_header(header: bytes) -> int:
    if len(header) != HEADER_SIZE:
        raise ContentTampered("stream header truncated")
    magic, version, segment_size, _prefix = _HEADER.unpack(header)
    if magic != MAGIC or version != VERSION:
        raise ContentTampered("not a stream of a supported format or version")
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise ContentTampered("stream header has an out-of-bounds segment size")
    return int(segment_size)


def _aad(header: bytes, object_id: str) -> bytes:
    oid = object_id.encode("utf-8")
    return header + len(oid).to_bytes(4, "big") + oid


def _nonce(prefix: bytes, counter: int, *, last: bool) -> bytes:
    return prefix + counter.to_bytes(4, "big") + (_LAST if last else _NOT_LAST)


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
        raise ValueError("stream key must be 32 bytes (AES-256)")
    return bytes(key)


def _check_segment_size(segment_size: int) -> None:
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise ValueError(
            f"segment size must be between {MIN_SEGMENT_SIZE} and {MAX_SEGMENT_SIZE} bytes"
        )
