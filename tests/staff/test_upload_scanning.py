"""Staff uploads (compose, and the CLI's --attach) are scanned by a real clamd: infected files
and a scanner that is down refuse the send with nothing stored, and every verdict is audited."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from sqlalchemy import func, select

from portal import cli
from portal.extensions import db
from portal.models import Attachment, Message
from tests.browser_client import Browser
from tests.factories import BODY, MINIMAL_PDF, SUBJECT
from tests.support import samples
from tests.support.clamd import EICAR, SIGNATURE, Clamd
from tests.support.conversations import (
    PATIENT,
    SAM,
    World,
    public_id_of,
    team_public_id,
    thread_url,
)
from tests.support.scanning import scan_events, scan_with, stored_files
from tests.support.teams import TEST_TEAM

INFECTED = {
    "eicar-in-pdf": ("Quagmire_scan.pdf", samples.pdf(attachment=EICAR)),
    "eicar-after-jpeg": ("Quagmire_photo.jpg", samples.jpeg() + EICAR),
}
UNAVAILABLE = "The virus scanner is not available; please try again later."


def compose(world: World, files: list[tuple[bytes, str]]) -> Any:
    browser: Browser = world.sam
    data: dict[str, Any] = {
        "subject": SUBJECT,
        "body": BODY,
        "body_format": "text",
        "expires_days": "7",
        "team": team_public_id(world.app, TEST_TEAM),
        "attachments": [(io.BytesIO(blob), name) for blob, name in files],
    }
    url = f"/staff/messages/new?to={public_id_of(world.app, PATIENT)}"
    return browser.submit(url, data, content_type="multipart/form-data")


def messages(app: Flask) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(Message)) or 0


@pytest.mark.parametrize("case", sorted(INFECTED))
def test_an_infected_file_is_refused_audited_and_nothing_stored(
    world: World, clamd: Clamd, case: str
) -> None:
    name, data = INFECTED[case]
    scan_with(world.app, str(clamd.socket_path))
    before, blobs = messages(world.app), stored_files(world.app)
    refused = compose(world, [(MINIMAL_PDF, "clean.pdf"), (data, name)])
    html = refused.get_data(as_text=True)
    assert refused.status_code == 400
    assert f"{name}: This file contains a virus or other malware" in html
    assert "Traceback" not in html
    assert (messages(world.app), stored_files(world.app)) == (before, blobs)
    assert stored_files(world.app)[1] == 0  # no .part left behind
    clean, infected = scan_events(world.app)
    assert (clean["outcome"], clean["details"]["verdict"]) == ("success", "clean")
    assert (infected["outcome"], infected["details"]["verdict"]) == ("denied", "infected")
    assert infected["details"]["signature"].startswith(SIGNATURE)
    assert infected["details"]["size"] == len(data)
    assert [clean["message_id"], infected["message_id"]] == [None, None]  # nothing was sent
    for event in (clean, infected):
        assert "Quagmire" not in event["raw"]
        assert "clean.pdf" not in event["raw"]


def test_an_infected_file_in_an_answer_is_refused(world: World, clamd: Clamd) -> None:
    name, data = INFECTED["eicar-in-pdf"]
    scan_with(world.app, str(clamd.socket_path))
    url = thread_url(world.conversation)
    fields = {
        "csrf_token": world.sam.token(url),
        "body": BODY,
        "attachments": (io.BytesIO(data), name),
    }
    before, blobs = messages(world.app), stored_files(world.app)
    refused = world.sam.client.post(
        f"{url}/answer", data=fields, content_type="multipart/form-data"
    )
    assert refused.status_code == 400
    assert f"{name}: This file contains a virus" in refused.get_data(as_text=True)
    assert (messages(world.app), stored_files(world.app)) == (before, blobs)
    (event,) = scan_events(world.app)
    assert (event["outcome"], event["details"]["verdict"]) == ("denied", "infected")


def test_a_clean_pdf_is_sent_with_a_clean_verdict(world: World, clamd: Clamd) -> None:
    scan_with(world.app, str(clamd.socket_path))
    before = messages(world.app)
    sent = compose(world, [(MINIMAL_PDF, "Quagmire_letter.pdf")])
    assert sent.status_code == 302
    assert messages(world.app) == before + 1
    (event,) = scan_events(world.app)
    assert event["details"] == {"verdict": "clean", "size": len(MINIMAL_PDF)}
    with world.app.app_context():
        attachment = db.session.scalars(
            select(Attachment).order_by(Attachment.id.desc()).limit(1)
        ).one()
        assert (event["target_id"], event["message_id"]) == (
            attachment.public_id,
            attachment.message_id,
        )
        assert event["patient_id"] == attachment.message.recipient_id


def test_a_scanner_that_is_down_refuses_the_send(world: World, tmp_path: Path) -> None:
    scan_with(world.app, str(tmp_path / "nobody-listens.sock"))
    before, blobs = messages(world.app), stored_files(world.app)
    refused = compose(world, [(MINIMAL_PDF, "Quagmire_letter.pdf")])
    assert refused.status_code == 400
    assert UNAVAILABLE in refused.get_data(as_text=True)
    assert (messages(world.app), stored_files(world.app)) == (before, blobs)
    (event,) = scan_events(world.app)
    assert (event["outcome"], event["details"]) == (
        "failure",
        {"verdict": "unavailable", "size": 0, "reason": "connect"},
    )


def test_with_scanning_off_a_file_is_sent_unscanned_and_recorded_as_not_scanned(
    world: World,
) -> None:
    data = samples.pdf(attachment=EICAR)
    sent = compose(world, [(data, "Quagmire_scan.pdf")])
    assert sent.status_code == 302  # nothing scans it: off means off, say the settings
    (event,) = scan_events(world.app)  # but the trail says it was never scanned
    assert (event["outcome"], event["details"]) == (
        "success",
        {"verdict": "not-scanned", "size": len(data)},
    )
    assert event["message_id"] is not None


def test_the_cli_scans_its_attachments(world: World, clamd: Clamd, tmp_path: Path) -> None:
    infected, clean = tmp_path / "Quagmire_scan.pdf", tmp_path / "letter.pdf"
    infected.write_bytes(samples.pdf(attachment=EICAR))
    clean.write_bytes(MINIMAL_PDF)
    env = {
        "PORTAL_DATABASE_URL": world.app.config["DATABASE_URL"],
        "PORTAL_BLOB_DIR": world.app.config["BLOB_DIR"],
        "PORTAL_CLAMD_SOCKET": str(clamd.socket_path),
    }
    base = ["messages", "send", "--from", SAM, "--to", PATIENT, "--subject", SUBJECT]
    base += ["--body", BODY, "--team", TEST_TEAM]
    before, blobs = messages(world.app), stored_files(world.app)
    refused = CliRunner().invoke(cli.main, [*base, "--attach", str(infected)], env=env)
    assert refused.exit_code == 1
    assert "Quagmire_scan.pdf: This file contains a virus" in refused.output
    assert (messages(world.app), stored_files(world.app)) == (before, blobs)
    sent = CliRunner().invoke(cli.main, [*base, "--attach", str(clean)], env=env)
    assert sent.exit_code == 0, sent.output
    verdicts = [
        (e["details"]["verdict"], e["message_id"] is not None) for e in scan_events(world.app)
    ]
    assert verdicts == [("infected", False), ("clean", True)]
