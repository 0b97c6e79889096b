"""Fixtures for the serving tests: `portal serve` (real gunicorn) on each database, sized
small (one worker, SERVE_THREADS threads, SERVE_SLOTS download slots), with a patient
whose inbox holds a record larger than the loopback socket buffers, signed in."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from tests.support.databases import BACKENDS, own_schema
from tests.support.deploy import (
    MIB,
    PASSWORD,
    PROXY_ADDRESS,
    RECORD_MIB,
    ROOT,
    Pickup,
    Portal,
    free_port,
    stop,
    store,
    wait_for_port,
    write_record,
)
from tests.support.serving import SERVE_SLOTS, SERVE_THREADS, HttpPatient


@pytest.fixture(scope="module", params=BACKENDS)
def serving_database(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """SQLite in the server's instance folder (None), or a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield None
        return
    with own_schema("pp_serving") as url:
        yield url


@pytest.fixture(scope="module")
def serving_env(
    tmp_path_factory: pytest.TempPathFactory, serving_database: str | None
) -> dict[str, str]:
    """The server's environment: this one without PORTAL_* settings, plus its own."""
    folder = tmp_path_factory.mktemp("serving")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(
        PORTAL_INSTANCE_DIR=str(folder / "instance"),
        PORTAL_BASE_URL=f"http://{PROXY_ADDRESS}:{free_port()}",
        **({"PORTAL_DATABASE_URL": serving_database} if serving_database else {}),
    )
    return env


@pytest.fixture(scope="module")
def serving_app(serving_env: dict[str, str]) -> Iterator[Flask]:
    """The portal in this process on the server's settings, its database migrated (what
    `portal db upgrade` does), for making the data through the services."""
    from portal import create_app
    from portal.extensions import db
    from portal.migrate import upgrade

    with pytest.MonkeyPatch.context() as patch:
        for name, value in serving_env.items():
            if name.startswith("PORTAL_"):
                patch.setenv(name, value)
        app = create_app()
    with app.app_context():
        upgrade(db.engine)
    yield app
    app.extensions["engine"].dispose()


@pytest.fixture(scope="module")
def served(serving_app: Flask, serving_env: dict[str, str]) -> Iterator[Portal]:
    """`portal serve --workers 1 --threads 4 --download-slots 2` on the migrated database."""
    port = int(serving_env["PORTAL_BASE_URL"].rsplit(":", 1)[1])
    log = Path(serving_env["PORTAL_INSTANCE_DIR"]).parent / "portal.log"
    argv = [sys.executable, "-m", "portal", "serve", "--host", PROXY_ADDRESS, "--port", str(port)]
    sizing = ["--workers", "1", "--threads", str(SERVE_THREADS)]
    with log.open("ab") as out:
        process = subprocess.Popen(
            [*argv, *sizing, "--download-slots", str(SERVE_SLOTS)],
            env=serving_env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for_port(port, process, log)
        yield Portal(process, port, serving_env, log)
    finally:
        stop(process)


@pytest.fixture(scope="module")
def pickup(serving_app: Flask, serving_env: dict[str, str]) -> Pickup:
    """An enrolled patient with one message and a RECORD_MIB MiB attachment, on the server's
    database (made in this process through the services)."""
    from tests.browser_client import enrolled_user

    email = "pat-slow@example.org"
    enrolled_user(serving_app, role="staff", email="staff@example.org", password=PASSWORD)
    _, secret, _ = enrolled_user(serving_app, role="patient", email=email, password=PASSWORD)
    record = Path(serving_env["PORTAL_INSTANCE_DIR"]).parent / "record.pdf"
    digest = write_record(record)
    message_id, attachment_id = store(serving_app, email, record)
    record.unlink()
    path = f"/messages/{message_id}/attachments/{attachment_id}/download"
    return Pickup(email, secret, path, digest, RECORD_MIB * MIB)


@pytest.fixture(scope="module")
def patient(served: Portal, pickup: Pickup) -> HttpPatient:
    """The pickup's patient, signed in once for the module (a TOTP code works only once)."""
    signed_in = HttpPatient(served.port, timeout=60)
    signed_in.sign_in(pickup)
    return signed_in
