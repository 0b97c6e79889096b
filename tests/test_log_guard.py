"""The suite-wide log guard itself: it must see what it is there to catch."""

from __future__ import annotations

import hashlib

from portal.security.tokens import new_token
from tests.factories import PATIENT_NAME
from tests.log_guard import leaks_in


def test_finds_an_email_address_a_name_and_a_token() -> None:
    token = new_token()
    line = f'{{"message": "key acct:zq@example.org", "name": "{PATIENT_NAME}", "t": "{token}"}}'
    leaks = leaks_in(line)
    assert "zq@example.org" in leaks
    assert PATIENT_NAME in leaks
    assert token in leaks


def test_passes_ids_hashes_and_rule_paths() -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    line = (
        f'{{"message": "request", "rule": "/p/<token>", "row": 42, "hash": "{digest}", '
        f'"request_id": "3f2a9c1e0b7d4e5f", "sent": "<notice-n42@portal.example.org>"}}'
    )
    assert leaks_in(line) == []


def test_a_message_id_does_not_hide_an_address_beside_it() -> None:
    line = '{"message": "accepted <notice-n1@portal.example.org> for zq@example.org"}'
    assert leaks_in(line) == ["zq@example.org"]
