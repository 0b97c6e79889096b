"""Audit exports: CSV (formula-safe), JSON Lines (round trip), FHIR R4 AuditEvents, the CLI."""

from __future__ import annotations

import csv
import gc
import io
import json
import os
import stat
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from click.testing import CliRunner
from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent
from fhir.resources.R4B.bundle import Bundle as FhirBundle
from flask import Flask
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

import portal.commands.audit_export  # noqa: F401  (attaches `portal audit export`)
from portal import audit, cli
from portal.audit import Action, Actor, Outcome, RequestMeta
from portal.database import utcnow
from portal.extensions import db
from portal.models import AuditEvent, AuditHead, User
from portal.services import audit_export, audit_query
from portal.services.audit_query import AuditFilter
from tests.factories import PATIENT_NAME, make_message, make_patient, make_user

FORMULA_AGENTS = ("+cmd", "-1+1", "@SUM(A1)", "\tx", "\rx", "=1+1")
EVIL_NAME = '=HYPERLINK("http://attacker.example","click")'
MIB = 1024 * 1024


def record(
    session: Session,
    action: Action = Action.MESSAGE_VIEW,
    *,
    actor: User | None = None,
    ua: str | None = None,
    **kwargs: Any,
) -> AuditEvent:
    meta = RequestMeta(client_ip="192.0.2.5", user_agent=ua, request_id="req-7")
    who = Actor(actor.id, actor.role) if actor else audit.SYSTEM
    return audit.record(session, action, actor=who, meta=meta, **kwargs)


def joined(chunks: Any) -> str:
    parts = list(chunks)
    assert all(isinstance(part, str) for part in parts)
    return "".join(parts)


@pytest.fixture
def trail(app: Flask) -> dict[str, Any]:
    """A small trail with a real staff user, patient and message, and every outcome."""
    with app.app_context():
        s = db.session
        staff = make_user(s, "staff", "staff@example.org", "Sam Staffer")
        patient = make_patient(s)
        message = make_message(s, staff, patient)
        record(
            s,
            actor=staff,
            patient_id=patient.id,
            message_id=message.id,
            target_type="message",
            target_id=message.public_id,
            details={"bytes": 12},
        )
        record(s, Action.AUTH_SIGNIN_FAILED, outcome=Outcome.FAILURE, ua="curl/8")
        record(s, Action.ACCESS_DENIED, actor=staff, patient_id=patient.id, outcome=Outcome.DENIED)
        record(s, Action.KEY_ROTATE, target_type="keyring", target_id="v2")
        s.commit()
        return {
            "staff": staff.public_id,
            "patient": patient.public_id,
            "message": message.public_id,
            "patient_id": patient.id,
        }


def test_csv_neutralises_formula_cells(app: Flask) -> None:
    with app.app_context():
        evil = make_user(db.session, "staff", "evil@example.org", EVIL_NAME)
        for agent in FORMULA_AGENTS:
            record(db.session, actor=evil, ua=agent)
        db.session.commit()
        text = joined(audit_export.export_csv(db.session, AuditFilter(actor_id=evil.id)))
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert tuple(rows[0]) == audit_export.FIELDS
    body = [dict(zip(audit_export.FIELDS, row, strict=True)) for row in rows[1:]]
    assert [r["user_agent"] for r in body] == ["'" + a for a in FORMULA_AGENTS]
    assert {r["actor_name"] for r in body} == {"'" + EVIL_NAME}
    assert all(not cell.startswith(audit_export.FORMULA_STARTS) for r in rows for cell in r)


def test_csv_rows_match_search(app: Flask, trail: dict[str, Any]) -> None:
    with app.app_context():
        text = joined(audit_export.export_csv(db.session, AuditFilter()))
        searched = audit_query.search(db.session, AuditFilter()).rows
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [int(r["seq"]) for r in rows] == sorted(r.seq for r in searched)
    view = next(r for r in rows if r["action"] == "message.view")
    assert (view["actor_name"], view["patient_name"]) == ("Sam Staffer", PATIENT_NAME)
    assert json.loads(view["details"]) == {"bytes": 12}
    assert view["occurred_at"].endswith("Z")


def test_jsonl_round_trips_and_rechecks_the_chain(app: Flask, trail: dict[str, Any]) -> None:
    with app.app_context():
        text = joined(audit_export.export_jsonl(db.session, AuditFilter()))
        searched = audit_query.search(db.session, AuditFilter()).rows
    lines = [json.loads(line) for line in text.splitlines()]
    expected = sorted((audit_export.flat(r) for r in searched), key=lambda r: r["seq"])
    assert lines == expected
    prev = audit.GENESIS_HASH
    for line in lines:  # the export alone is enough to recompute the chain
        fields = [
            line[n]
            for n in (
                "seq",
                "occurred_at",
                "actor_id",
                "actor_role",
                "action",
                "target_type",
                "target_id",
                "patient_id",
                "message_id",
                "outcome",
                "client_ip",
                "user_agent",
                "request_id",
            )
        ]
        details = json.dumps(line["details"], sort_keys=True, separators=(",", ":"))
        assert line["prev_hash"] == prev
        assert audit._hash_fields(*fields, details, prev) == line["hash"]
        prev = line["hash"]


def test_filtered_export_holds_only_matches(app: Flask, trail: dict[str, Any]) -> None:
    with app.app_context():
        flt = AuditFilter(patient_id=trail["patient_id"])
        text = joined(audit_export.export_jsonl(db.session, flt))
        assert len(text.splitlines()) == audit_query.count(db.session, flt) == 3


def test_fhir_bundle_validates_as_r4(app: Flask, trail: dict[str, Any]) -> None:
    with app.app_context():
        text = joined(audit_export.export_fhir(db.session, AuditFilter()))
        total = audit_query.count(db.session, AuditFilter())
    bundle = json.loads(text)
    assert (bundle["resourceType"], bundle["type"]) == ("Bundle", "collection")
    assert len(bundle["entry"]) == total
    FhirBundle.model_validate(bundle)
    prev = audit.GENESIS_HASH
    for entry in bundle["entry"]:
        resource = entry["resource"]
        FhirAuditEvent.model_validate(resource)
        assert resource["type"]["code"]
        assert resource["recorded"].endswith("Z")
        assert resource["agent"][0]["requestor"] is True
        assert resource["source"]["observer"]["display"] == "Pickup Portal"
        chain = {e["url"]: e for e in resource["extension"][0]["extension"]}
        assert chain["prev-hash"]["valueString"] == prev
        prev = chain["hash"]["valueString"]
    assert PATIENT_NAME not in text
    by_action = {e["resource"]["subtype"][0]["code"]: e["resource"] for e in bundle["entry"]}
    view = by_action["message.view"]
    assert (view["action"], view["outcome"], view["type"]["code"]) == ("R", "0", "rest")
    assert view["agent"][0]["who"]["identifier"]["value"] == trail["staff"]
    assert view["agent"][0]["network"] == {"address": "192.0.2.5", "type": "2"}
    refs = [e["what"].get("reference") for e in view["entity"]]
    assert refs == [f"Patient/{trail['patient']}", f"Communication/{trail['message']}"]
    assert view["entity"][0]["type"]["code"] == "1"
    failed = by_action["auth.signin.failed"]
    assert (failed["type"]["code"], failed["action"], failed["outcome"]) == ("110114", "E", "4")
    assert failed["agent"][0]["who"]["identifier"]["value"] == "system"
    assert by_action["access.denied"]["outcome"] == "8"
    assert by_action["key.rotate"]["action"] == "U"


def test_fhir_patient_actor_is_only_a_patient_reference(app: Flask, trail: dict[str, Any]) -> None:
    """Issue 10 item 9: a patient acting appears as Patient/<public id>, never by name."""
    with app.app_context():
        patient = db.session.get(User, trail["patient_id"])
        record(db.session, Action.MESSAGE_VIEW, actor=patient, patient_id=patient.id)
        db.session.commit()
        text = joined(audit_export.export_fhir(db.session, AuditFilter(actor_id=patient.id)))
    bundle = json.loads(text)
    FhirBundle.model_validate(bundle)
    agents = [e["resource"]["agent"][0] for e in bundle["entry"]]
    assert agents
    assert all(a["who"] == {"reference": f"Patient/{trail['patient']}"} for a in agents)
    assert PATIENT_NAME not in text
    assert "zq@example.org" not in text


def test_fhir_empty_bundle_is_valid(app: Flask) -> None:
    with app.app_context():
        chunks = audit_export.export_fhir(db.session, AuditFilter(since=utcnow()))
        bundle = json.loads(joined(chunks))
    assert bundle["entry"] == []
    FhirBundle.model_validate(bundle)


def test_every_action_has_a_fhir_action_code() -> None:
    codes = {action: audit_export.fhir_action(action) for action in Action}
    assert set(codes.values()) == {"C", "R", "U", "D", "E"}
    assert codes[Action.MESSAGE_SHRED] == "D"
    assert codes[Action.AUTH_SIGNIN] == "E"


def test_record_export_audits_format_and_filters(app: Flask) -> None:
    with app.app_context():
        flt = AuditFilter(patient_id=4, action="auth.")
        event = audit_export.record_export(
            db.session, flt, "fhir", Actor(2, "auditor"), RequestMeta(client_ip="192.0.2.1")
        )
        assert event.action == "audit.export"
        assert event.patient_id == 4
        assert json.loads(event.details) == {"format": "fhir", "patient_id": 4, "action": "auth."}


@pytest.mark.parametrize("fmt", ["csv", "json", "fhir"])
def test_cli_export_to_private_file(
    app: Flask, trail: dict[str, Any], tmp_path: Path, fmt: str
) -> None:
    target = tmp_path / f"trail.{fmt}"
    env = {"PORTAL_DATABASE_URL": app.config["DATABASE_URL"]}
    today = utcnow().date()
    args = [
        "audit",
        "export",
        "--format",
        fmt,
        "--patient",
        "zq@example.org",
        "--since",
        today.isoformat(),
        "--until",
        (today + timedelta(days=1)).isoformat(),
        "-o",
        str(target),
    ]
    result = CliRunner().invoke(cli.main, args, env=env)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    body = target.read_text(encoding="utf-8")
    if fmt == "json":
        assert {json.loads(line)["patient_id"] for line in body.splitlines()} == {
            trail["patient_id"]
        }
    elif fmt == "fhir":  # the patient's 3 events and the export's own, recorded before it
        assert len(json.loads(body)["entry"]) == 4
    else:  # a header, and the same 4 events
        assert len(list(csv.reader(io.StringIO(body, newline="")))) == 5
    with app.app_context():
        db.session.expire_all()
        event = db.session.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc())).first()
        assert event is not None
        assert event.action == "audit.export"
        assert event.actor_role == "system"
        assert json.loads(event.details)["format"] == fmt
        assert audit.verify(db.session).ok


def test_cli_export_to_stdout_and_existing_file_replaced_with_force(
    app: Flask, trail: dict[str, Any], tmp_path: Path
) -> None:
    env = {"PORTAL_DATABASE_URL": app.config["DATABASE_URL"]}
    result = CliRunner().invoke(cli.main, ["audit", "export", "--format", "json"], env=env)
    assert result.exit_code == 0, result.output
    with app.app_context():
        # Every event, the export's own included: it is committed before the first row leaves.
        assert len(result.output.splitlines()) == audit_query.count(db.session, AuditFilter())
    target = tmp_path / "old.csv"
    target.write_text("old")
    os.chmod(target, 0o644)
    again = CliRunner().invoke(
        cli.main, ["audit", "export", "--format", "csv", "--force", "-o", str(target)], env=env
    )
    assert again.exit_code == 0, again.output
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert "old" not in target.read_text()


def test_cli_unknown_patient_exits_without_echoing_email(
    app: Flask, trail: dict[str, Any], tmp_path: Path
) -> None:
    env = {"PORTAL_DATABASE_URL": app.config["DATABASE_URL"]}
    for email in ("nobody@example.org", "staff@example.org"):
        result = CliRunner().invoke(
            cli.main, ["audit", "export", "--format", "csv", "--patient", email], env=env
        )
        assert result.exit_code == 1
        assert "portal: no patient with that email" in result.output
        assert email not in result.output
    with app.app_context():
        assert audit_query.count(db.session, AuditFilter(action="audit.export")) == 0


@pytest.mark.parametrize(
    "day", ["9999-12-31", "0001-01-01", "garbage", "\u0662\u0660\u0662\u0664-01-01"]
)
def test_cli_out_of_range_dates_export_nothing(app: Flask, trail: dict[str, Any], day: str) -> None:
    """Issue 10 item 8: --since/--until have the web's bounds; a refusal exports nothing."""
    env = {"PORTAL_DATABASE_URL": app.config["DATABASE_URL"]}
    for option in ("--since", "--until"):
        result = CliRunner().invoke(
            cli.main, ["audit", "export", "--format", "csv", option, day], env=env
        )
        assert result.exit_code == 1
        assert "enter a date as YYYY-MM-DD, between 2000-01-01 and 2100-12-31" in result.output
        assert "seq,occurred_at" not in result.output
    with app.app_context():
        assert audit_query.count(db.session, AuditFilter(action="audit.export")) == 0


def bulk_events(session: Session, n: int, actors: list[User], patients: list[User]) -> None:
    """Append ``n`` chained events in bulk (as the benchmark does), continuing from the head."""
    head = session.get(AuditHead, 1)
    assert head is not None
    seq, prev, now, rows = head.seq, head.hash, utcnow(), []
    for i in range(n):
        seq += 1
        fields = {
            "seq": seq,
            "occurred_at": now,
            "actor_id": actors[i % len(actors)].id,
            "actor_role": "staff",
            "action": "message.view",
            "target_type": "message",
            "target_id": f"{i:032x}",
            "patient_id": patients[i % len(patients)].id,
            "message_id": None,
            "outcome": "success",
            "client_ip": "198.51.100.20",
            "user_agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0",
            "request_id": f"{i:016x}",
            "details": '{"bytes":1024}',
            "prev_hash": prev,
        }
        prev = audit._hash_fields(*fields.values())
        rows.append({**fields, "hash": prev})
    session.execute(insert(AuditEvent), rows)
    session.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=seq, hash=prev))
    session.commit()


def test_export_memory_stays_flat(app: Flask) -> None:
    with app.app_context():
        actors = [
            make_user(db.session, "staff", f"s{i}@example.org", f"Staff {i}", team=None)
            for i in range(3)
        ]
        patients = [
            make_user(
                db.session, "patient", f"p{i}@example.org", f"Patient {i}", dob=utcnow().date()
            )
            for i in range(3)
        ]
        bulk_events(db.session, 20_000, actors, patients)
        db.session.expunge_all()
        gc.collect()
        process = psutil.Process()
        start = peak = process.memory_info().rss
        rows = 0
        for n, chunk in enumerate(audit_export.export_csv(db.session, AuditFilter()), start=1):
            rows += chunk.count("\r\n")
            if n % 5 == 0:
                peak = max(peak, process.memory_info().rss)
        assert rows == 20_000 + 6 + 1  # events, user.create events, header
        assert audit.verify(db.session).ok
    assert (peak - start) / MIB < 20
