"""`portal audit export -o PATH`: sets a mode only on the file it creates, never on what PATH names.

Issue 10 item 22: run as root with ``-o /dev/null`` the old command made /dev/null
mode 0600. These tests use a FIFO and a private /dev/null-like character device
made in tmp_path, never the machine's /dev/null.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from flask import Flask

from portal import cli
from portal.extensions import db
from portal.services import audit_query
from portal.services.audit_query import AuditFilter
from tests.factories import make_patient, make_user
from tests.support.faults import fill, tiny_disk

Export = Callable[..., Result]


@pytest.fixture
def export(app: Flask) -> Export:
    """Seed a few audit events; return a runner of ``portal audit export`` on this database."""
    with app.app_context():
        make_user(db.session, "staff", "staff@example.org", "Sam Staffer")
        make_patient(db.session)
        db.session.commit()
    env = {"PORTAL_DATABASE_URL": app.config["DATABASE_URL"]}

    def run(*args: str) -> Result:
        return CliRunner().invoke(cli.main, ["audit", "export", "--format", "csv", *args], env=env)

    return run


def exports_recorded(app: Flask) -> int:
    with app.app_context():
        return audit_query.count(db.session, AuditFilter(action="audit.export"))


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_file_is_0600_whatever_the_umask(export: Export, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "trail.csv"
    old_umask = os.umask(0)
    try:
        result = export("-o", str(target))
    finally:
        os.umask(old_umask)
    assert result.exit_code == 0, result.output
    assert mode(target) == 0o600
    assert target.read_text(encoding="utf-8").startswith("seq,")
    assert os.listdir(target.parent) == ["trail.csv"]  # no temporary file left behind


def test_existing_file_is_refused_without_force(app: Flask, export: Export, tmp_path: Path) -> None:
    target = tmp_path / "keep.csv"
    target.write_text("keep me")
    target.chmod(0o640)
    result = export("-o", str(target))
    assert result.exit_code == 1
    assert "exists" in result.output
    assert "--force" in result.output
    assert target.read_text() == "keep me"
    assert mode(target) == 0o640
    assert exports_recorded(app) == 0


def test_force_replaces_the_file_with_a_new_private_one(
    app: Flask, export: Export, tmp_path: Path
) -> None:
    target = tmp_path / "old.csv"
    target.write_text("old")
    target.chmod(0o644)
    other_name = tmp_path / "hardlink.csv"
    os.link(target, other_name)  # someone else's name for the old file keeps the old one
    result = export("--force", "-o", str(target))
    assert result.exit_code == 0, result.output
    assert mode(target) == 0o600
    assert target.read_text(encoding="utf-8").startswith("seq,")
    assert other_name.read_text() == "old"
    assert mode(other_name) == 0o644
    assert exports_recorded(app) == 1


def test_symlink_is_never_followed(export: Export, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("system file")
    victim.chmod(0o644)
    link = tmp_path / "out.csv"
    link.symlink_to(victim)
    refused = export("-o", str(link))
    assert refused.exit_code == 1
    replaced = export("--force", "-o", str(link))
    assert replaced.exit_code == 0, replaced.output
    assert not link.is_symlink()
    assert mode(link) == 0o600
    assert victim.read_text() == "system file"
    assert mode(victim) == 0o644


def test_character_device_is_written_as_it_is(export: Export, tmp_path: Path) -> None:
    device = tmp_path / "null"
    os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a private /dev/null twin
    device.chmod(0o666)
    before = os.stat(device)
    result = export("-o", str(device))
    assert result.exit_code == 0, result.output
    after = os.stat(device)
    assert stat.S_ISCHR(after.st_mode)
    assert (after.st_mode, after.st_rdev, after.st_uid) == (
        before.st_mode,
        before.st_rdev,
        before.st_uid,
    )
    assert mode(device) == 0o666


def test_fifo_receives_the_export_and_keeps_its_mode(
    app: Flask, export: Export, tmp_path: Path
) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    fifo.chmod(0o644)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = export("-o", str(fifo))
    reader.join(timeout=30)
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert mode(fifo) == 0o644
    assert received[0].startswith(b"seq,")
    assert exports_recorded(app) == 1


def test_another_users_fifo_is_refused(app: Flask, export: Export, tmp_path: Path) -> None:
    # A local user plants a FIFO where root will export to: they must receive nothing.
    tmp_path.chmod(0o755)
    fifo = tmp_path / "audit.csv"
    os.mkfifo(fifo)
    os.chown(fifo, 65534, 65534)
    link = tmp_path / "link.csv"
    link.symlink_to(fifo)
    for target in (fifo, link):
        result = export("-o", str(target))
        assert result.exit_code == 1
        assert "another user" in result.output
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert exports_recorded(app) == 0


def test_folder_that_does_not_exist_is_a_clear_error(
    app: Flask, export: Export, tmp_path: Path
) -> None:
    result = export("-o", str(tmp_path / "missing" / "trail.csv"))
    assert result.exit_code == 1
    assert "cannot write" in result.output
    assert "Traceback" not in result.output
    assert exports_recorded(app) == 0


def test_an_export_that_fails_midway_is_still_recorded(
    app: Flask, export: Export, tmp_path: Path
) -> None:
    """Rows may have left before the failure: the disclosure must be in the trail."""
    with tiny_disk(tmp_path / "disk", "1m") as disk:
        fill(disk)
        result = export("-o", str(disk / "trail.csv"))
    assert result.exit_code == 1
    assert "cannot write" in result.output
    assert exports_recorded(app) == 1
