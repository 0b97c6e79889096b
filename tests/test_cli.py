"""`portal serve`: more than one worker needs shared rate-limit counters (issue 10 item 7)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from portal import cli, server

REDIS_URL = os.environ.get("PORTAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Record what `portal serve` would hand gunicorn instead of starting it."""
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(
        server, "run_gunicorn", lambda *args, **kwargs: calls.append((*args, kwargs))
    )
    return calls


def test_several_workers_without_redis_refuse_to_start(instance: Path) -> None:
    port = free_port()
    env = {**os.environ, "PORTAL_INSTANCE_DIR": str(instance)}
    env.pop("PORTAL_REDIS_URL", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "portal", "serve", "--port", str(port), "--workers", "3"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("portal serve --workers 3 started without PORTAL_REDIS_URL")
    assert process.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("portal: configuration error: --workers 3 needs PORTAL_REDIS_URL")


def test_default_is_one_worker_without_redis(instance: Path, served: list[tuple[Any, ...]]) -> None:
    result = CliRunner().invoke(cli.main, ["serve", "--port", "5999"])
    assert result.exit_code == 0, result.output
    assert served == [("127.0.0.1", 5999, 1, {"forwarded_allow_ips": ""})]


def test_explicit_workers_refused_without_redis_start_nothing(
    instance: Path, served: list[tuple[Any, ...]]
) -> None:
    result = CliRunner().invoke(cli.main, ["serve", "--workers", "2"])
    assert result.exit_code == 2
    assert "PORTAL_REDIS_URL" in result.output
    assert served == []


@pytest.mark.parametrize(("args", "workers"), [([], 2), (["--workers", "4"], 4)])
def test_redis_allows_several_workers(
    instance: Path, served: list[tuple[Any, ...]], args: list[str], workers: int
) -> None:
    env = {"PORTAL_REDIS_URL": REDIS_URL}
    result = CliRunner().invoke(cli.main, ["serve", "--port", "5998", *args], env=env)
    assert result.exit_code == 0, result.output
    assert served == [("127.0.0.1", 5998, workers, {"forwarded_allow_ips": ""})]


@pytest.mark.parametrize("workers", ["0", "-1", "many"])
def test_bad_worker_count_is_a_usage_error(
    instance: Path, served: list[tuple[Any, ...]], workers: str
) -> None:
    result = CliRunner().invoke(cli.main, ["serve", "--workers", workers])
    assert result.exit_code == 2
    assert served == []


@pytest.mark.parametrize(
    ("trusted", "allowed"),
    [
        ("10.0.0.1, 10.1.0.0/16", "10.0.0.1/32,10.1.0.0/16"),
        ("2", "*"),
        ("0", ""),
    ],
)
def test_gunicorn_believes_the_same_proxies(
    instance: Path, served: list[tuple[Any, ...]], trusted: str, allowed: str
) -> None:
    result = CliRunner().invoke(cli.main, ["serve"], env={"PORTAL_TRUSTED_PROXIES": trusted})
    assert result.exit_code == 0, result.output
    assert served[0][3] == {"forwarded_allow_ips": allowed}
