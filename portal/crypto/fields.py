"""Short-value AEAD for encrypted columns, and per-purpose key derivation.

A sealed value is ``version (1 byte, 1) || nonce (12 random bytes) || AES-256-GCM
ciphertext and tag`` (NIST SP 800-38D). Random 96-bit nonces are safe here because
each data key seals only a few values (one message's or one user's fields), far
below the 2**32 invocations per key that SP 800-38D section 8.3 allows.

The AAD binds a value to its table, column and row (``field_aad``), so a sealed
date of birth copied into another row or another column fails to open.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from portal.crypto.errors import ContentTampered

SEALED_VERSION = 1
NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZE = 32
MIN_MASTER_SIZE = 32  # bytes; HKDF input keying material must carry 256 bits of entropy
_PREFIX = bytes([SEALED_VERSION])
_FIELD_AAD_LABEL = b"pickup-portal/field/v1"
_DERIVE_SALT = b"pickup-portal/derive/v1"  # fixed salt: RFC 5869 section 3.1 allows it


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Return ``plaintext`` sealed under ``key`` (32 bytes) and bound to ``aad``.

    The result is 29 bytes longer than the plaintext. Raises ValueError for a
    key that is not 32 bytes.
    """
    nonce = os.urandom(NONCE_SIZE)
    return _PREFIX + nonce + _aesgcm(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, token: bytes, aad: bytes) -> bytes:
    """Return the plaintext of a value made by ``seal`` with the same key and AAD.

    Raises ``ContentTampered`` when the token is malformed, of an unknown
    version, modified, sealed under another key or bound to another AAD.
    Raises ValueError for a key that is not 32 bytes.
    """
    aesgcm = _aesgcm(key)
    if len(token) < 1 + NONCE_SIZE + TAG_SIZE or token[:1] != _PREFIX:
        raise ContentTampered("sealed value malformed or of an unknown version")
    try:
        return aesgcm.decrypt(token[1 : 1 + NONCE_SIZE], token[1 + NONCE_SIZE :], aad)
    except InvalidTag:
        raise ContentTampered("sealed value failed authentication") from None


def field_aad(table: str, column: str, row_id: str) -> bytes:
    """Return the AAD that binds a sealed value to ``table``.``column`` of row ``row_id``.

    Each part is length-prefixed, so no two different triples give the same
    bytes (``("a", "bc", ...)`` differs from ``("ab", "c", ...)``). Raises
    nothing of ours.
    """
    return _encode_parts(_FIELD_AAD_LABEL, table.encode(), column.encode(), row_id.encode())


def derive_key(master: bytes, purpose: str) -> bytes:
    """Return a 32-byte key for ``purpose`` derived from ``master`` with HKDF-SHA256 (RFC 5869).

    Different purposes give independent keys, so one master secret serves many
    uses without any two sharing a key ("one secret per purpose"). Raises
    ValueError when ``master`` is shorter than 32 bytes or ``purpose`` is empty.
    """
    if len(master) < MIN_MASTER_SIZE:
        raise ValueError("master secret must be at least 32 bytes")
    if not purpose:
        raise ValueError("purpose must not be empty")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_SIZE,
        salt=_DERIVE_SALT,
        info=b"pickup-portal:" + purpose.encode(),
    )
    return hkdf.derive(master)


def _encode_parts(*parts: bytes) -> bytes:
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def _aesgcm(key: bytes) -> AESGCM:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
        raise ValueError("field key must be 32 bytes (AES-256)")
    return AESGCM(bytes(key))
