"""Partial uploads (``.part`` files) of killed writers: a live writer's lock protects its file;
a dead one's goes at start-up and at ``portal retention run``, without the old hour's wait
(issue 11 item 14)."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask import Flask

from portal import cli
from portal.extensions import db
from portal.models import AuditEvent
from portal.services import content
from portal.storage import TEMP_GRACE_SECONDS, FilesystemBlobStore

# A writer as FilesystemBlobStore.put makes one: create, lock, write; then it hangs (an
# upload in progress) until the test kills it with SIGKILL (no clean-up runs).
WRITER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"ciphertext so far")
print("locked", flush=True)
time.sleep(60)
"""


def start_writer(path: Path) -> subprocess.Popen[str]:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "locked"
    return writer


def kill(writer: subprocess.Popen[str]) -> None:
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)


def age(path: Path, seconds: float = TEMP_GRACE_SECONDS + 1) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


@pytest.fixture
def store(tmp_path: Path) -> FilesystemBlobStore:
    return FilesystemBlobStore(tmp_path / "blobs")


def test_a_live_upload_survives_the_sweep_and_a_killed_one_goes(store: FilesystemBlobStore) -> None:
    part = store.root / "tmp" / f"{'ab' * 16}.part"
    writer = start_writer(part)
    try:
        age(part, 7200)  # older than any grace: only the lock tells it is alive
        assert store.sweep_temp() == 0
        assert part.exists()
    finally:
        kill(writer)
    assert store.sweep_temp() == 1  # minutes old is enough once the writer is gone
    assert not part.exists()


def test_a_file_just_created_is_left_for_its_writer_to_lock(store: FilesystemBlobStore) -> None:
    part = store.root / "tmp" / f"{'cd' * 16}.part"
    part.write_bytes(b"x")  # nobody holds it, but it is seconds old
    assert store.sweep_temp() == 0
    age(part)
    assert store.sweep_temp() == 1


def killed_upload(app: Flask) -> Path:
    with app.app_context():
        part = content.blob_store().root / "tmp" / f"{'ef' * 16}.part"
    kill(start_writer(part))
    age(part, 120)  # two minutes: the old rule kept it for an hour
    return part


def test_retention_run_sweeps_partial_uploads_and_audits_the_count(app: Flask) -> None:
    part = killed_upload(app)
    result = CliRunner().invoke(
        cli.main, ["retention", "run"], env={"PORTAL_DATABASE_URL": app.config["DATABASE_URL"]}
    )
    assert result.exit_code == 0, result.output
    assert "1 partial uploads removed" in result.output
    assert not part.exists()
    with app.app_context():
        [event] = db.session.query(AuditEvent).filter_by(action="retention.run").all()
        assert json.loads(event.details)["partial_uploads_removed"] == 1


def test_start_up_sweeps_partial_uploads(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    part = killed_upload(app)
    monkeypatch.setenv("PORTAL_DATABASE_URL", app.config["DATABASE_URL"])
    started = runpy.run_module("portal.wsgi", run_name="portal.wsgi")  # as a WSGI server loads it
    assert isinstance(started["app"], Flask)
    assert not part.exists()
    started["app"].extensions["engine"].dispose()


def test_the_retention_timer_runs_the_sweep() -> None:
    deploy = Path(__file__).resolve().parents[1] / "deploy" / "systemd"
    timer = (deploy / "pickup-retention.timer").read_text()
    service = (deploy / "pickup-retention.service").read_text()
    assert "Unit=pickup-retention.service" in timer
    assert "OnCalendar=" in timer
    exec_start = [line for line in service.splitlines() if line.startswith("ExecStart=")]
    assert exec_start == ["ExecStart=/opt/pickup-portal/venv/bin/portal retention run"]


def test_a_real_put_in_progress_is_never_swept(store: FilesystemBlobStore) -> None:
    """The store's own writer, mid-upload in a thread of this process, holds its lock."""
    started, release = threading.Event(), threading.Event()
    stored: list[str] = []

    def slow_upload() -> Iterator[bytes]:
        yield b"first part of a large upload "
        started.set()
        release.wait(30)
        yield b"and the rest"

    worker = threading.Thread(target=lambda: stored.append(store.put(slow_upload())))
    worker.start()
    try:
        assert started.wait(30)
        [part] = list((store.root / "tmp").glob("*.part"))
        age(part, 7200)
        assert store.sweep_temp() == 0
        assert part.exists()
    finally:
        release.set()
        worker.join(30)
    assert stored, "the upload finished"
    with store.open(stored[0]) as blob:
        assert blob.read() == b"first part of a large upload and the rest"
