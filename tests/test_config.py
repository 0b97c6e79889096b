"""Settings: defaults, every malformed value named, generated secrets 0600 and reused."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from portal import config
from portal.config import ConfigError


def test_embedded_defaults(instance: Path) -> None:
    loaded = config.load({"PORTAL_INSTANCE_DIR": str(instance)})
    assert loaded["DATABASE_URL"] == f"sqlite:///{instance / 'portal.db'}"
    assert loaded["BLOB_DIR"] == str(instance / "blobs")
    assert loaded["KEYRING_PATH"] == str(instance / "keyring.json")
    assert loaded["SMTP_TLS"] == "starttls"
    assert loaded["LINK_TTL"] == 7 * 86400
    assert loaded["MAX_UPLOAD"] == 100 * 1024 * 1024
    assert stat.S_IMODE(instance.stat().st_mode) == 0o700


def test_secret_key_file_is_private_and_reused(instance: Path) -> None:
    first = config.load({"PORTAL_INSTANCE_DIR": str(instance)})["SECRET_KEY"]
    second = config.load({"PORTAL_INSTANCE_DIR": str(instance)})["SECRET_KEY"]
    assert first == second
    assert len(first) >= 40
    assert stat.S_IMODE((instance / "secret_key").stat().st_mode) == 0o600


def test_environment_overrides_defaults(instance: Path) -> None:
    loaded = config.load({
        "PORTAL_INSTANCE_DIR": str(instance),
        "PORTAL_DATABASE_URL": "postgresql://u@db.example:5432/portal",
        "PORTAL_SMTP_TLS": "implicit",
        "PORTAL_LINK_TTL": "3d",
        "PORTAL_MAX_UPLOAD": "20M",
        "PORTAL_BASE_URL": "https://portal.example.org/",
    })
    assert loaded["DATABASE_URL"] == "postgresql+psycopg://u@db.example:5432/portal"
    assert loaded["SMTP_TLS"] == "implicit"
    assert loaded["LINK_TTL"] == 3 * 86400
    assert loaded["MAX_UPLOAD"] == 20 * 1024 * 1024
    assert loaded["BASE_URL"] == "https://portal.example.org"


@pytest.mark.parametrize(("name", "value"), [
    ("PORTAL_SMTP_TLS", "ssl3"),
    ("PORTAL_SMTP_PORT", "99999"),
    ("PORTAL_BASE_URL", "portal.example.org"),
    ("PORTAL_BASE_URL", "ftp://portal.example.org"),
    ("PORTAL_DATABASE_URL", "not a url"),
    ("PORTAL_DATABASE_URL", "mysql://x@y/z"),
    ("PORTAL_KEYRING", "/nonexistent/keyring.json"),
    ("PORTAL_SMTP_CA_FILE", "/nonexistent/ca.pem"),
    ("PORTAL_LINK_TTL", "soon"),
    ("PORTAL_MAX_UPLOAD", "lots"),
    ("PORTAL_REDIS_URL", "http://127.0.0.1:6379"),
    ("PORTAL_MAIL_FROM", "nobody"),
    ("PORTAL_DEMO", "maybe"),
])
def test_malformed_setting_names_itself(instance: Path, name: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config.load({"PORTAL_INSTANCE_DIR": str(instance), name: value})
    assert str(raised.value).startswith(f"{name}: ")
    assert "\n" not in str(raised.value)


def test_secret_values_are_not_echoed(instance: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        config.load({"PORTAL_INSTANCE_DIR": str(instance),
                     "PORTAL_DATABASE_URL": "mysql://admin:hunter2secret@y/z"})
    assert "hunter2secret" not in str(raised.value)


def test_cli_stops_with_one_line(instance: Path) -> None:
    env = {"PORTAL_INSTANCE_DIR": str(instance), "PORTAL_SMTP_TLS": "bogus", "PATH": "/usr/bin"}
    result = subprocess.run([sys.executable, "-m", "portal", "db", "upgrade"], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "portal: configuration error: PORTAL_SMTP_TLS: expected starttls or implicit"]
