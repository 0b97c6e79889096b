"""Fixtures for the deployment tests: `portal serve` (gunicorn) behind Debian's nginx.

nginx runs unprivileged-friendly from a temporary prefix, on a main config written by
tests/support/deploy.py that only sets paths and includes deploy/nginx/portal.conf rendered
with its placeholders (the sample itself is never copied into a test). Its TLS certificate
is a test trust anchor made with notifier.tlscert, which the client verifies.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from notifier.tlscert import write_cert_files
from tests.support.databases import BACKENDS, pg_url
from tests.support.deploy import (
    MIB,
    NGINX,
    NGINX_SAMPLE,
    PASSWORD,
    PROXY_ADDRESS,
    RECORD_MIB,
    ROOT,
    Nginx,
    Pickup,
    Portal,
    engine_runs,
    free_port,
    main_config,
    portal_env,
    render,
    stop,
    store,
    wait_for_port,
    write_record,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked container_engine run only where an engine answers (deselected, not skipped)."""
    marked = [item for item in items if item.get_closest_marker("container_engine")]
    if marked and not engine_runs():
        config.hook.pytest_deselected(items=marked)
        items[:] = [item for item in items if item not in marked]


@pytest.fixture(scope="module", params=BACKENDS)
def deploy_database(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The portal's database behind nginx: SQLite in its instance folder (None), or a
    PostgreSQL schema of its own, dropped afterwards."""
    if request.param == "sqlite":
        yield None
        return
    schema = f"pp_deploy_{secrets.token_hex(6)}"
    admin = create_engine(pg_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield pg_url(schema)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="module")
def deploy_tmp(tmp_path_factory: pytest.TempPathFactory, deploy_database: str | None) -> Path:
    """One temporary folder for this module's servers (per database)."""
    return tmp_path_factory.mktemp("deploy")


@pytest.fixture(scope="module")
def https_port() -> int:
    """The port nginx serves HTTPS on."""
    return free_port()


@pytest.fixture(scope="module")
def portal(deploy_tmp: Path, https_port: int, deploy_database: str | None) -> Iterator[Portal]:
    """`portal db upgrade`, then `portal serve` (one gunicorn worker) on a free port."""
    env = portal_env(deploy_tmp / "instance", https_port)
    if deploy_database is not None:
        env["PORTAL_DATABASE_URL"] = deploy_database
    subprocess.run(
        [sys.executable, "-m", "portal", "db", "upgrade"],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    port, log = free_port(), deploy_tmp / "portal.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "portal",
                "serve",
                "--host",
                PROXY_ADDRESS,
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for_port(port, process, log)
        yield Portal(process, port, env, log)
    finally:
        stop(process)


@pytest.fixture(scope="module")
def start_nginx(
    deploy_tmp: Path, portal: Portal, https_port: int
) -> Iterator[Callable[..., Nginx]]:
    """Return a starter of nginx on the rendered sample (``edit`` may change the text)."""
    started: list[Nginx] = []
    cert, key = deploy_tmp / "tls" / "cert.pem", deploy_tmp / "tls" / "key.pem"
    write_cert_files(cert, key, hostnames=(PROXY_ADDRESS,))

    def start(
        name: str, edit: Callable[[str], str] = lambda text: text, port: int | None = None
    ) -> Nginx:
        prefix = deploy_tmp / name
        prefix.mkdir()
        https, http = port or free_port(), free_port()
        values = {
            "PORTAL_UPSTREAM": f"{PROXY_ADDRESS}:{portal.port}",
            "NGINX_SERVER_NAME": PROXY_ADDRESS,
            "NGINX_HTTPS_LISTEN": f"{PROXY_ADDRESS}:{https}",
            "NGINX_HTTP_LISTEN": f"{PROXY_ADDRESS}:{http}",
            "NGINX_PUBLIC_URL": f"https://{PROXY_ADDRESS}:{https}",
            "NGINX_TLS_CERT": str(cert),
            "NGINX_TLS_KEY": str(key),
            "NGINX_ACCESS_LOG": str(prefix / "access.log"),
        }
        (prefix / "portal.conf").write_text(edit(render(NGINX_SAMPLE.read_text(), values)))
        (prefix / "nginx.conf").write_text(main_config(prefix))
        argv = [
            NGINX,
            "-p",
            str(prefix),
            "-c",
            str(prefix / "nginx.conf"),
            "-e",
            str(prefix / "error.log"),
            "-g",
            f"daemon off; pid {prefix / 'nginx.pid'};",
        ]
        checked = subprocess.run([*argv, "-t"], capture_output=True, text=True, check=False)
        assert checked.returncode == 0, checked.stderr
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        server = Nginx(process, prefix, https, http, cert)
        started.append(server)
        wait_for_port(https, process, prefix / "error.log")
        return server

    yield start
    for server in started:
        stop(server.process)


@pytest.fixture(scope="module")
def nginx(start_nginx: Callable[..., Nginx], https_port: int) -> Nginx:
    """nginx on the sample configuration as shipped, on the port the portal's BASE_URL names."""
    return start_nginx("nginx", port=https_port)


@pytest.fixture(scope="module")
def make_pickup(portal: Portal, deploy_tmp: Path) -> Iterator[Callable[[str], Pickup]]:
    """Return a factory: an enrolled patient (by email) with a message and a large record."""
    from portal import create_app

    with pytest.MonkeyPatch.context() as patch:
        for name, value in portal.env.items():
            if name.startswith("PORTAL_"):
                patch.setenv(name, value)
        app = create_app()
    from tests.browser_client import enrolled_user

    enrolled_user(app, role="staff", email="staff@example.org", password=PASSWORD)

    def make(email: str) -> Pickup:
        _, secret, _ = enrolled_user(
            app, role="patient", email=email, password=PASSWORD, name="Pat Proxytest"
        )
        record = deploy_tmp / f"{email}.pdf"
        digest = write_record(record)
        message_id, attachment_id = store(app, email, record)
        return Pickup(
            email,
            secret,
            f"/messages/{message_id}/attachments/{attachment_id}/download",
            digest,
            RECORD_MIB * MIB,
        )

    yield make
    app.extensions["engine"].dispose()
