"""`portal demo` scans uploads when a clamd answers (the configured one, or Debian's default
socket) and its banner says whether scanning is on, and why not."""

from __future__ import annotations

from pathlib import Path

from flask import Flask

from portal.commands.demo import DEBIAN_CLAMD, _banner, demo_scanning
from tests.support.clamd import Clamd


def test_a_clamd_at_the_default_socket_turns_scanning_on(clamd: Clamd) -> None:
    found = str(clamd.socket_path)
    assert demo_scanning(None, False, default=found) == (
        found,
        f"malware scanning: on (clamd at {found})",
    )


def test_no_clamd_at_the_default_socket_leaves_scanning_off(tmp_path: Path) -> None:
    dead = str(tmp_path / "clamd.ctl")
    assert demo_scanning(None, False, default=dead) == (
        None,
        f"malware scanning: off (no clamd found at {dead})",
    )


def test_a_configured_clamd_is_used_and_told_when_it_does_not_answer(
    clamd: Clamd, tmp_path: Path
) -> None:
    dead = str(tmp_path / "clamd.ctl")
    assert demo_scanning(clamd.tcp_address, False, default=dead) == (
        None,  # already configured: nothing to set
        f"malware scanning: on (clamd at {clamd.tcp_address})",
    )
    assert demo_scanning(dead, False, default=str(clamd.socket_path)) == (
        None,
        f"malware scanning: required, but clamd at {dead} does not answer (uploads refused)",
    )


def test_told_off_scans_nothing_even_with_a_clamd(clamd: Clamd) -> None:
    assert demo_scanning(None, True, default=str(clamd.socket_path)) == (
        None,
        "malware scanning: off (PORTAL_SCAN_UPLOADS=off)",
    )


def test_the_banner_carries_the_line(app: Flask, tmp_path: Path) -> None:
    line = f"malware scanning: off (no clamd found at {DEBIAN_CLAMD})"
    assert f"\n  {line}\n" in _banner(app, 5000, tmp_path, line)
