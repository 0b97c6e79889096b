"""A conversation in headless Chromium (issue 14): the patient replies, the member of staff
follows the reply notice's link, signs in, reads the reply and answers in the thread, and
the patient reads the answer, from its email's link and in their conversations.

Every email goes through the notifier over TLS into the real mail sink, and the links are
read from the emails' plain-text parts, as a person would follow them.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from notifier import worker
from portal.audit import NO_REQUEST, Action
from portal.extensions import db
from portal.services import accounts, messaging
from portal.services.messages import Upload
from tests.browser_client import current_code, enrolled_user
from tests.factories import BODY, FILENAME, MINIMAL_PDF, SUBJECT
from tests.support.browser import VIEWPORTS, Portal
from tests.support.pickup import events

pytestmark = pytest.mark.browser

STAFF_EMAIL = "sam@example.org"
PATIENT_EMAIL = "zq@example.org"
PASSWORD = "Correct horse battery staple 42"  # tests.browser_client.enrolled_user's
REPLY = "The Quasirandomitis itch is worse at night. Should I come in?"
ANSWER = "Yes, please come in on Thursday morning; bring the Xylophonoma letter."
_THREAD = re.compile(r"https?://\S+/staff/conversations/[0-9a-f]{32}")


@pytest.fixture
def tabs(chromium: Browser) -> Iterator[tuple[BrowserContext, BrowserContext]]:
    """Two browser profiles at the desktop viewport: the patient's and the staff member's."""
    made = [chromium.new_context(**VIEWPORTS["desktop"]) for _ in range(2)]
    for context in made:
        context.set_default_timeout(15_000)
    yield made[0], made[1]
    for context in made:
        context.close()


def deliver(portal: Portal, expected: int) -> None:
    stats = worker.drain(portal.app, "test")
    assert (stats.sent, stats.failed) == (expected, 0), stats


def plain_text_to(portal: Portal, address: str) -> str:
    """The plain-text part of the newest mail to ``address``."""
    mails = [m for m in portal.mails() if address in str(m["To"])]
    assert mails, f"no mail to {address}"
    part = mails[-1].get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def sign_in_on(page: Page, email: str, secret: str) -> None:
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Continue").click()
    page.get_by_label("Authentication code").fill(current_code(secret))
    page.get_by_role("button", name="Sign in").click()


def test_patient_replies_staff_read_and_answer_patient_reads_the_answer(
    portal_server: Portal, tabs: tuple[BrowserContext, BrowserContext]
) -> None:
    app, (patient_tab, staff_tab) = portal_server.app, tabs
    _, staff_secret, _ = enrolled_user(app, role="staff", email=STAFF_EMAIL)
    _, patient_secret, _ = enrolled_user(app, role="patient", email=PATIENT_EMAIL)
    with app.app_context():
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
            uploads=[Upload(FILENAME, io.BytesIO(MINIMAL_PDF))],
            meta=NO_REQUEST,
        )
        db.session.commit()
    deliver(portal_server, 1)
    link = portal_server.link_in_mail_to(PATIENT_EMAIL, 0)

    # The patient signs in from the link and replies on the message page.
    patient = patient_tab.new_page()
    patient.goto(link)
    patient.get_by_label("Password", exact=True).fill(PASSWORD)
    patient.get_by_role("button", name="Continue").click()
    patient.get_by_label("Authentication code").fill(current_code(patient_secret))
    patient.get_by_role("button", name="Sign in").click()
    expect(patient.locator("h1")).to_have_text(SUBJECT)
    patient.get_by_label("Your reply").fill(REPLY)
    patient.get_by_role("button", name="Send reply").click()
    expect(patient.get_by_text("Your reply was sent.")).to_be_visible()

    # The reply notice links to the conversation; sign-in leads back to it.
    deliver(portal_server, 1)
    notice = plain_text_to(portal_server, STAFF_EMAIL)
    (thread_link,) = _THREAD.findall(notice)
    assert thread_link.startswith(portal_server.base_url)
    assert REPLY not in notice
    staff = staff_tab.new_page()
    staff.goto(thread_link)
    sign_in_on(staff, STAFF_EMAIL, staff_secret)
    expect(staff.locator("h1")).to_have_text(SUBJECT)
    assert staff.url == thread_link
    expect(staff.get_by_text(REPLY)).to_be_visible()
    assert [e.actor_id for e in events(app, Action.REPLY_READ)] == [sender.id]
    staff.get_by_label("Your answer").fill(ANSWER)
    staff.get_by_role("button", name="Send answer").click()
    expect(staff.get_by_text("Your answer was sent.")).to_be_visible()
    expect(staff.get_by_text(ANSWER)).to_be_visible()

    # The patient follows the answer's own email link, then finds it in the thread too.
    deliver(portal_server, 1)
    answer_link = portal_server.link_in_mail_to(PATIENT_EMAIL, 2)
    assert answer_link != link
    patient.goto(answer_link)
    patient.get_by_role("button", name="Continue").click()
    expect(patient.locator("h1")).to_have_text(f"Re: {SUBJECT}")
    expect(patient.get_by_text(ANSWER)).to_be_visible()
    patient.get_by_role("link", name="Conversations").click()
    patient.get_by_role("link", name=SUBJECT).click()
    expect(patient.get_by_text(REPLY)).to_be_visible()
    expect(patient.get_by_text(ANSWER)).to_be_visible()
