from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from portal.security import passwords
from portal.security.passwords import (
    DUMMY_HASH,
    Blocklist,
    check_password,
    hash_password,
    make_hasher,
    needs_rehash,
    normalise,
    verify_password,
)

STRONG_12 = "vK8#qz!Lm2@w"
# The cheapest hasher the floor allows, for tests that are not about the parameters.
FLOOR = {"time_cost": 2, "memory_cost": 19_456, "parallelism": 1}


def _wide(ascii_text: str) -> str:
    """Return the full-width form of printable ASCII (U+FF01..U+FF5E)."""
    return "".join(chr(ord(ch) + 0xFEE0) for ch in ascii_text)


# "ﬁve" with the fi ligature, then "green" in full-width letters.
MIXED = "\ufb01ve " + _wide("green") + " lanterns"
ENCODED = re.compile(r"^\$argon2id\$v=19\$m=(\d+),t=(\d+),p=(\d+)\$[^$]+\$[^$]+$")


@pytest.fixture(scope="module")
def fast_hasher() -> passwords.PasswordHasher:
    return make_hasher(**FLOOR)


def _params(encoded: str) -> tuple[int, int, int]:
    match = ENCODED.match(encoded)
    assert match, encoded
    m, t, p = (int(g) for g in match.groups())
    return m, t, p


# --- policy ---------------------------------------------------------------------------


def test_eleven_characters_refused_with_length_message() -> None:
    messages = check_password(STRONG_12[:11])
    assert any("at least 12 characters" in m for m in messages)


def test_twelve_strong_characters_accepted() -> None:
    assert check_password(STRONG_12) == []


def test_long_passphrase_accepted() -> None:
    assert check_password("lantern quietly orbits the marsh at dawn") == []


def test_sixty_four_characters_accepted() -> None:
    password = ("Tk9!marble-violet-Quokka " * 3)[:64]
    assert len(password) == 64
    assert check_password(password) == []


def test_max_length_accepted_and_over_max_refused() -> None:
    base = "Tk9!marble-violet-Quokka harbour drifts "
    assert check_password((base * 4)[:128]) == []
    messages = check_password((base * 4)[:129])
    assert messages == ["Use at most 128 characters."]


def test_spaces_and_unicode_accepted() -> None:
    assert check_password("grüne Äpfel fliegen über Zürich") == []


def test_control_characters_refused() -> None:
    messages = check_password("lantern quietly\torbits the marsh")
    assert any("control characters" in m for m in messages)


@pytest.mark.parametrize("common", ["password1234", "qwertyuiop123"])
def test_common_passwords_refused_by_zxcvbn(common: str) -> None:
    messages = check_password(common)
    assert len(messages) == 1
    assert messages[0].startswith("This password is too easy to guess")
    assert "passphrase" in messages[0]
    assert common not in messages[0]


def test_email_local_part_refused() -> None:
    messages = check_password("Zq8!mariposa77wind", email="Mariposa77@example.org")
    assert "Do not include your email address or part of it." in messages


def test_short_email_local_part_ignored() -> None:
    assert check_password("jo-vK8#qz!Lm2@w", email="jo@example.org") == []


def test_name_refused_case_insensitively() -> None:
    messages = check_password("sunny-HARGREAVES-9!kq", name="Ada Hargreaves")
    assert "Do not include your name or part of it." in messages
    assert all("Hargreaves" not in m and "hargreaves" not in m for m in messages)


def test_blocklist_hit_refused_and_miss_accepted(tmp_path: Path) -> None:
    path = tmp_path / "blocklist.txt"
    path.write_text("Correct Horse Battery Staple\nletmein\n\n", encoding="utf-8")
    blocklist = Blocklist.from_file(path)
    assert len(blocklist) == 2
    hit = check_password("correct horse battery staple", blocklist=blocklist)
    assert hit == ["This password appears in a list of breached or common passwords."]
    assert check_password("lantern quietly orbits the marsh", blocklist=blocklist) == []


def test_blocklist_normalises_entries_and_lookups(tmp_path: Path) -> None:
    path = tmp_path / "blocklist.txt"
    path.write_text(_wide("FULL") + "width passphrase\n", encoding="utf-8")
    blocklist = Blocklist.from_file(path)
    assert "fullwidth PASSPHRASE" in blocklist
    assert "fullwidth passphras" not in blocklist


def test_blocklist_unreadable_file_raises_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Cannot read password blocklist"):
        Blocklist.from_file(tmp_path / "missing.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="Cannot read password blocklist"):
        Blocklist.from_file(bad)


# --- normalisation --------------------------------------------------------------------


def test_nfkc_normalise() -> None:
    assert normalise("\ufb01sh") == "fish"
    assert normalise(_wide("pass")) == "pass"


def test_ligature_and_full_width_verify_against_nfkc_form(
    fast_hasher: passwords.PasswordHasher,
) -> None:
    stored = fast_hasher.hash_password(MIXED)
    assert fast_hasher.verify_password(stored, "five green lanterns")
    nfkc_stored = fast_hasher.hash_password("five green lanterns")
    assert fast_hasher.verify_password(nfkc_stored, MIXED)
    assert unicodedata.is_normalized("NFKC", normalise(MIXED))


def test_length_counted_after_nfkc() -> None:
    # Eleven code points as typed, twelve after NFKC expands the ligature.
    typed = "\ufb01Kq8#zLm2@w"
    assert len(typed) == 11
    assert check_password(typed) == []


# --- hashing --------------------------------------------------------------------------


def test_default_hash_meets_owasp_floor_and_verifies() -> None:
    stored = hash_password(STRONG_12)
    m, t, p = _params(stored)
    assert m >= 19_456
    assert t >= 2
    assert p == 1
    assert verify_password(stored, STRONG_12)
    assert not verify_password(stored, STRONG_12 + "x")
    assert not needs_rehash(stored)


def test_dummy_hash_uses_default_parameters() -> None:
    assert _params(DUMMY_HASH) == (
        passwords.MEMORY_COST_KIB,
        passwords.TIME_COST,
        passwords.PARALLELISM,
    )
    assert not needs_rehash(DUMMY_HASH)
    assert not verify_password(DUMMY_HASH, STRONG_12)


def test_needs_rehash_after_parameter_change(fast_hasher: passwords.PasswordHasher) -> None:
    stored = fast_hasher.hash_password(STRONG_12)
    assert not fast_hasher.needs_rehash(stored)
    assert needs_rehash(stored)
    stronger = make_hasher(time_cost=3, memory_cost=19_456, parallelism=1)
    assert stronger.needs_rehash(stored)
    assert stronger.verify_password(stored, STRONG_12)


def test_wrong_password_returns_false(fast_hasher: passwords.PasswordHasher) -> None:
    stored = fast_hasher.hash_password(STRONG_12)
    assert fast_hasher.verify_password(stored, "something else entirely") is False


@pytest.mark.parametrize(
    "stored",
    ["", "not a hash", "$argon2id$v=19$m=65536,t=2,p=1$!!!$???", "$2b$12$abcdefghijklmnopqrstuv"],
)
def test_malformed_stored_hash_returns_false(stored: str) -> None:
    assert verify_password(stored, STRONG_12) is False
    assert needs_rehash(stored) is True


def test_unencodable_password_does_not_raise_on_verify() -> None:
    assert verify_password(DUMMY_HASH, "lone \ud800 surrogate") is False


def test_parameters_below_floor_refused() -> None:
    with pytest.raises(ValueError, match="below the floor"):
        make_hasher(time_cost=1, memory_cost=19_456, parallelism=1)
    with pytest.raises(ValueError, match="below the floor"):
        make_hasher(time_cost=2, memory_cost=8_192, parallelism=1)


ORG = "Riverside Family Practice"
SERVICE_NAME_REASON = "name of this service or of the organisation"


@pytest.mark.parametrize(
    "password",
    [
        "Pickup Portal forever 2024",  # the product, as is
        "pickupportal!!lantern9",  # without the space, lower case
        "P1ckup Porta1 lantern 77",  # common substitutions
        "PikupPortl winter 2025 x",  # a near-copy
        _wide("PickupPortal") + " 2024 lantern",  # full-width letters (NFKC)
        "Riverside Family Practice 1987",  # the organisation
        "riverside-family-practice-77",
        "Rivrside Family Practise 9",
    ],
)
def test_product_and_organisation_names_refused(password: str) -> None:
    reasons = check_password(password, organisation=ORG)
    assert any(SERVICE_NAME_REASON in r for r in reasons), reasons
    assert not any(password in r for r in reasons)


@pytest.mark.parametrize(
    "password",
    [
        "Velvet lighthouse quarrel 77",
        "pick up the portable radio 42",  # the words apart, not the name
        "A riverside walk on Sundays 7",  # one word of the organisation is not its name
    ],
)
def test_passwords_near_but_not_the_names_pass(password: str) -> None:
    assert check_password(password, organisation=ORG) == []


def test_product_name_refused_without_an_organisation() -> None:
    assert any(SERVICE_NAME_REASON in r for r in check_password("My pickup portal key 9431"))


def test_short_organisation_name_refuses_nothing_on_its_own() -> None:
    assert check_password("Velvet lighthouse abc quarrel 77", organisation="ABC") == []


def test_name_check_work_is_bounded_for_huge_input() -> None:
    reasons = check_password("x" * 100_000 + "Pickup Portal", organisation=ORG)
    assert reasons == ["Use at most 128 characters."]  # the name sits past the checked part


# --- the test-only hasher -------------------------------------------------------------


def test_insecure_test_hasher_is_cheap_and_its_hashes_are_replaced_at_sign_in() -> None:
    cheap = passwords.insecure_hasher_for_tests()
    stored = cheap.hash_password(STRONG_12)
    assert _params(stored) == (8, 1, 1)
    assert cheap.verify_password(stored, STRONG_12)
    assert verify_password(stored, STRONG_12)  # the parameters travel with the hash
    assert needs_rehash(stored)  # so a cheap hash that reached a real database is replaced


def test_floor_still_refuses_the_test_parameters_by_the_ordinary_path() -> None:
    with pytest.raises(ValueError, match="below the floor"):
        make_hasher(**passwords.INSECURE_TEST_PARAMETERS)
    with pytest.raises(ValueError, match="below the floor"):
        passwords.PasswordHasher(**passwords.INSECURE_TEST_PARAMETERS)


def test_dummy_hash_follows_the_hasher_parameters(
    fast_hasher: passwords.PasswordHasher,
) -> None:
    assert passwords.default_hasher().dummy_hash == DUMMY_HASH
    assert _params(fast_hasher.dummy_hash) == (19_456, 2, 1)
    cheap = passwords.insecure_hasher_for_tests()
    assert _params(cheap.dummy_hash) == (8, 1, 1)
    assert not cheap.verify_password(cheap.dummy_hash, STRONG_12)
