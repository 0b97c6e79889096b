"""deploy/systemd: hardened units that systemd itself accepts.

`systemd-analyze verify` refuses a unit whose ExecStart binary is missing, and only warns
(exit 0) on an unknown key or a bad value. So the units are verified as installed: the copy
checked has its install prefix /opt/pickup-portal/venv pointed at this test run's
environment, where `portal` and `notifier` are real entry points, and any output at all
fails the test. scripts/system-packages.sh installs systemd where it is missing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.deploy import DEPLOY

UNITS = DEPLOY / "systemd"
SERVICES = sorted(UNITS.glob("*.service"))
INSTALL_PREFIX = "/opt/pickup-portal/venv"
SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"
EXPOSURE_LIMIT = 20  # systemd-analyze security's "2.0 OK", in its tenths
REQUIRED = {
    "User": "pickup",
    "Group": "pickup",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "CapabilityBoundingSet": "",
    "ReadWritePaths": "/var/lib/pickup-portal",
    "Environment": "PORTAL_INSTANCE_DIR=/var/lib/pickup-portal",
    "UMask": "0077",
}


def settings(unit: Path) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, values in order."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if match := re.fullmatch(r"([A-Za-z]+)=(.*)", line):
            found.setdefault(match.group(1), []).append(match.group(2))
    return found


def installed_copies(tmp_path: Path, edit: str = "") -> list[Path]:
    """The units with their install prefix pointed at this environment (and ``edit`` made)."""
    copies = []
    for unit in sorted(UNITS.glob("*.service")) + sorted(UNITS.glob("*.timer")):
        text = unit.read_text().replace(INSTALL_PREFIX, sys.prefix)
        if edit:
            text = text.replace(*edit.split("->"))
        (tmp_path / unit.name).write_text(text)
        copies.append(tmp_path / unit.name)
    return copies


def analyze(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SYSTEMD_ANALYZE, *map(str, argv)], capture_output=True, text=True, check=False, timeout=60
    )


def test_the_units_are_the_portal_the_notifier_and_a_retention_timer() -> None:
    assert [unit.name for unit in SERVICES] == [
        "pickup-notifier.service",
        "pickup-portal.service",
        "pickup-retention.service",
    ]
    commands = {unit.name: settings(unit)["ExecStart"] for unit in SERVICES}
    assert commands["pickup-portal.service"][0].startswith(f"{INSTALL_PREFIX}/bin/portal serve")
    # A stable worker id: a restarted notifier takes its own claimed rows back at once.
    assert commands["pickup-notifier.service"] == [
        f"{INSTALL_PREFIX}/bin/notifier run --worker-id %H"
    ]
    assert commands["pickup-retention.service"] == [f"{INSTALL_PREFIX}/bin/portal retention run"]
    timer = settings(UNITS / "pickup-retention.timer")
    assert timer["Unit"] == ["pickup-retention.service"]
    assert timer["Persistent"] == ["yes"]


@pytest.mark.parametrize("unit", SERVICES, ids=lambda unit: unit.name)
def test_every_service_is_hardened(unit: Path) -> None:
    found = settings(unit)
    for key, value in REQUIRED.items():
        assert found.get(key) == [value], f"{unit.name}: {key}={found.get(key)}"
    assert "AmbientCapabilities" in found
    assert not {"DynamicUser", "PermissionsStartOnly"} & found.keys()


def test_every_service_shares_one_hardening_block() -> None:
    blocks = {
        unit.name: unit.read_text()
        .split("# The instance folder", 1)[1]
        .split("[Install]", 1)[0]
        .strip()
        for unit in SERVICES
    }
    assert len(set(blocks.values())) == 1, "the hardening differs between units"


def test_the_portal_listens_on_loopback_behind_nginx() -> None:
    command = settings(UNITS / "pickup-portal.service")["ExecStart"][0]
    assert "--host 127.0.0.1" in command
    example = (UNITS / "portal.env.example").read_text()
    assert "PORTAL_TRUSTED_PROXIES=127.0.0.1" in example


def test_systemd_analyze_verify_accepts_the_units_silently(tmp_path: Path) -> None:
    result = analyze("verify", "--man=no", *installed_copies(tmp_path))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_would_report_a_mistyped_hardening_key(tmp_path: Path) -> None:
    # The check above is only worth something if a typo makes systemd speak.
    copies = installed_copies(tmp_path, "NoNewPrivileges=->NoNewPrivilege=")
    result = analyze("verify", "--man=no", *copies)
    assert "Unknown key 'NoNewPrivilege'" in result.stderr


@pytest.mark.parametrize("unit", SERVICES, ids=lambda unit: unit.name)
def test_systemd_rates_every_service_ok_or_better(unit: Path, tmp_path: Path) -> None:
    copy = next(c for c in installed_copies(tmp_path) if c.name == unit.name)
    result = analyze("security", "--offline=yes", f"--threshold={EXPOSURE_LIMIT}", copy)
    assert result.returncode == 0, result.stdout[-2000:]
    assert re.search(r"Overall exposure level for \S+: [01]\.\d OK", result.stdout)
