"""Single-use recovery codes (800-63B 5.1.2 look-up secrets, ASVS 2.6).

Codes look like ``k7m2-x9qa-4hte``: 12 characters from a 32-symbol alphabet without
the look-alikes 0, o, 1 and l, so 60 bits each (800-63B 5.1.2.1 asks for at least 20
bits with rate limiting; these are far above it).

Stored as HMAC-SHA256 under a server-side pepper, not argon2: with 60 bits of entropy
an offline guess is hopeless without a slow hash, and a fast keyed hash lets the
service find the matching code among the person's codes quickly. The pepper (kept
outside the database) means a stolen table alone cannot test guesses at all. Marking a
code as used (burned) is the caller's job.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import unicodedata

ALPHABET = "23456789abcdefghijkmnpqrstuvwxyz"  # 32 symbols: no 0, o, 1, l
GROUPS = 3
GROUP_LENGTH = 4
CODE_BITS = 60  # GROUPS * GROUP_LENGTH * log2(len(ALPHABET))
DEFAULT_COUNT = 10
MIN_PEPPER_BYTES = 16


def _group() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(GROUP_LENGTH))


def generate_codes(n: int = DEFAULT_COUNT) -> list[str]:
    """Return ``n`` distinct new codes formatted ``xxxx-xxxx-xxxx``.

    Show them once; store only ``hash_code`` of each. Raises ValueError when n < 1.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    codes: list[str] = []
    while len(codes) < n:
        code = "-".join(_group() for _ in range(GROUPS))
        if code not in codes:
            codes.append(code)
    return codes


def normalise_code(code: str) -> str:
    """Return ``code`` as typed, reduced to its characters: NFKC, lower case, no spaces or dashes.

    Raises nothing.
    """
    folded = unicodedata.normalize("NFKC", code).strip().lower()
    return "".join(ch for ch in folded if ch != "-" and not ch.isspace())


def _check_pepper(pepper: bytes) -> None:
    if len(pepper) < MIN_PEPPER_BYTES:
        raise ValueError(f"the recovery-code pepper must be at least {MIN_PEPPER_BYTES} bytes")


def hash_code(code: str, pepper: bytes) -> str:
    """Return the hex HMAC-SHA256 of the normalised ``code`` under ``pepper``.

    Raises ValueError when the pepper is shorter than 16 bytes.
    """
    _check_pepper(pepper)
    message = normalise_code(code).encode("utf-8", "surrogatepass")
    return hmac.new(pepper, message, hashlib.sha256).hexdigest()


def verify_code(stored_hash: str, code: str, pepper: bytes) -> bool:
    """Return True when ``code`` (as typed) matches ``stored_hash``, in constant time.

    Raises ValueError when the pepper is shorter than 16 bytes.
    """
    candidate = hash_code(code, pepper)
    return hmac.compare_digest(candidate.encode("ascii"), stored_hash.encode("utf-8"))
