"""With ``PORTAL_SCAN_UPLOADS=off`` every upload's verdict is still audited, as
``not-scanned``, and a serving process says at start that uploads are not scanned
(issue 14 review, defect 2)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from portal import cli
from tests.factories import MINIMAL_PDF
from tests.support.clamd import EICAR
from tests.support.conversations import OPEN_TEAM, PATIENT, SAM, World, team_public_id, user_id
from tests.support.scanning import scan_events, stored_files
from tests.support.teams import TEST_TEAM

NOT_SCANNED_WARNING = "uploads are not scanned for malware"
REPO = Path(__file__).resolve().parents[2]


def test_a_file_refused_for_its_content_is_recorded_unscanned_too(world: World) -> None:
    before = stored_files(world.app)
    fields = {
        "csrf_token": world.patient.token("/conversations/new"),
        "team": team_public_id(world.app, OPEN_TEAM),
        "subject": "A rash",
        "body": "See the file.",
        "attachments": (io.BytesIO(b"not a pdf at all " + EICAR), "Quagmire_rash.pdf"),
    }
    refused = world.patient.client.post(
        "/conversations/new", data=fields, content_type="multipart/form-data"
    )
    assert refused.status_code == 400
    assert stored_files(world.app) == before
    (event,) = scan_events(world.app)
    assert (event["details"]["verdict"], event["message_id"]) == ("not-scanned", None)
    assert event["patient_id"] == user_id(world.app, PATIENT)
    assert "Quagmire" not in event["raw"]


def test_the_cli_records_its_unscanned_attachments(world: World, tmp_path: Path) -> None:
    letter = tmp_path / "Quagmire_letter.pdf"
    letter.write_bytes(MINIMAL_PDF)
    env = {
        "PORTAL_DATABASE_URL": world.app.config["DATABASE_URL"],
        "PORTAL_BLOB_DIR": world.app.config["BLOB_DIR"],
    }
    args = ["messages", "send", "--from", SAM, "--to", PATIENT, "--subject", "Results"]
    args += ["--body", "See the letter.", "--team", TEST_TEAM, "--attach", str(letter)]
    sent = CliRunner().invoke(cli.main, args, env=env)
    assert sent.exit_code == 0, sent.output
    (event,) = scan_events(world.app)
    assert event["details"] == {"verdict": "not-scanned", "size": len(MINIMAL_PDF)}
    assert event["message_id"] is not None
    assert event["patient_id"] == user_id(world.app, PATIENT)


def _start_warnings(tmp_path: Path, **settings: str) -> list[dict[str, object]]:
    """Load ``portal.wsgi`` (what every serving process does) in a fresh interpreter; the
    WARNING records it logged that say uploads are not scanned."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_")}
    env |= {"PORTAL_INSTANCE_DIR": str(tmp_path / "instance"), **settings}
    done = subprocess.run(
        [sys.executable, "-c", "import portal.wsgi"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    return [r for r in records if NOT_SCANNED_WARNING in str(r.get("message"))]


def test_a_serving_process_without_clamd_warns_once_that_uploads_are_not_scanned(
    tmp_path: Path,
) -> None:
    (warning,) = _start_warnings(tmp_path)
    assert warning["level"] == "WARNING"
    assert warning["event"] == "upload_scanning_off"


def test_a_serving_process_told_to_scan_does_not_warn(tmp_path: Path) -> None:
    assert _start_warnings(tmp_path, PORTAL_CLAMD_SOCKET=str(tmp_path / "clamd.sock")) == []
    told_off = _start_warnings(
        tmp_path, PORTAL_CLAMD_SOCKET=str(tmp_path / "clamd.sock"), PORTAL_SCAN_UPLOADS="off"
    )
    assert len(told_off) == 1
