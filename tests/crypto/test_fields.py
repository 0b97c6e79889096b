"""Sealed short values for encrypted columns, and per-purpose key derivation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portal.crypto.errors import ContentTampered
from portal.crypto.fields import derive_key, field_aad, open_sealed, seal

KEY = bytes(range(32))
AAD = field_aad("users", "dob", "42")


@given(st.binary(max_size=500), st.binary(max_size=64))
def test_seal_round_trip(plaintext: bytes, aad: bytes) -> None:
    token = seal(KEY, plaintext, aad)
    assert token[0] == 1
    assert len(token) == len(plaintext) + 29
    assert open_sealed(KEY, token, aad) == plaintext


def test_seal_is_randomised() -> None:
    assert seal(KEY, b"1970-01-01", AAD) != seal(KEY, b"1970-01-01", AAD)


@pytest.mark.parametrize(
    "other_aad",
    [
        field_aad("users", "dob", "43"),
        field_aad("users", "name", "42"),
        field_aad("messages", "dob", "42"),
        b"",
    ],
)
def test_aad_mismatch_is_tampered(other_aad: bytes) -> None:
    token = seal(KEY, b"1970-01-01", AAD)
    with pytest.raises(ContentTampered) as excinfo:
        open_sealed(KEY, token, other_aad)
    assert "1970" not in str(excinfo.value)
    assert excinfo.value.__cause__ is None


def test_wrong_key_is_tampered() -> None:
    with pytest.raises(ContentTampered):
        open_sealed(bytes(32), seal(KEY, b"x", AAD), AAD)


@given(st.data())
def test_any_bit_flip_is_tampered(data: st.DataObject) -> None:
    token = bytearray(seal(KEY, b"Jane Roe", AAD))
    index = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
    token[index] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
    with pytest.raises(ContentTampered):
        open_sealed(KEY, bytes(token), AAD)


@pytest.mark.parametrize("token", [b"", b"\x01", b"\x01" + bytes(27), b"\x02" + bytes(40)])
def test_malformed_token_is_tampered(token: bytes) -> None:
    with pytest.raises(ContentTampered):
        open_sealed(KEY, token, AAD)


@pytest.mark.parametrize("key", [b"", bytes(16), bytes(33)])
def test_bad_key_length_is_value_error(key: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        seal(key, b"x", AAD)
    with pytest.raises(ValueError, match="32 bytes"):
        open_sealed(key, seal(KEY, b"x", AAD), AAD)


def test_field_aad_is_unambiguous() -> None:
    assert field_aad("a", "bc", "1") != field_aad("ab", "c", "1")
    assert field_aad("t", "c", "12") != field_aad("t", "c1", "2")
    assert field_aad("t", "c", "1") == field_aad("t", "c", "1")


def test_derive_key_is_deterministic_and_per_purpose() -> None:
    master = bytes(range(32))
    key = derive_key(master, "blind-index:email")
    assert len(key) == 32
    assert key == derive_key(master, "blind-index:email")
    assert key != derive_key(master, "session")
    assert key != derive_key(bytes(32), "blind-index:email")
    assert master not in key


def test_derive_key_refuses_weak_input() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        derive_key(bytes(16), "session")
    with pytest.raises(ValueError, match="purpose"):
        derive_key(bytes(32), "")
