"""Settings: defaults, every malformed value named, generated secrets 0600 and reused."""

from __future__ import annotations

import ipaddress
import multiprocessing
import os
import secrets
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from portal import config
from portal.config import ConfigError
from portal.security import passwords
from tests.support.faults import fill, tiny_disk


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
    loaded = config.load(
        {
            "PORTAL_INSTANCE_DIR": str(instance),
            "PORTAL_DATABASE_URL": "postgresql://u@db.example:5432/portal",
            "PORTAL_SMTP_TLS": "implicit",
            "PORTAL_LINK_TTL": "3d",
            "PORTAL_MAX_UPLOAD": "20M",
            "PORTAL_BASE_URL": "https://portal.example.org/",
        }
    )
    assert loaded["DATABASE_URL"] == "postgresql+psycopg://u@db.example:5432/portal"
    assert loaded["SMTP_TLS"] == "implicit"
    assert loaded["LINK_TTL"] == 3 * 86400
    assert loaded["MAX_UPLOAD"] == 20 * 1024 * 1024
    assert loaded["BASE_URL"] == "https://portal.example.org"


@pytest.mark.parametrize(
    ("name", "value"),
    [
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
        ("PORTAL_WEB_WORKERS", "0"),
        ("PORTAL_WEB_WORKERS", "two"),
        ("PORTAL_WEB_THREADS", "2"),
        ("PORTAL_WEB_THREADS", "1000"),
        ("PORTAL_DOWNLOAD_SLOTS", "0"),
        ("PORTAL_DOWNLOAD_SLOTS", "15"),  # of the default 16 threads: 2 must stay for pages
        ("PORTAL_CLAMD_SOCKET", "clamd"),
        ("PORTAL_CLAMD_SOCKET", "localhost:0"),
        ("PORTAL_SCAN_UPLOADS", "maybe"),
        ("PORTAL_SCAN_UPLOADS", "required"),  # without PORTAL_CLAMD_SOCKET
    ],
)
def test_malformed_setting_names_itself(instance: Path, name: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config.load({"PORTAL_INSTANCE_DIR": str(instance), name: value})
    assert str(raised.value).startswith(f"{name}: ")
    assert "\n" not in str(raised.value)


def test_secret_values_are_not_echoed(instance: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        config.load(
            {
                "PORTAL_INSTANCE_DIR": str(instance),
                "PORTAL_DATABASE_URL": "mysql://admin:hunter2secret@y/z",
            }
        )
    assert "hunter2secret" not in str(raised.value)


def test_cli_stops_with_one_line(instance: Path) -> None:
    env = {"PORTAL_INSTANCE_DIR": str(instance), "PORTAL_SMTP_TLS": "bogus", "PATH": "/usr/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "portal", "db", "upgrade"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "portal: configuration error: PORTAL_SMTP_TLS: expected starttls or implicit"
    ]


def _first_start(folder: str, barrier: Any, results: Any) -> None:
    """One process starting on a fresh instance: slow entropy widens any race window."""
    real = secrets.token_urlsafe

    def slow(nbytes: int) -> str:
        time.sleep(0.2)
        return real(nbytes)

    secrets.token_urlsafe = slow  # this child process only
    barrier.wait()
    try:
        results.put(config.load({"PORTAL_INSTANCE_DIR": folder})["SECRET_KEY"])
    except ConfigError as error:
        results.put(f"error: {error}")


def test_concurrent_first_starts_agree_on_one_secret(instance: Path) -> None:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(6), context.Queue()
    workers = [
        context.Process(target=_first_start, args=(str(instance), barrier, results))
        for _ in range(6)
    ]
    for worker in workers:
        worker.start()
    keys = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    assert len(set(keys)) == 1, keys
    assert len(keys[0]) >= 40
    assert (instance / "secret_key").read_text().strip() == keys[0]
    assert stat.S_IMODE((instance / "secret_key").stat().st_mode) == 0o600
    assert os.listdir(instance) == ["secret_key"]  # no temporary file left behind


@pytest.mark.parametrize("value", ["", "   ", "\t"])
def test_empty_secret_key_setting_is_refused(instance: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"^PORTAL_SECRET_KEY: is empty"):
        config.load({"PORTAL_INSTANCE_DIR": str(instance), "PORTAL_SECRET_KEY": value})
    assert not (instance / "secret_key").exists()


def test_empty_secret_key_file_is_refused(instance: Path) -> None:
    instance.mkdir(parents=True)
    (instance / "secret_key").write_text("\n")
    with pytest.raises(ConfigError, match=r"^PORTAL_SECRET_KEY: .*secret_key is empty") as raised:
        config.load({"PORTAL_INSTANCE_DIR": str(instance)})
    assert "\n" not in str(raised.value)
    assert (instance / "secret_key").read_text() == "\n"  # left for the operator to see


@pytest.mark.parametrize("secret", ["", "  ", b""])
def test_app_refuses_an_empty_secret(instance: Path, secret: str | bytes) -> None:
    from portal import create_app

    instance.mkdir(parents=True)
    (instance / "secret_key").write_text("")  # so the embedded default cannot fill it in
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        create_app({"SECRET_KEY": secret, "TESTING": True})


def test_cli_refuses_an_empty_secret_key_with_one_line(instance: Path) -> None:
    env = {"PORTAL_INSTANCE_DIR": str(instance), "PORTAL_SECRET_KEY": "", "PATH": "/usr/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "portal", "db", "upgrade"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("portal: configuration error: PORTAL_SECRET_KEY: is empty")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", 0),
        ("0", 0),
        ("2", 2),
        ("10.0.0.1", (ipaddress.ip_network("10.0.0.1/32"),)),
        (
            "10.0.0.1, 10.1.0.0/16 ::1",
            (
                ipaddress.ip_network("10.0.0.1/32"),
                ipaddress.ip_network("10.1.0.0/16"),
                ipaddress.ip_network("::1/128"),
            ),
        ),
    ],
)
def test_trusted_proxies_parse(instance: Path, raw: str, expected: object) -> None:
    loaded = config.load({"PORTAL_INSTANCE_DIR": str(instance), "PORTAL_TRUSTED_PROXIES": raw})
    assert loaded["TRUSTED_PROXIES"] == expected


@pytest.mark.parametrize(
    "raw",
    [
        "lots",
        "11",
        "-1",
        "10.0.0.1/8",
        "10.0.0.1, nope",
        "0.0.0.0/0",
        "::/0",
        "300.1.1.1",
        ",",
        "\u00b2",
    ],
)
def test_malformed_trusted_proxies_stop_start_up(instance: Path, raw: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config.load({"PORTAL_INSTANCE_DIR": str(instance), "PORTAL_TRUSTED_PROXIES": raw})
    assert str(raised.value).startswith("PORTAL_TRUSTED_PROXIES: expected a number of proxy hops")
    assert "\n" not in str(raised.value)


# --- PASSWORD_HASH_PARAMS: cheap argon2id for the test fixtures only ------------------------

PRODUCTION_HASHING = (passwords.TIME_COST, passwords.MEMORY_COST_KIB, passwords.PARALLELISM)
STRONG = "Lantern orchard velvet compass 77"


@pytest.mark.parametrize("testing", [None, False, 0, ""])
def test_cheap_hashing_is_refused_outside_testing(instance: Path, testing: object) -> None:
    from portal import create_app

    overrides: dict[str, Any] = {"PASSWORD_HASH_PARAMS": passwords.INSECURE_TEST_PARAMETERS}
    if testing is not None:
        overrides["TESTING"] = testing
    with pytest.raises(ConfigError, match=r"^PASSWORD_HASH_PARAMS: is a test-only setting"):
        create_app(overrides)


def test_no_environment_variable_turns_on_cheap_hashing(
    instance: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from portal import create_app
    from portal.services import accounts

    for name in ("PORTAL_PASSWORD_HASH_PARAMS", "PORTAL_TESTING", "PORTAL_TEST_FAST_HASH"):
        monkeypatch.setenv(name, "1")
    app = create_app()
    assert app.extensions["password_hasher"].parameters == PRODUCTION_HASHING
    with app.app_context():
        stored = accounts.hasher().hash_password(STRONG)
    assert stored.startswith("$argon2id$v=19$m=65536,t=2,p=1$")


def test_fixture_apps_hash_with_the_cheap_test_parameters(app: Any) -> None:
    from portal.services import accounts

    with app.app_context():
        stored = accounts.hasher().hash_password(STRONG)
        assert accounts.hasher().verify_password(stored, STRONG)
    assert stored.startswith("$argon2id$v=19$m=8,t=1,p=1$")


@pytest.mark.real_argon2
def test_real_argon2_mark_gives_fixture_apps_the_production_parameters(app: Any) -> None:
    assert app.extensions["password_hasher"].parameters == PRODUCTION_HASHING


def _portal_upgrade(instance: Path) -> subprocess.CompletedProcess[str]:
    env = {"PORTAL_INSTANCE_DIR": str(instance), "PATH": "/usr/bin"}
    return subprocess.run(
        [sys.executable, "-m", "portal", "db", "upgrade"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _one_config_line(result: subprocess.CompletedProcess[str], setting: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"portal: configuration error: {setting}: cannot ")


def test_an_instance_folder_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    """A wrong path or a read-only root: exit 2 with one line, never a traceback."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    _one_config_line(_portal_upgrade(blocker / "instance"), "PORTAL_INSTANCE_DIR")


def test_a_secret_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    with tiny_disk(tmp_path / "disk", "1m") as disk:
        (disk / "instance").mkdir(mode=0o700)
        fill(disk)
        _one_config_line(_portal_upgrade(disk / "instance"), "PORTAL_SECRET_KEY")


@pytest.mark.parametrize(
    ("environ", "threads", "slots"),
    [
        ({}, 16, 12),  # the defaults: 4 threads kept for pages and health checks
        ({"PORTAL_WEB_THREADS": "40"}, 40, 36),
        ({"PORTAL_WEB_THREADS": "5"}, 5, 1),
        ({"PORTAL_WEB_THREADS": "3"}, 3, 1),
        ({"PORTAL_WEB_THREADS": "40", "PORTAL_DOWNLOAD_SLOTS": "38"}, 40, 38),
        ({"PORTAL_DOWNLOAD_SLOTS": "2"}, 16, 2),
    ],
)
def test_download_slots_follow_the_threads(
    instance: Path, environ: dict[str, str], threads: int, slots: int
) -> None:
    loaded = config.load({"PORTAL_INSTANCE_DIR": str(instance), **environ})
    assert (loaded["WEB_THREADS"], loaded["DOWNLOAD_SLOTS"]) == (threads, slots)
    assert loaded["WEB_WORKERS"] is None  # portal serve decides: 2 with Redis, else 1


def test_too_many_download_slots_name_both_settings(instance: Path) -> None:
    environ = {"PORTAL_WEB_THREADS": "8", "PORTAL_DOWNLOAD_SLOTS": "7"}
    with pytest.raises(ConfigError) as raised:
        config.load({"PORTAL_INSTANCE_DIR": str(instance), **environ})
    assert str(raised.value) == (
        "PORTAL_DOWNLOAD_SLOTS: 7 leaves fewer than 2 of the 8 threads (PORTAL_WEB_THREADS) "
        "for pages and health checks; at most 6"
    )
