"""portal.create_worker_app, the app ``notifier run`` works in: the portal's settings and
database loaded the same way, without the web app; and what `notifier run` imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flask import Flask

from portal import create_app, create_worker_app
from portal.config import SETTINGS, ConfigError, settings_of

ROOT = Path(__file__).resolve().parents[1]

CUSTOM = {
    "PORTAL_BASE_URL": "https://portal.example.org",
    "PORTAL_SMTP_HOST": "relay.example.org",
    "PORTAL_SMTP_PORT": "2525",
    "PORTAL_SMTP_TLS": "implicit",
    "PORTAL_SMTP_USERNAME": "notifier",
    "PORTAL_SMTP_PASSWORD": "relay secret",
    "PORTAL_MAIL_FROM": "no-reply@portal.example.org",
    "PORTAL_ORG_NAME": "Riverside Family Practice",
    "PORTAL_ORG_ADDRESS": "4 Mill Lane, Riverside",
    "PORTAL_SUPPORT_CONTACT": "reception",
    "PORTAL_REMINDER_AFTER": "2d",
    "PORTAL_LINK_TTL": "3d",
    "PORTAL_LOG_LEVEL": "WARNING",
}


def configured(app: Flask) -> dict[str, object]:
    return {s.key: app.config[s.key] for s in SETTINGS} | {
        "INSTANCE_DIR": app.config["INSTANCE_DIR"],
        "SECRET_KEY": app.config["SECRET_KEY"],
    }


def test_the_worker_app_reads_the_settings_the_portal_reads(
    instance: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in CUSTOM.items():
        monkeypatch.setenv(name, value)
    portal, worker = create_app(), create_worker_app()
    try:
        assert configured(worker) == configured(portal)
        assert settings_of(worker) == settings_of(portal)
        assert settings_of(worker).smtp_port == 2525
        assert worker.extensions["engine"].url == portal.extensions["engine"].url
    finally:
        for app in (portal, worker):
            app.extensions["engine"].dispose()


def test_the_worker_app_has_no_web(instance: Path) -> None:
    worker = create_worker_app()
    try:
        assert worker.blueprints == {}
        assert "limiter" not in worker.extensions
        assert "csrf" not in worker.extensions
        assert worker.cli.commands == {}  # no `portal` command groups
    finally:
        worker.extensions["engine"].dispose()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORTAL_SMTP_TLS", "none"),
        ("PORTAL_SMTP_PORT", "0"),
        ("PORTAL_BASE_URL", "ftp://portal.example.org"),
        ("PORTAL_DATABASE_URL", "mysql://db.example.org/portal"),
        ("PORTAL_SECRET_KEY", " "),
        ("PORTAL_REMINDER_AFTER", "soon"),
        ("PORTAL_KEYRING", "/nonexistent/keyring.json"),
    ],
)
def test_the_worker_app_refuses_what_the_portal_refuses(
    instance: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as portal:
        create_app()
    with pytest.raises(ConfigError) as worker:
        create_worker_app()
    assert str(worker.value) == str(portal.value)
    assert str(worker.value).startswith(name)


# Modules `notifier run` must not load: the mail sink and certificate generation, the web
# app and what only it needs (PDF rendering and checks, migrations, password hashing).
NOT_FOR_THE_WORKER = (
    "aiosmtpd",
    "cryptography.x509",
    "notifier.sink",
    "notifier.tlscert",
    "portal.web",
    "portal.auth",
    "portal.staff",
    "portal.pickup",
    "portal.admin",
    "portal.auditor",
    "portal.commands",
    "weasyprint",
    "pypdf",
    "alembic",
    "argon2",
    "zxcvbn",
)

_RUN_ONCE = """
import json, sys
from notifier.cli import main
main(["run", "--once"], standalone_mode=False)
heavy = tuple(sys.argv[1].split(","))
below = tuple(name + "." for name in heavy)
print(json.dumps(sorted(m for m in sys.modules if m in heavy or m.startswith(below))))
"""


def test_notifier_run_loads_neither_the_sink_nor_the_web_app(app: Flask, instance: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "PORTAL_INSTANCE_DIR": str(instance),
        "PORTAL_DATABASE_URL": app.config["DATABASE_URL"],
    }
    done = subprocess.run(
        [sys.executable, "-c", _RUN_ONCE, ",".join(NOT_FOR_THE_WORKER)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "sent 0, failed 0, retrying 0"
    assert json.loads(lines[-1]) == []
