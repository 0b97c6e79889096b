"""Fixtures for the browser tests: the portal on a real threaded HTTP server, a real TLS mail
sink, and Debian's headless Chromium driven by Playwright (never a downloaded browser).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask
from playwright.sync_api import Browser, Playwright, sync_playwright
from werkzeug.serving import BaseWSGIServer, make_server

from notifier.sink import MailSink
from tests.support.browser import Portal

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def mail_sink(tmp_path: Path) -> Iterator[MailSink]:
    """A running STARTTLS mail sink writing ``tmp_path/sink/Maildir``; its cert is trusted."""
    base = tmp_path / "sink"
    sink = MailSink(base / "Maildir", cert_file=base / "cert.pem").start()
    yield sink
    sink.stop()


@pytest.fixture
def portal_server(make_app: Callable[..., Flask], mail_sink: MailSink) -> Iterator[Portal]:
    """The test app behind werkzeug's threaded server on a free loopback port (BASE_URL)."""
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    app = make_app(
        BASE_URL=base_url,
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=mail_sink.port,
        SMTP_CA_FILE=str(mail_sink.cert_file),
        SMTP_TLS="starttls",
    )
    server: BaseWSGIServer = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="portal-http", daemon=True)
    thread.start()
    try:
        yield Portal(app, base_url, mail_sink)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def playwright_driver() -> Iterator[Playwright]:
    """Playwright's sync API for the whole session."""
    driver = sync_playwright().start()
    yield driver
    driver.stop()


@pytest.fixture(scope="session")
def chromium(playwright_driver: Playwright) -> Iterator[Browser]:
    """Debian's headless Chromium, launched once per session."""
    browser = playwright_driver.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
    )
    yield browser
    browser.close()
