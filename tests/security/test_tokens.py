from __future__ import annotations

import hashlib

from portal.security import tokens


def test_token_length_and_alphabet() -> None:
    token = tokens.new_token()
    assert len(token) == 43
    assert tokens.is_well_formed_token(token)
    assert "=" not in token


def test_tokens_unique_over_a_thousand() -> None:
    assert len({tokens.new_token() for _ in range(1000)}) == 1000


def test_token_hash_is_sha256_digest() -> None:
    token = tokens.new_token()
    digest = tokens.token_hash(token)
    assert len(digest) == 32
    assert digest == hashlib.sha256(token.encode()).digest()


def test_is_well_formed_token_refuses_other_shapes() -> None:
    token = tokens.new_token()
    assert not tokens.is_well_formed_token(token[:-1])
    assert not tokens.is_well_formed_token(token + "A")
    assert not tokens.is_well_formed_token(token[:-1] + "+")
    assert not tokens.is_well_formed_token(token[:-1] + "/")
    assert not tokens.is_well_formed_token(token[:-1] + "é")
    assert not tokens.is_well_formed_token(token + "\n")
    assert not tokens.is_well_formed_token("")


def test_constant_time_equals() -> None:
    assert tokens.constant_time_equals("abc", "abc")
    assert tokens.constant_time_equals(b"abc", "abc")
    assert not tokens.constant_time_equals("abc", "abd")
    assert tokens.constant_time_equals("héllo", "héllo")
    assert not tokens.constant_time_equals("héllo", b"hello")
