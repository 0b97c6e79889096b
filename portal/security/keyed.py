"""Purpose-specific secrets derived from the app secret, and keyed hashes made with them.

One secret per purpose, each with its own salt (ASVS 6.4.1), so a value
hashed for one purpose is useless for any other and the app secret itself never keys
anything but the derivation. The derivation is HKDF-Extract (RFC 5869 section 2.2):
HMAC-SHA256 keyed by the purpose's salt over the app secret, a 32-byte key.
"""

from __future__ import annotations

import hashlib
import hmac

RATE_LIMIT_ACCOUNT = "rate-limit-account"  # Flask-Limiter keys naming an account

# Each purpose's own salt; a new purpose adds a line here (and never reuses a salt).
_SALTS: dict[str, bytes] = {
    RATE_LIMIT_ACCOUNT: b"pickup-portal/keyed/rate-limit-account/v1",
}


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value


def derive_secret(app_secret: str | bytes, purpose: str) -> bytes:
    """Return the 32-byte secret for ``purpose`` derived from ``app_secret``.

    Raises ValueError for an empty app secret or a purpose without a salt here.
    """
    if not app_secret:
        raise ValueError("the app secret is empty")
    if purpose not in _SALTS:
        raise ValueError(f"no salt for purpose {purpose!r}")
    return hmac.new(_SALTS[purpose], _as_bytes(app_secret), hashlib.sha256).digest()


def keyed_hash(secret: bytes, value: str) -> str:
    """Return the hex HMAC-SHA256 of ``value`` (UTF-8) under ``secret``. Raises nothing.

    Stable for one secret, so it can stand in for ``value`` as a lookup key (a rate
    limit's), and cannot be reversed or checked against a guess without the secret.
    """
    return hmac.new(secret, _as_bytes(value), hashlib.sha256).hexdigest()
