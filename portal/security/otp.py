"""Time-based one-time passwords (RFC 6238 TOTP over RFC 4226 HOTP) through pyotp.

Matching here is stateless on purpose. RFC 6238 section 5.2 requires that a verifier
accept a code only once; that state lives in the caller, which stores the matched step
with an atomic conditional update::

    UPDATE users SET totp_last_step = :step
    WHERE id = :id AND (totp_last_step IS NULL OR totp_last_step < :step)

and accepts the code only when one row changed (800-63B 5.1.4.2, ASVS 2.8.4).
"""

from __future__ import annotations

import hmac
import re

import pyotp

STEP_SECONDS = 30  # RFC 6238 section 5.2 recommended time step
DIGITS = 6
SECRET_BASE32_CHARS = 32  # 160 bits, RFC 4226 section 4 (R6) recommends 160

_CODE = re.compile(r"[0-9]{6}", re.ASCII)


def new_secret() -> str:
    """Return a new random base32 TOTP secret of 32 characters (160 bits). Raises nothing."""
    return pyotp.random_base32(length=SECRET_BASE32_CHARS)


def _totp(secret: str) -> pyotp.TOTP:
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS)


def provisioning_uri(secret: str, account: str, issuer: str) -> str:
    """Return the ``otpauth://totp/...`` URI an authenticator app enrols from.

    The URI holds the secret: show it only to the person enrolling, never log it.
    Raises nothing for well-formed input.
    """
    return _totp(secret).provisioning_uri(name=account, issuer_name=issuer)


def _clean(code: str) -> str | None:
    compact = code.strip().replace(" ", "")
    return compact if _CODE.fullmatch(compact) else None


def is_well_formed(code: str) -> bool:
    """Return True when ``code`` is exactly six ASCII digits, ignoring spaces.

    Full-width and other Unicode digits are refused: pyotp would quietly normalise them,
    and we want one accepted spelling. Raises nothing.
    """
    return _clean(code) is not None


def code_at(secret: str, step: int) -> str:
    """Return the code for time step ``step`` (``int(unix_time // 30)``).

    Raises ValueError for a negative step or a secret that is not base32.
    """
    return _totp(secret).generate_otp(step)


def _offsets(drift_steps: int) -> list[int]:
    offsets = [0]
    for distance in range(1, drift_steps + 1):
        offsets += [-distance, distance]
    return offsets


def matching_step(secret: str, code: str, *, now: float, drift_steps: int = 1) -> int | None:
    """Return the time step at which ``code`` is valid, or None.

    Checks the current step, then one step back and forward, up to ``drift_steps``
    either way (RFC 6238 section 5.2 allows for clock drift). Returns None for a
    malformed code or no match. Stateless: the caller must refuse a step it has already
    used (see module docstring). Raises ValueError for a negative ``drift_steps`` or a
    secret that is not base32.
    """
    if drift_steps < 0:
        raise ValueError("drift_steps must be zero or more")
    cleaned = _clean(code)
    if cleaned is None:
        return None
    current = int(now // STEP_SECONDS)
    for offset in _offsets(drift_steps):
        step = current + offset
        if step >= 0 and hmac.compare_digest(code_at(secret, step), cleaned):
            return step
    return None
