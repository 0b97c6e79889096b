"""The keyring is read once and kept while its file stays the same file in the same state
(device, inode, times, size); any change, even one that keeps the modification time, reads
it again (issue 13 item 1). A transaction stats the file once, however many keys it opens."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import select

from portal.crypto.keyring import Keyring
from portal.extensions import db
from portal.models import DataKey
from portal.services import keys
from tests.support.lists import crypto_calls


def ring_path(app: Flask) -> Path:
    return Path(app.config["KEYRING_PATH"])


def test_the_same_file_is_read_once(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    with app.app_context():
        keys.keyring()  # a keyring just created is read back once, with its identity
        first = keys.keyring()
        with crypto_calls(monkeypatch) as calls:
            again = [keys.keyring() for _ in range(20)]
        assert all(ring is first for ring in again)
        assert calls.keyring_loads == 0
        assert calls.keyring_stats == 20


def test_a_replaced_file_is_read_again_even_with_the_old_modification_time(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    with app.app_context():
        first = keys.keyring()
        path = ring_path(app)
        before = path.stat()
        copy = path.with_name("copy.json")
        shutil.copy2(path, copy)  # same bytes and times, another inode
        os.replace(copy, path)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert path.stat().st_mtime_ns == before.st_mtime_ns
        with crypto_calls(monkeypatch) as calls:
            fresh = keys.keyring()
            assert keys.keyring() is fresh
        assert fresh is not first
        assert calls.keyring_loads == 1


def test_a_file_rewritten_in_place_is_read_again(app: Flask) -> None:
    with app.app_context():
        first = keys.keyring()
        path = ring_path(app)
        inode, mtime = path.stat().st_ino, path.stat().st_mtime_ns
        data = path.read_bytes()
        with path.open("r+b") as handle:  # same inode; the change time moves
            handle.write(data)
        os.utime(path, ns=(mtime, mtime))
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == (inode, mtime)
        assert keys.keyring() is not first


def test_another_process_rotating_is_seen_by_the_next_call(app: Flask) -> None:
    with app.app_context():
        assert keys.keyring().versions() == [1]
        Keyring.load(ring_path(app)).add_version()  # as `portal keys rotate` elsewhere would
        assert keys.keyring().versions() == [1, 2]
        assert keys.keyring().active_version == 2


def test_a_transaction_stats_the_keyring_once_for_all_its_keys(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    with app.app_context():
        made = [keys.create(db.session, "message")[0].id for _ in range(25)]
        db.session.commit()
        with crypto_calls(monkeypatch) as calls:
            keys.prefetch(db.session, made)
            unwrapped = [keys.unwrap(db.session, key_id) for key_id in made * 2]
        assert len(set(unwrapped)) == 25
        assert calls.keyring_stats == 1
        assert sum(calls.unwrapped.values()) == 25  # each once; the second pass from memory
        db.session.commit()  # a new transaction asks again
        with crypto_calls(monkeypatch) as calls:
            keys.unwrap(db.session, made[0])
        assert calls.keyring_stats == 1


def test_a_key_rewrapped_by_a_rotation_mid_transaction_still_opens(app: Flask) -> None:
    """The transaction's keyring predates a rotation that another process committed: a key
    under the new KEK makes it ask for the keyring again, once."""
    with app.app_context():
        old, raw = keys.create(db.session, "message")
        other, other_raw = keys.create(db.session, "message")
        db.session.commit()
        assert keys.unwrap(db.session, old.id) == raw  # this transaction holds version 1
        elsewhere = Keyring.load(ring_path(app))
        elsewhere.add_version()
        row = db.session.scalar(select(DataKey).where(DataKey.id == other.id))
        assert row is not None
        assert row.wrapped is not None
        row.kek_version, row.wrapped = elsewhere.rewrap(row.kek_version, row.wrapped, keys.WRAP_AAD)
        db.session.flush()
        assert keys.unwrap(db.session, other.id) == other_raw
        db.session.rollback()
