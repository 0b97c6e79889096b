"""Cryptography for the portal: a leaf package (standard library and ``cryptography`` only).

- ``stream``: segmented AES-256-GCM for blobs of any size, flat memory.
- ``fields``: sealed short values for encrypted columns, per-purpose key derivation.
- ``keyring``: versioned key-encryption keys that wrap per-message data keys.

Keys are always passed in as arguments; errors from the ``cryptography``
library are turned into the exceptions in ``errors``.
"""

from __future__ import annotations

from portal.crypto.errors import ContentDestroyed, ContentTampered, CryptoError, KeyUnavailable
from portal.crypto.fields import derive_key, field_aad, open_sealed, seal
from portal.crypto.keyring import Keyring
from portal.crypto.stream import (
    SEGMENT_SIZE,
    ciphertext_size,
    decrypt_stream,
    encrypt_stream,
    plaintext_size,
)

__all__ = [
    "SEGMENT_SIZE",
    "ContentDestroyed",
    "ContentTampered",
    "CryptoError",
    "KeyUnavailable",
    "Keyring",
    "ciphertext_size",
    "decrypt_stream",
    "derive_key",
    "encrypt_stream",
    "field_aad",
    "open_sealed",
    "plaintext_size",
    "seal",
]
