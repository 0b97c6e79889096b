"""Issue 10 item 8: every date and number an auditor or a patient types is validated.

A parameter that does not parse gets a 400 with the form's message and
changes nothing: no export, no report, no search event. Never a 500, and
never a filter silently dropped (``since=garbage`` once exported the whole trail).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from portal import audit
from portal.audit import Action, Actor
from portal.extensions import db
from portal.models import AuditEvent
from tests.browser_client import Browser, enrolled_user

PASSWORD = "Correct horse battery staple 42"
BAD_VALUES = {
    "garbage": "garbage",
    "year-9999": "9999-12-31",
    "year-1": "0001-01-01",
    "above-64-bits": str(2**64),
    "negative": "-1",
    "huge": "9" * 10_000,
    "unicode-digits": "\u0662\u0660\u0662\u0664-\u0660\u0661-\u0660\u0661",  # Arabic-Indic
    "unicode-number": "\u0661\u0662",  # int() takes it: 12
}
DAY_PARAMS = ("since", "until")
EXPORTS = ("/audit/export/csv", "/audit/export/json", "/audit/export/fhir")


@dataclass(frozen=True)
class Attempt:
    """One route and parameter with a bad value, sent by the role that may use the route."""

    who: str
    method: str
    url: str
    param: str

    def send(self, world: dict[str, Browser], value: str) -> Any:
        browser = world[self.who]
        if self.method == "GET":
            return browser.get(self.url, query_string={self.param: value})
        # The session's CSRF token, from a page whose GET audits nothing that is counted.
        form_page = "/history" if self.who == "patient" else "/audit/disclosures"
        fields = {"since": "2024-01-01", "until": "2024-01-31", self.param: value}
        if self.url == "/audit/disclosures":
            fields["patient"] = "pat@example.org"
        return browser.submit(self.url, fields, form_page=form_page)


ATTEMPTS = [
    *(Attempt("auditor", "GET", "/audit/", p) for p in (*DAY_PARAMS, "before")),
    *(Attempt("auditor", "POST", "/audit/", p) for p in DAY_PARAMS),
    *(Attempt("auditor", "GET", url, p) for url in EXPORTS for p in DAY_PARAMS),
    *(Attempt("auditor", "POST", "/audit/disclosures", p) for p in DAY_PARAMS),
    Attempt("auditor", "GET", "/audit/verify", "head"),
    *(Attempt("patient", "POST", "/history/disclosures.pdf", p) for p in DAY_PARAMS),
]


@pytest.fixture
def world(app: Flask) -> dict[str, Browser]:
    """A signed-in auditor and a signed-in patient, and a few events in the trail."""
    _, auditor_secret, _ = enrolled_user(
        app, role="auditor", email="ada@example.org", name="Ada Auditor"
    )
    patient, patient_secret, _ = enrolled_user(
        app, role="patient", email="pat@example.org", name="Pat Ient"
    )
    with app.app_context():
        audit.record(
            db.session,
            Action.MESSAGE_VIEW,
            actor=Actor(patient.id, "patient"),
            patient_id=patient.id,
        )
        db.session.commit()
    browsers = {"auditor": Browser(app), "patient": Browser(app)}
    assert (
        browsers["auditor"].sign_in("ada@example.org", PASSWORD, auditor_secret).status_code == 302
    )
    assert (
        browsers["patient"].sign_in("pat@example.org", PASSWORD, patient_secret).status_code == 302
    )
    return browsers


def counts(app: Flask) -> dict[str, int]:
    """How many search, export, report and verify events the trail holds."""
    wanted = [Action.AUDIT_SEARCH, Action.AUDIT_EXPORT, Action.AUDIT_REPORT, Action.AUDIT_VERIFY]
    with app.app_context():
        rows = db.session.execute(
            select(AuditEvent.action, func.count())
            .where(AuditEvent.action.in_(wanted))
            .group_by(AuditEvent.action)
        ).all()
    return {str(action): int(n) for action, n in rows}


@pytest.mark.parametrize("value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_dates_and_numbers_get_400_and_change_nothing(
    app: Flask, world: dict[str, Browser], value: str
) -> None:
    before = counts(app)
    for attempt in ATTEMPTS:
        response = attempt.send(world, value)
        where = f"{attempt.method} {attempt.url} {attempt.param}={value[:20]}"
        assert response.status_code == 400, where
        assert "Content-Disposition" not in response.headers, where
        assert response.mimetype == "text/html", where
        page = response.get_data(as_text=True)
        assert "Something went wrong" not in page, where
        if attempt.param in DAY_PARAMS:
            assert "enter a date as YYYY-MM-DD, between 2000-01-01 and 2100-12-31" in page, where
        elif attempt.param == "before":
            assert "enter a whole number from 1 to" in page, where
    assert counts(app) == before  # nothing searched, exported, reported or verified


def test_export_with_garbage_since_exports_nothing(app: Flask, world: dict[str, Browser]) -> None:
    """The defect as reported: the bad filter was dropped and the whole trail exported."""
    response = world["auditor"].get("/audit/export/csv?since=garbage")
    assert response.status_code == 400
    assert "From (UTC): enter a date as YYYY-MM-DD" in response.get_data(as_text=True)
    assert "seq,occurred_at" not in response.get_data(as_text=True)
    assert "Content-Disposition" not in response.headers
    assert counts(app).get("audit.export", 0) == 0


def test_good_bounds_and_pages_still_work(app: Flask, world: dict[str, Browser]) -> None:
    auditor = world["auditor"]
    assert auditor.get("/audit/?since=2000-01-01&until=2100-12-31&before=1").status_code == 200
    export = auditor.get("/audit/export/csv?since=2000-01-01&until=2100-12-31")
    assert export.status_code == 200
    assert "message.view" in export.get_data(as_text=True)
    report = world["patient"].submit(
        "/history/disclosures.pdf",
        {"since": "2000-01-01", "until": "2100-12-31"},
        form_page="/history",
    )
    assert report.mimetype == "application/pdf"


def test_reversed_period_is_a_400_with_its_message(app: Flask, world: dict[str, Browser]) -> None:
    fields = {"since": "2024-02-01", "until": "2024-01-01"}
    patient = world["patient"].submit("/history/disclosures.pdf", fields, form_page="/history")
    auditor = world["auditor"].submit(
        "/audit/disclosures", {**fields, "patient": "pat@example.org"}
    )
    for response in (patient, auditor):
        assert response.status_code == 400
        assert "The last day is before the first." in response.get_data(as_text=True)
    assert counts(app).get("audit.report", 0) == 0
