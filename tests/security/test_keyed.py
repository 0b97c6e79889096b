"""Purpose-specific secrets and the keyed hashes made with them (rate-limit keys)."""

from __future__ import annotations

import hashlib

import pytest

from portal.security import keyed


def test_derived_secret_is_stable_per_app_secret_and_differs_from_it() -> None:
    one = keyed.derive_secret("app secret one", keyed.RATE_LIMIT_ACCOUNT)
    assert one == keyed.derive_secret(b"app secret one", keyed.RATE_LIMIT_ACCOUNT)
    assert one != keyed.derive_secret("app secret two", keyed.RATE_LIMIT_ACCOUNT)
    assert len(one) == 32
    assert b"app secret one" not in one


def test_keyed_hash_hides_the_value_and_depends_on_the_secret() -> None:
    secret = keyed.derive_secret("s", keyed.RATE_LIMIT_ACCOUNT)
    digest = keyed.keyed_hash(secret, "sam@example.org")
    assert digest == keyed.keyed_hash(secret, "sam@example.org")
    assert "sam" not in digest
    assert digest != hashlib.sha256(b"sam@example.org").hexdigest()  # not guessable unkeyed
    other = keyed.derive_secret("t", keyed.RATE_LIMIT_ACCOUNT)
    assert digest != keyed.keyed_hash(other, "sam@example.org")


@pytest.mark.parametrize(
    ("secret", "purpose", "why"),
    [("", keyed.RATE_LIMIT_ACCOUNT, "empty"), ("s", "no-such-purpose", "no salt")],
)
def test_empty_secret_or_unknown_purpose_refused(secret: str, purpose: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        keyed.derive_secret(secret, purpose)
