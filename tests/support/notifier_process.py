"""``notifier run`` as a real process, for the tests that SIGKILL it mid-batch.

The process reads the same settings an operator sets (``PORTAL_*`` in its
environment) and writes its stdout and stderr (JSON log lines) to files, so
a chatty worker never blocks on a full pipe.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from flask import Flask


class Relay(Protocol):
    """Where a worker sends: a MailSink in this process, or a SinkProcess (sink_process)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def cert_file(self) -> Path | None: ...


def notifier_env(app: Flask, sink: Relay, **settings: str) -> dict[str, str]:
    """The environment of a worker on ``app``'s database sending to ``sink``: the
    test's own (PORTAL_INSTANCE_DIR: its keyring and secret) plus ``PORTAL_<name>``."""
    env = dict(os.environ)
    env.update(
        {
            "PORTAL_DATABASE_URL": app.config["DATABASE_URL"],
            "PORTAL_SMTP_HOST": sink.host,
            "PORTAL_SMTP_PORT": str(sink.port),
            "PORTAL_SMTP_CA_FILE": str(sink.cert_file),
            "PORTAL_BASE_URL": app.config["BASE_URL"],
            "PORTAL_MAIL_FROM": app.config["MAIL_FROM"],
            **{f"PORTAL_{name}": value for name, value in settings.items()},
        }
    )
    return env


ROOT = Path(__file__).resolve().parents[2]  # the checkout: tests.support is importable from it


class WorkerProcess:
    """One ``python -m notifier run ...`` with its output in ``folder``.

    ``relay_backoff`` (first, most seconds) runs it through
    tests.support.quick_relay_backoff: the same command, waiting that long after a
    transport fault instead of 15 s doubling to 5 min (no setting shortens it).
    """

    def __init__(
        self,
        env: dict[str, str],
        args: tuple[str, ...],
        folder: Path,
        relay_backoff: tuple[float, float] | None = None,
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.stdout, self.stderr = folder / "stdout", folder / "stderr"
        command = [sys.executable, "-m", "notifier", "run", *args]
        if relay_backoff is not None:
            first, most = relay_backoff
            command[1:3] = ["-m", "tests.support.quick_relay_backoff", f"{first},{most}"]
            path = [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
            env = {**env, "PYTHONPATH": os.pathsep.join(path)}
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=err)

    def health_url(self, seconds: float = 60.0) -> str:
        """The health endpoint the worker printed once it listens (``--health-port``)."""
        found: list[str] = []

        def printed() -> bool:
            found[:] = re.findall(r"http://\S+/health", self.stdout.read_text())
            return bool(found) or self.process.poll() is not None

        wait_for(printed, seconds)
        assert found, f"no health endpoint: {self.stderr.read_text()[-2000:]}"
        return found[0]

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; return its exit code."""
        self.process.terminate()
        return self.process.wait(timeout=30)

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is handed back."""
        self.process.kill()
        self.process.wait(timeout=30)


def wait_for(condition: Callable[[], bool], seconds: float = 60.0) -> None:
    """Poll ``condition`` until it holds; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not reached within {seconds} s"
        time.sleep(0.05)
