"""Fixtures for the browser tests: the portal on a real threaded HTTP server, a real TLS mail
sink, and Debian's headless Chromium driven by Playwright (never a downloaded browser).
"""

from __future__ import annotations

import email.policy
import mailbox
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from playwright.sync_api import Browser, Playwright, sync_playwright
from werkzeug.serving import BaseWSGIServer, make_server

from notifier.sink import MailSink

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
_LINK = re.compile(r"https?://\S+/p/[A-Za-z0-9_\-]+")


@dataclass
class Portal:
    """The portal serving on ``base_url`` from a background thread, and its mail sink."""

    app: Flask
    base_url: str
    sink: MailSink

    def mails(self) -> list[EmailMessage]:
        """Every message the sink stored, oldest first."""
        box = mailbox.Maildir(self.sink.maildir, factory=None, create=False)
        parsed = [BytesParser(policy=email.policy.default).parsebytes(box.get_bytes(key))
                  for key in sorted(box.keys())]
        return [m for m in parsed if isinstance(m, EmailMessage)]

    def link_in_mail_to(self, address: str, known: int) -> str:
        """The pickup link in the plain-text part of the newest mail to ``address``.

        ``known`` is how many mails the sink held before: exactly one more must have arrived.
        """
        mails = self.mails()
        assert len(mails) == known + 1, f"expected one new mail, the sink holds {len(mails)}"
        to_them = [m for m in mails if address in str(m["To"])]
        assert to_them, f"no mail to {address}"
        part = to_them[-1].get_body(preferencelist=("plain",))
        assert part is not None, "the notice has no plain-text part"
        text = part.get_content()
        found = _LINK.findall(text)
        assert len(found) == 1, f"expected one pickup link in the notice, found {len(found)}"
        assert found[0].startswith(self.base_url + "/p/")
        return str(found[0])


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
    app = make_app(BASE_URL=base_url, SMTP_HOST="127.0.0.1", SMTP_PORT=mail_sink.port,
                   SMTP_CA_FILE=str(mail_sink.cert_file), SMTP_TLS="starttls")
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
    browser = playwright_driver.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                args=CHROMIUM_ARGS)
    yield browser
    browser.close()


VIEWPORTS: dict[str, dict[str, Any]] = {
    "desktop": {"viewport": {"width": 1280, "height": 800}},
    "phone": {"viewport": {"width": 360, "height": 740}, "is_mobile": True, "has_touch": True,
              "device_scale_factor": 2},
}
