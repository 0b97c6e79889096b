"""The status page says "delivery delayed" while the notifier cannot use the mail relay
(issue 12, item 4): the notice is queued with its link, and goes out once that is fixed."""

from __future__ import annotations

from flask import Flask

from notifier import health
from notifier.smtp import TransportConfigError
from portal.database import utcnow
from portal.extensions import db
from tests.browser_client import enrolled_user
from tests.support.pickup import STAFF_EMAIL, enrolled_patient, send, signed_in


def _pass(app: Flask, fault: TransportConfigError | None) -> None:
    """Record a notifier pass that met ``fault`` (None: it used the relay), as the worker does."""
    result = health.PassResult(0, 0, 0, 1 if fault else 0, fault, reached_relay=fault is None)
    with app.app_context():
        health.record_pass(db.session, "mail-1", utcnow(), 120, result)
        db.session.commit()


def test_the_status_page_says_delivery_delayed_while_the_relay_is_unusable(app: Flask) -> None:
    _, secret, _ = enrolled_user(app)
    enrolled_patient(app)
    sent = send(app)
    browser = signed_in(app, STAFF_EMAIL, secret)
    page = f"/staff/messages/{sent.public_id}"

    before = browser.get(page).get_data(as_text=True)
    _pass(app, TransportConfigError("tls-verify-failed"))
    during = browser.get(page).get_data(as_text=True)
    _pass(app, None)
    after = browser.get(page).get_data(as_text=True)

    assert "Email notice queued" in before
    assert "delivery delayed" not in before
    assert "Email notice queued: delivery delayed" in during
    assert '<span class="badge badge-bad">Email delivery delayed' in during
    assert "PORTAL_SMTP_CA_FILE" not in during  # an operator's matter, not staff's
    assert "delivery delayed" not in after
