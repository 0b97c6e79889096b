"""Deployment-test helpers: `portal serve` and Debian's nginx as subprocesses, their ports,
configuration and logs, and the large record a pickup through them downloads."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NGINX_SAMPLE = DEPLOY / "nginx" / "portal.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
PROXY_ADDRESS = "127.0.0.1"  # nginx and the portal talk over this address
CLIENT_ADDRESS = "127.0.0.2"  # the "patient" connects from here, so the two differ
MIB = 1024 * 1024
RECORD_MIB = 16  # more than the loopback socket buffers hold, so a buffering nginx spools
STARTUP_SECONDS = 60
_PLACEHOLDER = re.compile(r"\$\{([A-Z_]+)\}")
PASSWORD = "Correct horse battery staple 42"


def engine_runs() -> bool:
    """Whether a container engine answers (``docker info``), for the image build test."""
    if shutil.which("docker") is None:
        return False
    try:
        probe = subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=20)
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


def free_port() -> int:
    """An unused TCP port on the loopback address."""
    with socket.socket() as probe:
        probe.bind((PROXY_ADDRESS, 0))
        return int(probe.getsockname()[1])


def render(template: str, values: dict[str, str]) -> str:
    """Fill ``${NAME}`` placeholders as envsubst does; every one must have a value."""
    missing = sorted(set(_PLACEHOLDER.findall(template)) - set(values))
    assert not missing, f"no value for placeholders {missing}"
    return _PLACEHOLDER.sub(lambda found: values[found.group(1)], template)


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """Return once something accepts on ``port``; fail with the log if ``process`` exits."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited {process.returncode}:\n{log.read_text()[-3000:]}"
        with contextlib.suppress(OSError), socket.create_connection((PROXY_ADDRESS, port), 1):
            return
        time.sleep(0.1)
    pytest.fail(f"nothing listens on {port}:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 20 s, and reap."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@dataclass
class Nginx:
    """A running nginx: its ports, temp folders, logs and processes."""

    process: subprocess.Popen[bytes]
    prefix: Path
    https_port: int
    http_port: int
    cafile: Path

    @property
    def temp_dirs(self) -> list[Path]:
        return [self.prefix / "client_body_temp", self.prefix / "proxy_temp"]

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"

    def open_temp_files(self) -> list[str]:
        """Files under the temp folders that an nginx process holds open right now.

        nginx unlinks a temp file as soon as it creates it, so a listing of the folder
        stays empty; the open descriptors (``/proc/PID/fd``) still show where bytes went.
        """
        roots = tuple(str(folder) for folder in self.temp_dirs)
        master = psutil.Process(self.process.pid)
        found = []
        for process in [master, *master.children()]:
            fd_dir = Path(f"/proc/{process.pid}/fd")
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith(roots):
                        found.append(target)
        return found

    def connection(self, rcvbuf: int | None = None) -> http.client.HTTPSConnection:
        """An HTTPS connection from CLIENT_ADDRESS that verifies nginx's certificate."""
        context = ssl.create_default_context(cafile=str(self.cafile))
        return ClientConnection(
            PROXY_ADDRESS,
            self.https_port,
            context=context,
            timeout=60,
            source_address=(CLIENT_ADDRESS, 0),
            rcvbuf=rcvbuf,
        )


class ClientConnection(http.client.HTTPSConnection):
    """HTTPSConnection with an optional small receive buffer (a slow reader, set pre-connect)."""

    def __init__(self, *args: object, rcvbuf: int | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.rcvbuf = rcvbuf

    def connect(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.settimeout(self.timeout)
        sock.bind(self.source_address)
        sock.connect((self.host, self.port))
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


@dataclass
class Portal:
    """`portal serve` in a subprocess, its instance folder and the environment it runs with."""

    process: subprocess.Popen[bytes]
    port: int
    env: dict[str, str]
    log: Path


@dataclass(frozen=True)
class Pickup:
    """An enrolled patient with one message and a RECORD_MIB MiB attachment."""

    email: str
    secret: str
    download_path: str
    sha256: str
    size: int


def portal_env(instance: Path, https_port: int) -> dict[str, str]:
    """This environment without PORTAL_* settings, plus the portal's behind nginx."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(
        PORTAL_INSTANCE_DIR=str(instance),
        PORTAL_BASE_URL=f"https://{PROXY_ADDRESS}:{https_port}",
        PORTAL_TRUSTED_PROXIES=PROXY_ADDRESS,
    )
    return env


def main_config(prefix: Path) -> str:
    """nginx's main file: paths in ``prefix`` (no root needed), then the rendered sample."""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / (kind + '_temp')};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx's workers would switch to "nobody", who cannot enter pytest's private
    # temporary folder; they stay the invoking user, as they do when nginx is not root.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}worker_processes 1;\nerror_log {prefix / 'error.log'} info;\n"
        "events { worker_connections 64; }\n"
        f"http {{\n{temp}\n    include {prefix / 'portal.conf'};\n}}\n"
    )


def write_record(path: Path) -> str:
    """Write RECORD_MIB MiB (a PDF header, then distinct blocks); return its SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for index in range(RECORD_MIB):
            chunk = (b"%PDF-1.4\n" if index == 0 else index.to_bytes(8, "big")).ljust(MIB, b"r")
            out.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def store(app: object, email: str, record: Path) -> tuple[str, str]:
    """Store ``record`` as an attachment from staff to ``email``; return (message, attachment)."""
    from portal.database import utcnow
    from portal.extensions import db
    from portal.services import accounts, messages

    with app.app_context():  # type: ignore[attr-defined]
        sender = accounts.find_by_email(db.session, "staff@example.org")
        recipient = accounts.find_by_email(db.session, email)
        assert sender is not None
        assert recipient is not None
        with record.open("rb") as stream:
            message = messages.create(
                db.session,
                sender=sender,
                recipient=recipient,
                subject="Letter",
                body="See it.",
                expires_at=utcnow() + timedelta(days=7),
                uploads=[messages.Upload("record.pdf", stream)],
                validate=None,
            )
        db.session.commit()
        return message.public_id, message.attachments[0].public_id
