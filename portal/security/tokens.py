"""Random URL tokens (pickup links, invites, resets): 256 bits, stored only as SHA-256.

A plain SHA-256 is enough for storage: the token already carries 256 bits of entropy,
so the digest cannot be reversed or guessed, and a fast hash allows an indexed lookup
(ASVS 3.5.x, 2.5.x; OWASP Forgot Password Cheat Sheet).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

TOKEN_BYTES = 32  # 256 bits
TOKEN_LENGTH = 43  # URL-safe base64 of 32 bytes, padding removed

_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}", re.ASCII)


def new_token() -> str:
    """Return a new 43-character URL-safe token (32 random bytes). Raises nothing."""
    raw = secrets.token_bytes(TOKEN_BYTES)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def token_hash(token: str) -> bytes:
    """Return the 32-byte SHA-256 digest of ``token`` (UTF-8), the form to store. Raises nothing."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def is_well_formed_token(token: str) -> bool:
    """Return True when ``token`` is exactly 43 URL-safe base64 characters. Raises nothing."""
    return bool(_TOKEN.fullmatch(token))


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value


def constant_time_equals(a: bytes | str, b: bytes | str) -> bool:
    """Return True when ``a`` equals ``b``, compared with hmac.compare_digest. Raises nothing.

    Strings are compared as UTF-8, so any str works (compare_digest alone refuses
    non-ASCII str).
    """
    return hmac.compare_digest(_as_bytes(a), _as_bytes(b))
