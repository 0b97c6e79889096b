from __future__ import annotations

import math
import re

import pytest

from portal.security import recovery

PEPPER = b"p" * 32
_CHAR = "[23456789abcdefghijkmnpqrstuvwxyz]"
FORMAT = re.compile(rf"^{_CHAR}{{4}}(-{_CHAR}{{4}}){{2}}$")


def test_ten_distinct_codes_in_format() -> None:
    codes = recovery.generate_codes()
    assert len(codes) == 10
    assert len(set(codes)) == 10
    for code in codes:
        assert FORMAT.match(code), code
        assert not set(code) & set("0o1lO")


def test_at_least_sixty_bits() -> None:
    length = recovery.GROUPS * recovery.GROUP_LENGTH
    assert length * math.log2(len(set(recovery.ALPHABET))) >= 60
    assert len(set(recovery.ALPHABET)) == len(recovery.ALPHABET)


def test_generate_codes_count_and_bad_count() -> None:
    assert len(recovery.generate_codes(3)) == 3
    with pytest.raises(ValueError, match="at least 1"):
        recovery.generate_codes(0)


def test_verify_accepts_normalised_forms() -> None:
    code = recovery.generate_codes(1)[0]
    stored = recovery.hash_code(code, PEPPER)
    assert recovery.verify_code(stored, code, PEPPER)
    assert recovery.verify_code(stored, code.upper(), PEPPER)
    assert recovery.verify_code(stored, f"  {code.replace('-', ' ')} ", PEPPER)
    assert recovery.verify_code(stored, code.replace("-", ""), PEPPER)


def test_normalise_code() -> None:
    assert recovery.normalise_code(" ABCD-efgh ijkm\n") == "abcdefghijkm"


def test_wrong_code_refused() -> None:
    first, second = recovery.generate_codes(2)
    stored = recovery.hash_code(first, PEPPER)
    assert not recovery.verify_code(stored, second, PEPPER)
    assert not recovery.verify_code(stored, "", PEPPER)
    assert not recovery.verify_code("not-a-hash", first, PEPPER)


def test_other_pepper_refused() -> None:
    code = recovery.generate_codes(1)[0]
    stored = recovery.hash_code(code, PEPPER)
    assert not recovery.verify_code(stored, code, b"q" * 32)


def test_stored_hash_is_hex_sha256_without_the_code() -> None:
    code = recovery.generate_codes(1)[0]
    stored = recovery.hash_code(code, PEPPER)
    assert re.fullmatch(r"[0-9a-f]{64}", stored)
    assert recovery.normalise_code(code) not in stored


def test_short_pepper_refused() -> None:
    with pytest.raises(ValueError, match="pepper"):
        recovery.hash_code("abcd-efgh-ijkm", b"short")
