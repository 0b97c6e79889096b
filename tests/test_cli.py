"""`portal serve`: more than one worker needs shared rate-limit counters (issue 10 item 7);
workers, threads and download slots from flags or settings, each bad value one line (issue 13
item 2). Serving under slow clients: tests/serving/."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
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


SIZING = ("PORTAL_WEB_WORKERS", "PORTAL_WEB_THREADS", "PORTAL_DOWNLOAD_SLOTS")


@dataclass
class Served:
    """What `portal serve` handed gunicorn, and the sizing it exported for the workers."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)
    exported: list[tuple[str | None, str | None]] = field(default_factory=list)

    def run(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append((*args, kwargs))
        self.exported.append(
            (os.environ.get("PORTAL_WEB_THREADS"), os.environ.get("PORTAL_DOWNLOAD_SLOTS"))
        )


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    """Record what `portal serve` would hand gunicorn instead of starting it; the sizing it
    exports for the workers is removed afterwards."""
    recorder = Served()
    monkeypatch.setattr(server, "run_gunicorn", recorder.run)
    yield recorder
    for name in SIZING:
        os.environ.pop(name, None)


def gunicorn_options(workers: int = 1, threads: int = 16, allowed: str = "") -> dict[str, Any]:
    """The keyword arguments `portal serve` hands run_gunicorn."""
    return {"workers": workers, "threads": threads, "forwarded_allow_ips": allowed}


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--workers", "3"], "--workers 3 needs PORTAL_REDIS_URL"),
        (["--threads", "0"], "--threads: expected a whole number from 3 to 256"),
    ],
)
def test_several_workers_without_redis_refuse_to_start(
    instance: Path, args: list[str], line: str
) -> None:
    port = free_port()
    env = {**os.environ, "PORTAL_INSTANCE_DIR": str(instance)}
    env.pop("PORTAL_REDIS_URL", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "portal", "serve", "--port", str(port), *args],
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
        pytest.fail(f"portal serve {' '.join(args)} started")
    assert process.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"portal: configuration error: {line}")


def test_default_is_one_worker_without_redis(instance: Path, served: Served) -> None:
    result = CliRunner().invoke(cli.main, ["serve", "--port", "5999"])
    assert result.exit_code == 0, result.output
    assert served.calls == [("127.0.0.1", 5999, gunicorn_options())]
    assert served.exported == [("16", "12")]


def test_explicit_workers_refused_without_redis_start_nothing(
    instance: Path, served: Served
) -> None:
    result = CliRunner().invoke(cli.main, ["serve", "--workers", "2"])
    assert result.exit_code == 2
    assert "PORTAL_REDIS_URL" in result.output
    assert served.calls == []


@pytest.mark.parametrize(("args", "workers"), [([], 2), (["--workers", "4"], 4)])
def test_redis_allows_several_workers(
    instance: Path, served: Served, args: list[str], workers: int
) -> None:
    env = {"PORTAL_REDIS_URL": REDIS_URL}
    result = CliRunner().invoke(cli.main, ["serve", "--port", "5998", *args], env=env)
    assert result.exit_code == 0, result.output
    assert served.calls == [("127.0.0.1", 5998, gunicorn_options(workers))]


@pytest.mark.parametrize(
    ("args", "env", "line"),
    [
        (["--workers", "0"], {}, "--workers: expected a whole number from 1 to 64"),
        (["--workers", "-1"], {}, "--workers: expected a whole number from 1 to 64"),
        (["--workers", "many"], {}, "--workers: expected a whole number from 1 to 64"),
        (["--workers", "65"], {}, "--workers: expected a whole number from 1 to 64"),
        (["--threads", "2"], {}, "--threads: expected a whole number from 3 to 256"),
        (["--threads", "257"], {}, "--threads: expected a whole number from 3 to 256"),
        (["--threads", "eight"], {}, "--threads: expected a whole number from 3 to 256"),
        (["--threads", ""], {}, "--threads: expected a whole number from 3 to 256"),
        (["--download-slots", "0"], {}, "--download-slots: expected a whole number from 1 to"),
        (
            ["--download-slots", "15"],
            {},
            "--download-slots: 15 leaves fewer than 2 of the 16 threads (PORTAL_WEB_THREADS) "
            "for pages and health checks; at most 14",
        ),
        (
            ["--threads", "8", "--download-slots", "7"],
            {},
            "--download-slots: 7 leaves fewer than 2 of the 8 threads (--threads)",
        ),
        (
            ["--threads", "8"],
            {"PORTAL_DOWNLOAD_SLOTS": "10"},
            "PORTAL_DOWNLOAD_SLOTS: 10 leaves fewer than 2 of the 8 threads (--threads)",
        ),
        ([], {"PORTAL_WEB_WORKERS": "3"}, "PORTAL_WEB_WORKERS=3 needs PORTAL_REDIS_URL"),
    ],
)
def test_bad_sizing_is_one_line_and_starts_nothing(
    instance: Path, served: Served, args: list[str], env: dict[str, str], line: str
) -> None:
    result = CliRunner().invoke(cli.main, ["serve", *args], env=env)
    assert result.exit_code == 2
    [said] = result.stderr.strip().splitlines()
    assert said.startswith(f"portal: configuration error: {line}")
    assert served.calls == []


def test_settings_size_the_server(instance: Path, served: Served) -> None:
    env = {
        "PORTAL_REDIS_URL": REDIS_URL,
        "PORTAL_WEB_WORKERS": "3",
        "PORTAL_WEB_THREADS": "24",
        "PORTAL_DOWNLOAD_SLOTS": "16",
    }
    result = CliRunner().invoke(cli.main, ["serve", "--port", "5997"], env=env)
    assert result.exit_code == 0, result.output
    assert served.calls == [("127.0.0.1", 5997, gunicorn_options(3, 24))]
    assert served.exported == [("24", "16")]


@pytest.mark.parametrize(
    ("args", "env", "threads", "slots"),
    [
        (["--threads", "10"], {}, 10, "6"),  # the default reserve of 4 follows the flag
        (["--threads", "10"], {"PORTAL_DOWNLOAD_SLOTS": "8"}, 10, "8"),
        (["--threads", "40", "--download-slots", "32"], {"PORTAL_WEB_THREADS": "8"}, 40, "32"),
        (["--download-slots", "3"], {"PORTAL_WEB_THREADS": "8"}, 8, "3"),
        (["--threads", "3"], {}, 3, "1"),
    ],
)
def test_flags_override_the_settings_and_reach_the_workers(
    instance: Path,
    served: Served,
    args: list[str],
    env: dict[str, str],
    threads: int,
    slots: str,
) -> None:
    result = CliRunner().invoke(cli.main, ["serve", *args], env=env)
    assert result.exit_code == 0, result.output
    assert served.calls == [("127.0.0.1", 5000, gunicorn_options(threads=threads))]
    assert served.exported == [(str(threads), slots)]  # the workers' apps read these


@pytest.mark.parametrize(
    ("trusted", "allowed"),
    [
        ("10.0.0.1, 10.1.0.0/16", "10.0.0.1/32,10.1.0.0/16"),
        ("2", "*"),
        ("0", ""),
    ],
)
def test_gunicorn_believes_the_same_proxies(
    instance: Path, served: Served, trusted: str, allowed: str
) -> None:
    result = CliRunner().invoke(cli.main, ["serve"], env={"PORTAL_TRUSTED_PROXIES": trusted})
    assert result.exit_code == 0, result.output
    assert served.calls[0][2] == gunicorn_options(allowed=allowed)
