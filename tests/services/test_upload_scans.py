"""Scanning as the settings ask (required or off) and the ``upload.scanned`` audit event."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import select

from portal import audit
from portal.audit import Action, Outcome, actor_of
from portal.config import ConfigError, settings_of
from portal.extensions import db
from portal.models import AuditEvent
from portal.security.scan import NotScanning, ScanRefused, ScanResult, ScanStream, Verdict
from portal.services import upload_scans
from tests.factories import make_user
from tests.support import samples
from tests.support.clamd import EICAR, SIGNATURE, Clamd

SCANNED = {
    "clean": (ScanResult(Verdict.CLEAN, 1234), Outcome.SUCCESS),
    "not-scanned": (ScanResult(Verdict.NOT_SCANNED, 1234), Outcome.SUCCESS),
    "infected": (
        ScanResult(Verdict.INFECTED, 68, "Eicar-Test-Signature.UNOFFICIAL"),
        Outcome.DENIED,
    ),
    "unscannable": (
        ScanResult(
            Verdict.UNSCANNABLE, 99, "Heuristics.Limits.Exceeded.MaxRecursion", "scanner-limits"
        ),
        Outcome.DENIED,
    ),
    "unavailable": (ScanResult(Verdict.UNAVAILABLE, 0, reason="connect"), Outcome.FAILURE),
}


def test_scanning_is_off_without_clamd_and_required_with_it(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    plain = settings_of(make_app())
    assert (plain.scan_uploads, plain.clamd_socket) == ("off", None)
    assert upload_scans.scanner_for(plain) is None
    socket_path = str(tmp_path / "clamd.sock")
    configured = settings_of(make_app(CLAMD_SOCKET=socket_path))
    assert (configured.scan_uploads, configured.clamd_socket) == ("required", socket_path)
    told_off = settings_of(make_app(CLAMD_SOCKET=socket_path, SCAN_UPLOADS="off"))
    assert upload_scans.scanner_for(told_off) is None


def test_required_without_a_socket_stops_start_up(make_app: Callable[..., Flask]) -> None:
    with pytest.raises(ConfigError, match=r"^PORTAL_SCAN_UPLOADS: required needs PORTAL_CLAMD"):
        make_app(SCAN_UPLOADS="required")


def test_off_scans_nothing_and_accepts(make_app: Callable[..., Flask]) -> None:
    inspector = upload_scans.open_scan(settings_of(make_app(SCAN_UPLOADS="off")))
    assert isinstance(inspector, NotScanning)
    inspector.feed(EICAR)
    assert inspector.finish() == ScanResult(Verdict.NOT_SCANNED, len(EICAR))


def test_required_refuses_every_upload_while_clamd_is_down(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    settings = settings_of(make_app(CLAMD_SOCKET=str(tmp_path / "clamd.sock")))
    with pytest.raises(ScanRefused) as refused:
        upload_scans.open_scan(settings)
    assert refused.value.result.verdict is Verdict.UNAVAILABLE
    assert refused.value.message.endswith("please try again later.")


@pytest.mark.parametrize("address", ["socket", "tcp"])
def test_required_scans_with_the_configured_clamd(
    make_app: Callable[..., Flask], clamd: Clamd, address: str
) -> None:
    where = str(clamd.socket_path) if address == "socket" else clamd.tcp_address
    settings = settings_of(make_app(CLAMD_SOCKET=where))
    stream = upload_scans.open_scan(settings)
    assert isinstance(stream, ScanStream)
    stream.feed(samples.pdf())
    assert stream.finish().verdict is Verdict.CLEAN
    infected = upload_scans.open_scan(settings)
    infected.feed(samples.pdf(attachment=EICAR))
    with pytest.raises(ScanRefused) as refused:
        infected.finish()
    assert (refused.value.result.signature or "").startswith(SIGNATURE)


def test_the_scanner_refuses_more_than_the_portals_largest_upload(
    make_app: Callable[..., Flask], clamd: Clamd
) -> None:
    settings = settings_of(make_app(CLAMD_SOCKET=str(clamd.socket_path), MAX_UPLOAD=1000))
    stream = upload_scans.open_scan(settings)
    stream.feed(bytes(1000))
    with pytest.raises(ScanRefused) as refused:
        stream.feed(b"x")
    assert refused.value.result.reason == "size-limit"


@pytest.mark.parametrize("name", sorted(SCANNED))
def test_each_verdict_is_audited_without_phi(app: Flask, name: str) -> None:
    result, outcome = SCANNED[name]
    with app.app_context():
        staff = make_user(db.session, "staff")
        upload_scans.record_scan(
            db.session, result, actor=actor_of(staff), target_type="attachment", target_id="att-1"
        )
        db.session.commit()
        event = db.session.scalars(
            select(AuditEvent).where(AuditEvent.action == Action.UPLOAD_SCANNED.value)
        ).one()
        assert (event.outcome, event.actor_id, event.target_id) == (outcome, staff.id, "att-1")
        details = json.loads(event.details)
        assert details["verdict"] == result.verdict.value
        assert details["size"] == result.size
        assert details.get("signature") == result.signature
        assert details.get("reason") == result.reason
        assert set(details) <= {"verdict", "size", "signature", "reason"}
        assert audit.verify(db.session).ok


def test_a_refused_eicar_upload_is_audited_with_its_signature(app: Flask, clamd: Clamd) -> None:
    result = clamd.scanner().scan([samples.jpeg(), EICAR])
    with app.app_context():
        staff = make_user(db.session, "staff")
        upload_scans.record_scan(db.session, result, actor=actor_of(staff))
        db.session.commit()
        event = db.session.scalars(
            select(AuditEvent).where(AuditEvent.action == Action.UPLOAD_SCANNED.value)
        ).one()
        assert event.outcome == Outcome.DENIED
        assert json.loads(event.details)["signature"].startswith(SIGNATURE)
