"""From the email to the document, in headless Chromium, at a desktop and at a phone viewport.

Staff send a message with a PDF; the notifier delivers the notice over TLS into the mail
sink; the test reads the link from the email's plain-text part and walks the patient through
the portal served by a real threaded HTTP server, then downloads the attachment and checks
it is byte-identical to the upload.

How screens are counted: every document the patient's browser loads and shows in the main
frame, from the link's landing page to the message page, both included (redirects are not
screens; the download is not a screen). The first-time goal is at most 6, the returning goal
at most 3, both "from the email to the document" (issue 6), so the landing page counts in
both. A flow above a goal fails the test.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Frame, Page, Request, expect
from pypdf import PdfWriter

from notifier import worker
from portal.audit import NO_REQUEST
from portal.extensions import db
from portal.services import accounts, messaging
from portal.services.messages import Upload
from tests.browser_client import current_code, enrolled_user
from tests.factories import BODY, FILENAME, PATIENT_DOB, SUBJECT, make_patient
from tests.support.browser import VIEWPORTS, Portal

pytestmark = pytest.mark.browser

FIRST_TIME_GOAL = 6
RETURNING_GOAL = 3
STAFF_EMAIL = "sam@example.org"
PATIENT_EMAIL = "zq@example.org"
PASSWORD = "Correct horse battery staple 42"  # tests.browser_client.enrolled_user's
NEW_PASSWORD = "Lantern orchard velvet compass 77"
RETURNING_HINT = (
    "The link's own page carries the password for an enrolled recipient; a screen came back "
    "between it and the code."
)


# The page's widths, and the innermost elements that stick out on the right (tag.class only).
WIDTH_JS = """() => {
  const root = document.documentElement, client = root.clientWidth;
  const wide = [...document.body.querySelectorAll("*")]
    .filter(el => el.children.length === 0 && el.getBoundingClientRect().right > client + 1)
    .map(el => el.tagName.toLowerCase() + (el.className ? "." + el.className : ""));
  return {scroll: root.scrollWidth, inner: window.innerWidth, client: client,
          wide: wide.slice(0, 5)};
}"""


def make_pdf() -> bytes:
    """A valid one-page PDF of about 600 KiB (several 256 KiB encryption segments)."""
    writer = PdfWriter()
    writer.add_blank_page(width=595, height=842)
    writer.add_attachment("scan.bin", random.Random(6).randbytes(600 * 1024))
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(params=sorted(VIEWPORTS))
def viewport(request: pytest.FixtureRequest) -> str:
    """``desktop`` (1280x800) or ``phone`` (360x740, mobile)."""
    return str(request.param)


@pytest.fixture
def context(chromium: Browser, viewport: str) -> Any:
    """A fresh browser profile (no cookies) at the viewport."""
    made: BrowserContext = chromium.new_context(accept_downloads=True, **VIEWPORTS[viewport])
    made.set_default_timeout(15_000)
    yield made
    made.close()


@dataclass
class Walk:
    """The patient's tab: records each screen (main-frame document) and every request."""

    page: Page
    token: str
    screens: list[str] = field(default_factory=list)
    headings: list[str] = field(default_factory=list)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # method, URL, Referer
    continued_at: int | None = None  # len(requests) when Continue was clicked
    too_wide: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.page.on("framenavigated", self._navigated)
        self.page.on("request", self._requested)

    def _requested(self, request: Request) -> None:
        referer = request.headers.get("referer", "")
        self.requests.append((request.method, request.url, referer))

    def _navigated(self, frame: Frame) -> None:
        if frame == self.page.main_frame and frame.url != "about:blank":
            self.screens.append(frame.url)

    def open(self, url: str, heading: str) -> None:
        response = self.page.goto(url)
        assert response is not None
        assert response.status == 200, response.status
        self.arrived(heading)

    def click(self, role: str, name: str, heading: str) -> None:
        """Click a button or link that loads the next screen, which shows ``heading``."""
        with self.page.expect_navigation():
            self.page.get_by_role(role, name=name, exact=True).click()  # type: ignore[arg-type]
        self.arrived(heading)

    def arrived(self, heading: str) -> None:
        """Check the screen just shown: its heading, no token in its URL; measure its width."""
        expect(self.page.locator("h1")).to_have_text(heading)
        self.headings.append(heading)
        if self.continued_at is not None:
            assert self.token not in self.page.url
        width = self.page.evaluate(WIDTH_JS)
        # Mobile Chromium widens the layout viewport (and innerWidth) to fit content that
        # overflows, so innerWidth alone would hide the overflow: compare with clientWidth too.
        if width["scroll"] > min(width["inner"], width["client"]) + 1:
            self.too_wide.append(f"{heading!r} scrolls sideways: {width}")

    def press_continue(self, heading: str) -> None:
        """The landing page's Continue: from here on no URL may carry the token."""
        self.continued_at = len(self.requests)
        self.click("button", "Continue", heading)

    def check_token_left_the_urls(self) -> None:
        assert self.continued_at is not None
        assert self.token in self.screens[0]
        later = self.requests[self.continued_at :]
        posted = [(m, u) for m, u, _ in later if self.token in u]
        assert len(posted) == 1, "Continue should be the only request to the link after it"
        assert posted[0][0] == "POST"
        leaked = [u for u in self.screens[1:] if self.token in u]
        leaked += [r for m, u, r in later if self.token in r or (self.token in u and m != "POST")]
        assert not leaked, "the token appears in a URL or Referer after Continue"

    def download(self, tmp_path: Path, expected: bytes) -> None:
        """Click the attachment's Download link; the saved file must equal ``expected``."""
        before = len(self.screens)
        with self.page.expect_download() as info:
            self.page.get_by_role("link", name="Download", exact=True).click()
        target = tmp_path / "downloaded.pdf"
        info.value.save_as(target)
        assert info.value.suggested_filename == FILENAME
        assert sha256(target.read_bytes()) == sha256(expected)
        assert len(self.screens) == before, "the download loaded a page"
        assert self.token not in info.value.url

    def screen_report(self) -> str:
        """The screens in order: heading and path (the token shown as <token>)."""
        paths = ["/" + u.split("/", 3)[-1].replace(self.token, "<token>") for u in self.screens]
        return "; ".join(
            f"{n}. {h} ({p})" for n, (h, p) in enumerate(zip(self.headings, paths, strict=False), 1)
        )


def verdict(walk: Walk, who: str, goal: int, hint: str = "") -> None:
    """Fail if the walk took more screens than ``goal`` or any screen scrolled sideways."""
    screens = len(walk.screens)  # a plain number, so a failure does not print the token
    assert screens == len(walk.headings), walk.screen_report()
    problems = list(walk.too_wide)
    if screens > goal:
        problems.append(
            f"a {who} patient passes {screens} screens from the email to the "
            f"document (goal {goal}): {walk.screen_report()}. {hint}"
        )
    assert not problems, "\n".join(problems)


def send_and_deliver(portal: Portal, upload: bytes) -> str:
    """Staff send the message with ``upload``; the notifier delivers it; return the link."""
    known = len(portal.mails())
    with portal.app.app_context():
        sender = accounts.find_by_email(db.session, STAFF_EMAIL)
        recipient = accounts.find_by_email(db.session, PATIENT_EMAIL)
        assert sender is not None
        assert recipient is not None
        messaging.send(
            db.session,
            sender=sender,
            recipient=recipient,
            subject=SUBJECT,
            body=BODY,
            uploads=[Upload(FILENAME, io.BytesIO(upload))],
            meta=NO_REQUEST,
        )
        db.session.commit()
    stats = worker.drain(portal.app, "test")
    assert (stats.sent, stats.failed, stats.retrying) == (1, 0, 0), stats
    return portal.link_in_mail_to(PATIENT_EMAIL, known)


def read_message(walk: Walk, upload: bytes, tmp_path: Path, viewport: str) -> None:
    """On the message page: the content is there; download the attachment; screenshot."""
    page = walk.page
    expect(page.get_by_text(BODY)).to_be_visible()
    expect(page.get_by_text(sha256(upload))).to_be_visible()
    page.screenshot(path=str(tmp_path / f"message-{viewport}.png"), full_page=True)
    walk.download(tmp_path, upload)
    walk.check_token_left_the_urls()


def test_first_time_patient_from_email_to_document(
    portal_server: Portal, context: BrowserContext, viewport: str, tmp_path: Path
) -> None:
    app = portal_server.app
    enrolled_user(app, role="staff", email=STAFF_EMAIL)
    with app.app_context():
        make_patient(db.session, email=PATIENT_EMAIL)  # date of birth on file, no password
        db.session.commit()
    upload = make_pdf()
    link = send_and_deliver(portal_server, upload)
    walk = Walk(context.new_page(), link.rsplit("/", 1)[1])

    walk.open(link, "You have a secure message")
    expect(walk.page.get_by_text(app.config["ORG_NAME"]).first).to_be_visible()
    walk.press_continue("Confirm it is you")
    walk.page.get_by_label("Date of birth").fill(PATIENT_DOB.isoformat())
    walk.click("button", "Continue", "Choose your password")
    walk.page.get_by_label("New password", exact=True).fill(NEW_PASSWORD)
    walk.page.get_by_label("Confirm new password").fill(NEW_PASSWORD)
    walk.click("button", "Save password", "Set up your authenticator app")
    secret = walk.page.locator("#totp-secret").inner_text().strip()
    walk.page.get_by_label("Authentication code").fill(current_code(secret))
    walk.click("button", "Confirm", "Your recovery codes")
    walk.click("link", "I have saved them, continue", SUBJECT)
    assert "/messages/" in walk.page.url
    read_message(walk, upload, tmp_path, viewport)

    verdict(walk, "first-time", FIRST_TIME_GOAL)


def test_returning_patient_from_email_to_document(
    portal_server: Portal, context: BrowserContext, viewport: str, tmp_path: Path
) -> None:
    app = portal_server.app
    enrolled_user(app, role="staff", email=STAFF_EMAIL)
    _, secret, _ = enrolled_user(
        app, role="patient", email=PATIENT_EMAIL, name="Zebulon Quagmire-Phiseed"
    )
    upload = make_pdf()
    link = send_and_deliver(portal_server, upload)
    walk = Walk(context.new_page(), link.rsplit("/", 1)[1])

    walk.open(link, "You have a secure message")
    walk.page.get_by_label("Password", exact=True).fill(PASSWORD)  # on the link's own page
    walk.press_continue("Enter your code")
    walk.page.get_by_label("Authentication code").fill(current_code(secret))
    walk.click("button", "Sign in", SUBJECT)
    assert "/messages/" in walk.page.url
    read_message(walk, upload, tmp_path, viewport)

    verdict(walk, "returning", RETURNING_GOAL, RETURNING_HINT)
