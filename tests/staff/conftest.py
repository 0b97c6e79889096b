"""Fixtures for the staff tests: a private temp folder, and the portal on a real HTTP server."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask

from tests.support.uploads import LiveServer, serve


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp folder of this test's own for whatever the process makes (TMPDIR, tempfile)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def live() -> Iterator[Callable[[Flask], LiveServer]]:
    """Serve an app on werkzeug's threaded server (loopback) with a BodyMonitor; stop after."""
    started: list[LiveServer] = []

    def start(app: Flask) -> LiveServer:
        server = serve(app)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
