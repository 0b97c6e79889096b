"""Versioned key-encryption keys in a 0600 JSON file."""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from portal.crypto.errors import ContentTampered, KeyUnavailable
from portal.crypto.keyring import Keyring, file_identity

AAD = b"data_keys:17"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "instance" / "keyring.json"


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Run with umask 000, the worst case for file modes."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def document(path: Path) -> dict[str, object]:
    return json.loads(path.read_text())


def test_load_or_create_writes_0600_file_even_with_open_umask(path: Path, open_umask: None) -> None:
    keyring = Keyring.load_or_create(path)
    assert file_mode(path) == 0o600
    assert file_mode(path.parent) == 0o700
    assert keyring.active_version == 1
    assert keyring.versions() == [1]
    data = document(path)
    assert data["format"] == 1
    assert data["active"] == 1
    assert len(base64.b64decode(data["keys"]["1"])) == 32  # type: ignore[index]
    assert len(base64.b64decode(data["root"])) == 32  # type: ignore[arg-type]
    assert sorted(p.name for p in path.parent.iterdir()) == ["keyring.json"]  # no temp left


def test_load_or_create_reuses_existing_file(path: Path) -> None:
    first = Keyring.load_or_create(path)
    before = path.read_bytes()
    second = Keyring.load_or_create(path)
    assert path.read_bytes() == before
    version, wrapped = first.wrap(bytes(32), AAD)
    assert second.unwrap(version, wrapped, AAD) == bytes(32)


def test_wrap_unwrap_across_versions(path: Path) -> None:
    keyring = Keyring.load_or_create(path)
    dek1 = Keyring.new_data_key()
    v1, wrapped1 = keyring.wrap(dek1, AAD)
    assert keyring.add_version() == 2
    assert keyring.active_version == 2
    assert file_mode(path) == 0o600
    dek2 = Keyring.new_data_key()
    v2, wrapped2 = keyring.wrap(dek2, AAD)
    assert (v1, v2) == (1, 2)
    reloaded = Keyring.load(path)
    assert reloaded.versions() == [1, 2]
    assert reloaded.unwrap(1, wrapped1, AAD) == dek1
    assert reloaded.unwrap(2, wrapped2, AAD) == dek2


def test_rewrap_then_remove_old_version(path: Path) -> None:
    keyring = Keyring.load_or_create(path)
    dek = Keyring.new_data_key()
    _v, wrapped = keyring.wrap(dek, AAD)
    keyring.add_version()
    version, rewrapped = keyring.rewrap(1, wrapped, AAD)
    assert version == 2
    keyring.remove_version(1)
    assert Keyring.load(path).versions() == [2]
    assert keyring.unwrap(2, rewrapped, AAD) == dek
    with pytest.raises(KeyUnavailable, match="version 1"):
        keyring.unwrap(1, wrapped, AAD)
    keyring.remove_version(1)  # absent: nothing to do


def test_remove_active_version_is_refused(path: Path) -> None:
    keyring = Keyring.load_or_create(path)
    with pytest.raises(ValueError, match="active"):
        keyring.remove_version(1)
    assert Keyring.load(path).versions() == [1]


def test_unwrap_with_wrong_aad_or_version_is_tampered(path: Path) -> None:
    keyring = Keyring.load_or_create(path)
    _v, wrapped = keyring.wrap(bytes(32), AAD)
    keyring.add_version()
    with pytest.raises(ContentTampered):
        keyring.unwrap(1, wrapped, b"data_keys:18")
    with pytest.raises(ContentTampered):
        keyring.unwrap(2, wrapped, AAD)  # recorded under the wrong version
    with pytest.raises(ContentTampered):
        keyring.unwrap(1, wrapped[:-1] + bytes([wrapped[-1] ^ 1]), AAD)
    with pytest.raises(ContentTampered):
        keyring.unwrap(1, wrapped[:20], AAD)


def test_unwrap_missing_version_is_unavailable(path: Path) -> None:
    keyring = Keyring.load_or_create(path)
    with pytest.raises(KeyUnavailable, match="version 9"):
        keyring.unwrap(9, bytes(60), AAD)


def test_add_version_keeps_versions_added_by_another_process(path: Path) -> None:
    first = Keyring.load_or_create(path)
    stale = Keyring.load(path)
    assert first.add_version() == 2
    assert stale.add_version() == 3  # re-read under the lock, so version 2 survives
    assert Keyring.load(path).versions() == [1, 2, 3]


def test_derive_is_stable_across_rotation(path: Path) -> None:
    keyring = Keyring.load_or_create(path)
    index_key = keyring.derive("blind-index:email")
    keyring.add_version()
    keyring.remove_version(1)
    assert Keyring.load(path).derive("blind-index:email") == index_key
    assert keyring.derive("other") != index_key


def test_repr_and_errors_carry_no_key_material(path: Path) -> None:
    keyring = Keyring.load_or_create(path)
    data = document(path)
    secrets = [data["root"], *data["keys"].values()]  # type: ignore[attr-defined]
    assert not any(secret in repr(keyring) for secret in secrets)
    data["root"] = data["keys"]["1"][:-4]  # type: ignore[index]
    path.write_text(json.dumps(data))
    with pytest.raises(KeyUnavailable) as excinfo:
        Keyring.load(path)
    assert str(path) in str(excinfo.value)
    assert not any(secret[:8] in str(excinfo.value) for secret in secrets)


def test_missing_file_is_unavailable(path: Path) -> None:
    with pytest.raises(KeyUnavailable, match=r"keyring\.json"):
        Keyring.load(path)


KEY_B64 = base64.b64encode(bytes(32)).decode()
MALFORMED = {
    "not json": "{",
    "not an object": "[]",
    "wrong format": json.dumps({"format": 2, "active": 1, "keys": {"1": KEY_B64}, "root": KEY_B64}),
    "no keys": json.dumps({"format": 1, "active": 1, "keys": {}, "root": KEY_B64}),
    "active missing": json.dumps(
        {"format": 1, "active": 2, "keys": {"1": KEY_B64}, "root": KEY_B64}
    ),
    "active not int": json.dumps(
        {"format": 1, "active": "1", "keys": {"1": KEY_B64}, "root": KEY_B64}
    ),
    "bad version": json.dumps({"format": 1, "active": 1, "keys": {"x": KEY_B64}, "root": KEY_B64}),
    "bad base64": json.dumps({"format": 1, "active": 1, "keys": {"1": "!!!"}, "root": KEY_B64}),
    "short key": json.dumps({"format": 1, "active": 1, "keys": {"1": "AAAA"}, "root": KEY_B64}),
    "no root": json.dumps({"format": 1, "active": 1, "keys": {"1": KEY_B64}}),
    "binary": "\xff\xfe",
}


@pytest.mark.parametrize("content", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_file_is_unavailable(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(KeyUnavailable, match="malformed") as excinfo:
        Keyring.load(path)
    assert str(path) in str(excinfo.value)
    with pytest.raises(KeyUnavailable):
        Keyring.load_or_create(path)  # never overwrites a file it cannot read


def test_unreadable_file_is_unavailable(path: Path) -> None:
    path.mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(KeyUnavailable, match="unreadable"):
        Keyring.load(path)


def test_new_data_key_is_random_32_bytes() -> None:
    assert len(Keyring.new_data_key()) == 32
    assert Keyring.new_data_key() != Keyring.new_data_key()


def test_a_loaded_keyring_knows_the_file_it_came_from(path: Path) -> None:
    """Issue 13: callers cache a keyring by the identity of the file it was read from."""
    made = Keyring.load_or_create(path)
    assert made.identity is None  # made here, not read
    loaded = Keyring.load(path)
    assert loaded.identity == file_identity(path)
    assert loaded.identity is not None
    assert loaded.identity.inode == path.stat().st_ino
    loaded.add_version()  # the file is replaced: the identity read no longer matches it
    assert file_identity(path) != loaded.identity
    assert Keyring.load(path).identity == file_identity(path)
    assert file_identity(path.with_name("missing.json")) is None
