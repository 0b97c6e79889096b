"""Exceptions raised by portal.crypto.

Messages name what failed (a path, a version number, a segment index) and never
carry plaintext or key material, so they are safe to log and to show an operator.
"""

from __future__ import annotations


class CryptoError(Exception):
    """Base class for every error portal.crypto raises."""


class ContentTampered(CryptoError):
    """Ciphertext failed authentication: modified, truncated, reordered, moved or wrong key."""


class KeyUnavailable(CryptoError):
    """A key-encryption key is missing, or the keyring file is unreadable or malformed."""


class ContentDestroyed(CryptoError):
    """The data key was destroyed (crypto-shredded): the content is gone for good.

    portal.crypto never raises it itself; services raise it when a data key row
    has been shredded, so callers can tell "gone on purpose" from "tampered".
    """
