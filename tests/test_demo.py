"""`portal demo` from an empty instance folder: migrates, seeds, serves, prints the logins."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, deadline: float) -> bytes:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (loopback http)
                return bytes(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_demo_serves_health_and_sign_in(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PORTAL_INSTANCE_DIR": str(tmp_path / "instance"),
        "PORTAL_BASE_URL": f"http://127.0.0.1:{port}",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "portal",
            "demo",
            "--port",
            str(port),
            "--smtp-port",
            str(free_port()),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        assert b'"ok"' in wait_for(f"http://127.0.0.1:{port}/healthz", deadline)
        page = wait_for(f"http://127.0.0.1:{port}/signin", deadline).decode()
        assert "Email" in page
        assert "Password" in page
        codes = wait_for(f"http://127.0.0.1:{port}/demo/", deadline).decode()
        assert re.search(r'mono">\d{6}</td>', codes), "demo page shows no current code"
        sent = subprocess.run(
            [
                sys.executable,
                "-m",
                "portal",
                "messages",
                "send",
                "--from",
                "staff@demo.example",
                "--to",
                "patient@demo.example",
                "--subject",
                "Demo Xylophonoma result",
                "--body",
                "Demo Quasirandomitis body",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert sent.returncode == 0, sent.stderr
        mail = ""
        while "/p/" not in mail and time.monotonic() < deadline:
            time.sleep(0.5)
            mail = wait_for(f"http://127.0.0.1:{port}/demo/mail", deadline).decode()
            key = re.search(r'href="/demo/mail/([^"]+)"', mail)
            if key:
                mail = wait_for(
                    f"http://127.0.0.1:{port}/demo/mail/{key.group(1)}", deadline
                ).decode()
        assert f"http://127.0.0.1:{port}/p/" in mail
        assert "Xylophonoma" not in mail
        assert "Quasirandomitis" not in mail
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/signin" in out
    for role in ("staff", "patient", "auditor", "admin"):
        assert f"{role}@demo.example" in out
    assert (tmp_path / "instance" / "portal.db").exists()


def test_demo_page_absent_outside_demo_mode(client: object) -> None:
    assert client.get("/demo/").status_code == 404  # type: ignore[attr-defined]
