"""Fixtures for the scanner tests: clamds of their own (to stop, or with small limits) and
scanners that never answer. The shared clamd is the session fixture in tests/conftest.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.clamd import MAX_UPLOAD, Clamd, SilentScanner


@pytest.fixture
def make_clamd(tmp_path: Path) -> Iterator[Callable[..., Clamd]]:
    """Return a starter of private clamds (``stream_max_length`` in bytes); each is stopped
    after the test."""
    started: list[Clamd] = []

    def start(stream_max_length: int = MAX_UPLOAD) -> Clamd:
        folder = tmp_path / f"clamd{len(started)}"
        folder.mkdir()
        server = Clamd(folder, stream_max_length)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def silent_scanner(tmp_path: Path) -> Iterator[Callable[..., SilentScanner]]:
    """Return a starter of :class:`SilentScanner` servers (``reads``: whether they drain what
    they are sent); each is stopped after the test."""
    started: list[SilentScanner] = []

    def start(*, reads: bool) -> SilentScanner:
        folder = tmp_path / f"silent{len(started)}"
        folder.mkdir()
        server = SilentScanner(folder, reads=reads)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
