"""Malware scanning of uploads as the settings ask for it, and the audit event of each verdict.

``PORTAL_SCAN_UPLOADS=required`` scans every upload with the clamd at
``PORTAL_CLAMD_SOCKET`` and refuses any file not found clean (portal.security.scan
fails closed); ``off`` scans nothing and records the verdict ``not-scanned``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from portal.audit import NO_REQUEST, Action, Actor, Outcome, RequestMeta, record
from portal.config import Settings
from portal.models import Attachment, AuditEvent, Role
from portal.security.inspection import Inspector, UploadRejected
from portal.security.scan import (
    ClamdAddress,
    NotScanning,
    Scanner,
    ScanRefused,
    ScanResult,
    ScanStream,
    Timeouts,
    Verdict,
)
from portal.services.uploads import InspectorFactory, StagedUpload, Staging, UploadView

log = logging.getLogger(__name__)
_OUTCOMES = {
    Verdict.CLEAN: Outcome.SUCCESS,
    Verdict.NOT_SCANNED: Outcome.SUCCESS,
    Verdict.INFECTED: Outcome.DENIED,
    Verdict.UNSCANNABLE: Outcome.DENIED,
    Verdict.UNAVAILABLE: Outcome.FAILURE,
}


def scanner_for(settings: Settings, timeouts: Timeouts | None = None) -> Scanner | None:
    """Return the clamd :class:`Scanner` the settings configure, or None when scanning is off.

    The scanner refuses streams longer than ``settings.max_upload`` itself.
    """
    if settings.scan_uploads == "off" or not settings.clamd_socket:
        return None
    address = ClamdAddress.parse(settings.clamd_socket)
    return Scanner(address, timeouts=timeouts, max_bytes=settings.max_upload)


def open_scan(settings: Settings, timeouts: Timeouts | None = None) -> ScanStream | NotScanning:
    """Start the scan of one upload: the inspector to feed its plaintext to, then finish.

    Returns a :class:`NotScanning` inspector when scanning is off. Raises
    ScanRefused (verdict UNAVAILABLE) when clamd cannot be reached, before a byte
    of the upload is read; ``feed`` and ``finish`` raise ScanRefused for every
    verdict but CLEAN (the refusal's ``result`` is what :func:`record_scan` audits).
    """
    scanner = scanner_for(settings, timeouts)
    return NotScanning() if scanner is None else scanner.open()


def scanned(settings: Settings, content: Sequence[InspectorFactory]) -> list[InspectorFactory]:
    """Return the inspectors of an upload policy: the malware scan first, then ``content``.

    Each content check's refusal is held until the file ends, so the scanner sees every
    byte and an infected file is refused (and audited) as infected even when it is not
    the kind of file the policy takes (EICAR after a JPEG): the scan's verdict comes
    first, the content's second. With scanning off the "scan" is :class:`NotScanning`,
    whose verdict ``not-scanned`` is audited like any other: the trail says which files
    were never scanned (issue 14: every upload's verdict is audited).
    """

    def scan(view: UploadView) -> Inspector[object]:
        return open_scan(settings)

    return [scan, *(_held(make) for make in content)]


def warn_if_unscanned(settings: Settings) -> bool:
    """Log one WARNING when uploads are not scanned (``PORTAL_SCAN_UPLOADS=off``, the default
    without ``PORTAL_CLAMD_SOCKET``); return True when it did. For a serving process's start."""
    if settings.scan_uploads != "off":
        return False
    log.warning(
        "uploads are not scanned for malware: PORTAL_SCAN_UPLOADS=off "
        "(set PORTAL_CLAMD_SOCKET to scan every upload with clamd)",
        extra={"event": "upload_scanning_off"},
    )
    return True


def _held(make: InspectorFactory) -> InspectorFactory:
    return lambda view: AfterScan(make(view))


class AfterScan:
    """A content inspector that speaks after the scan: a refusal from its ``feed`` is held
    (the file keeps streaming to the scanner) and raised by ``finish``."""

    def __init__(self, inner: Inspector[object]) -> None:
        self._inner = inner
        self._held: UploadRejected | None = None

    def feed(self, chunk: bytes | memoryview) -> None:
        """Feed ``chunk`` to the content check, unless it has already refused the file."""
        if self._held is None:
            try:
                self._inner.feed(chunk)
            except UploadRejected as refused:
                self._held = refused

    def finish(self) -> object:
        """Raise the held refusal, if any; else the content check's own ``finish``."""
        if self._held is not None:
            raise self._held
        return self._inner.finish()

    def close(self) -> None:
        """Release the content check."""
        self._inner.close()


def record_scan(
    session: Session,
    result: ScanResult,
    *,
    actor: Actor,
    meta: RequestMeta = NO_REQUEST,
    target_type: str = "attachment",
    target_id: str | None = None,
    message_id: int | None = None,
    patient_id: int | None = None,
) -> AuditEvent:
    """Append the ``upload.scanned`` event for ``result`` in ``session`` (flushed) and return it.

    Details are PHI-free: the verdict, the size in bytes, the signature name when
    clamd found one, the reason a scan did not complete. Outcome: success (clean,
    not scanned), denied (infected, unscannable) or failure (scanner unavailable).
    For a refused upload the caller still commits this event while discarding the
    upload. Raises AuditDetailError only on a programming error.
    """
    details: dict[str, object] = {"verdict": result.verdict.value, "size": result.size}
    if result.signature:
        details["signature"] = result.signature
    if result.reason:
        details["reason"] = result.reason
    return record(
        session,
        Action.UPLOAD_SCANNED,
        actor=actor,
        meta=meta,
        outcome=_OUTCOMES[result.verdict],
        target_type=target_type,
        target_id=target_id,
        message_id=message_id,
        patient_id=patient_id,
        details=details,
    )


def scan_result_of(upload: StagedUpload) -> ScanResult | None:
    """Return the scan verdict of ``upload``: its scan's finding, or the refusal's; None
    when it was not scanned (scanning off, or the file ended before a scan began)."""
    if isinstance(upload.rejection, ScanRefused):
        return upload.rejection.result
    return next((f for f in upload.findings if isinstance(f, ScanResult)), None)


def record_staging(
    session: Session, staging: Staging, *, actor: Actor, meta: RequestMeta = NO_REQUEST
) -> list[AuditEvent]:
    """Append an ``upload.scanned`` event for every scanned file of ``staging`` (flushed).

    Kept, refused and dropped files alike: a refused file's event is the record that
    malware was turned away, so the caller commits it even though the upload is not
    stored. The target is the file's attachment public id; a kept file's event names
    its message, and the patient (the uploader, or the message's recipient).
    Returns the events, in file order.
    """
    events: list[AuditEvent] = []
    for upload in staging.uploads:
        result = scan_result_of(upload)
        if result is None:
            continue
        attachment = (
            session.scalar(select(Attachment).where(Attachment.public_id == upload.object_id))
            if upload.blob_id is not None
            else None
        )
        patient_id = actor.id if actor.role == Role.PATIENT else None
        if attachment is not None and patient_id is None:
            patient_id = attachment.message.recipient_id
        events.append(
            record_scan(
                session,
                result,
                actor=actor,
                meta=meta,
                target_id=upload.object_id,
                message_id=attachment.message_id if attachment is not None else None,
                patient_id=patient_id,
            )
        )
    return events
