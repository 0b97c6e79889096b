"""Bounces: read delivery status notifications from a Maildir and record them on their notices.

The relay accepted the notice (the row is ``sent``); a DSN (RFC 3464, read by
notifier.dsn) that comes back later to the envelope sender, delivered into
the Maildir ``PORTAL_BOUNCE_MAILDIR``, says it never reached the patient. It
names the notice by the returned Message-ID, ``<notice-{public_id}@domain>``
(notifier.smtp.make_message_id).

- A hard bounce (Action: failed, Status 5.x.x) makes the notice ``bounced``
  with ``bounce:5.1.1`` and revokes its link (a copy of the notice lies in the
  bounce mailbox); staff see "check the patient's address".
- A delay report (Action: delayed: the relay is still trying) is audited and
  shown on the notice (``failure_reason`` ``delayed:4.4.1``, still ``sent``);
  nothing is resent and its link stays valid.
- A soft bounce (Action: failed with 4.x.x) counts as a failed
  attempt: the notice is queued again after the outbox's backoff with a fresh
  link (its own was erased when it was sent, and is revoked), until the
  outbox's retry window is spent; then it fails with ``bounce:4.x.x``. Invites
  and password resets fail at once instead (a new one is asked for: an
  invite's or reset's link is not reissued behind the person's back).
- Any other report (delivered, relayed), and any report for a notice that is
  no longer ``sent`` (already bounced, queued again, being sent), changes
  nothing.
- A report counts only when its returned Message-ID has our sender's domain
  (PORTAL_MAIL_FROM) and, when it names a Final-Recipient or
  Original-Recipient, one of them is the notice's recipient address (compared
  in memory): anything else is kept aside.

Each change is audited (``notice.bounced``: kind, attempts, the status code and
what came of it) in the same commit. A DSN file is claimed by renaming it from
``new/`` into ``cur/`` with empty Maildir flags (``name:2,``): rename is
atomic, so of any number of workers exactly one gets each file. Once its
outcome is committed the file gets flag S (handled), or F (kept aside for a
person: not a DSN, malformed, too large or too deeply nested to parse (checked on the
raw bytes, before parsing), or naming no notice of ours). A
claim a crashed worker left behind goes back to ``new/`` after CLAIM_LEASE;
recording is conditional on the notice still being ``sent`` (rowcount 1), so
a DSN read twice never changes its notice twice.

Logs name DSNs by Maildir key and notices by id. Nothing from a DSN's text
(addresses, diagnostic replies) is logged, stored or audited.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from email.utils import parseaddr
from enum import StrEnum
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from notifier import dsn, outbox
from portal import audit
from portal.audit import SYSTEM, Action, Outcome
from portal.config import Settings
from portal.crypto.errors import CryptoError
from portal.models import Message, Notification, Role, User
from portal.models.notifications import NoticeKind, NoticeStatus
from portal.services import messaging
from portal.services.errors import ServiceError

CLAIM_LEASE = timedelta(minutes=10)  # a claim older than this was left by a crashed worker
PASS_LIMIT = 200  # DSNs one worker pass reads at most, so a flood never holds up sending
PASS_BUDGET = 5.0  # seconds one worker pass spends on DSNs; the rest wait for the next pass
CLAIMED, HANDLED, KEPT_ASIDE = ":2,", ":2,S", ":2,F"  # Maildir info: no flag, Seen, Flagged
# Their links are not reissued behind the person's back: a new invite or reset is asked for.
NO_RETRY_KINDS = frozenset({NoticeKind.INVITE, NoticeKind.RESET})
PICKUP_KINDS = frozenset({NoticeKind.PICKUP, NoticeKind.REMINDER})
SENT = NoticeStatus.SENT.value
_SAFE_KEY = re.compile(r"[^A-Za-z0-9._,=-]")
_DELIVERY_TIME = re.compile(r"(\d{1,12})\.(?:M(\d{1,9}))?")

log = logging.getLogger(__name__)
_warned: set[str] = set()  # misconfiguration messages already logged by this process


class BounceMaildirError(Exception):
    """PORTAL_BOUNCE_MAILDIR is unset or names no Maildir this process can use; the message
    names the setting."""


class Result(StrEnum):
    """What handling one DSN came to; each names a :class:`BounceStats` counter."""

    BOUNCED = "bounced"  # hard bounce: the notice is bounced
    RETRYING = "retrying"  # soft bounce: queued again with a fresh link
    FAILED = "failed"  # soft bounce with no retry left: the notice is failed
    DELAYED = "delayed"  # the relay is still trying: audited, nothing resent or revoked
    IGNORED = "ignored"  # nothing to change (a success report, a notice no longer sent)
    KEPT_ASIDE = "kept_aside"  # not a DSN, unreadable, or no notice of ours: for a person


@dataclass
class BounceStats:
    """What one pass over the bounce Maildir did."""

    bounced: int = 0
    retrying: int = 0
    failed: int = 0
    delayed: int = 0
    ignored: int = 0
    kept_aside: int = 0

    @property
    def total(self) -> int:
        """DSN files handled (whatever came of them)."""
        return sum(getattr(self, f.name) for f in fields(self))

    def add(self, result: Result) -> None:
        """Count one DSN's result."""
        setattr(self, result.value, getattr(self, result.value) + 1)

    def summary(self) -> str:
        """``bounced 1, retrying 0, ...``: counts only, for logs and the CLI."""
        return ", ".join(
            f"{f.name.replace('_', ' ')} {getattr(self, f.name)}" for f in fields(self)
        )


def collect(session: Session, settings: Settings, now: datetime) -> BounceStats | None:
    """The worker's call, once a pass: :func:`process` up to PASS_LIMIT DSNs, for at most
    PASS_BUDGET seconds, when PORTAL_BOUNCE_MAILDIR is set; None when it is not, or the
    pass failed.

    Never raises an Exception: a misconfigured Maildir is logged once (naming the
    setting), any other error logged and rolled back, and sending goes on.
    """
    if not settings.bounce_maildir:
        return None
    try:
        stats = process(session, settings, now, limit=PASS_LIMIT, budget=PASS_BUDGET)
    except BounceMaildirError as err:
        if str(err) not in _warned:
            _warned.add(str(err))
            log.error("bounces not read: %s", err)
        return None
    except DBAPIError as err:  # its text would quote the statement's parameters: the type only
        _rollback(session)
        log.error("bounce pass stopped by a database error (%s)", type(err.orig).__name__)
        return None
    except Exception:
        _rollback(session)
        log.exception("bounce pass failed; notices are still sent")
        return None
    _warned.clear()
    if stats.total:
        log.info("bounce pass: %s", stats.summary())
    return stats


def _rollback(session: Session) -> None:
    """Leave the session usable for the pass's sending; a dead connection must not raise."""
    with contextlib.suppress(Exception):
        session.rollback()


def process(
    session: Session,
    settings: Settings,
    now: datetime,
    *,
    limit: int | None = None,
    budget: float | None = None,
) -> BounceStats:
    """Handle each DSN waiting in PORTAL_BOUNCE_MAILDIR once (at most ``limit``); return counts.

    With a ``budget`` (seconds), no new DSN is started once it is spent (at
    least one always is): the rest stay in new/ for the next pass, so sending
    is never held up for long. Each DSN is its own commit. Raises
    BounceMaildirError when the setting names no usable Maildir; a database
    error (DBAPIError) puts the DSN being handled back and ends the pass.
    """
    root = maildir(settings)
    stats = BounceStats()
    _recover(root, now)
    started = time.monotonic()
    for n, name in enumerate(_waiting(root)[:limit]):
        if n and budget is not None and time.monotonic() - started >= budget:
            log.info("bounce pass: time budget spent; the rest wait for the next pass")
            break
        _handle(session, root, name, now, stats, settings)
    return stats


def maildir(settings: Settings) -> Path:
    """The bounce Maildir; BounceMaildirError when unset or without usable new/ and cur/."""
    if not settings.bounce_maildir:
        raise BounceMaildirError("PORTAL_BOUNCE_MAILDIR: not set")
    root = Path(settings.bounce_maildir).expanduser()
    for sub in ("new", "cur"):
        if not (root / sub).is_dir() or not os.access(root / sub, os.R_OK | os.W_OK | os.X_OK):
            raise BounceMaildirError(
                f"PORTAL_BOUNCE_MAILDIR: {root} is not a Maildir this process can read and "
                "write (it needs new/ and cur/)"
            )
    return root


# -- the Maildir --------------------------------------------------------------------------


def _waiting(root: Path) -> list[str]:
    """Names in new/, oldest first (Maildir names start with the delivery time)."""
    with os.scandir(root / "new") as entries:
        names = [e.name for e in entries if not e.name.startswith(".") and e.is_file()]
    return sorted(names, key=_delivered_at)


def _delivered_at(name: str) -> tuple[int, int, str]:
    """A sort key for a Maildir name ``seconds.M<microseconds>P<pid>...``: the microseconds
    are not zero-padded, so the names alone do not sort by time within a second."""
    match = _DELIVERY_TIME.match(name)
    if match is None:
        return (0, 0, name)
    return (int(match.group(1)), int(match.group(2) or 0), name)


def _base(name: str) -> str:
    """The unique part of a Maildir name, without its ``:2,flags`` info."""
    return name.split(":", 1)[0]


def _key(name: str) -> str:
    """The Maildir key as logs show it: only the characters a Maildir name is made of."""
    return _SAFE_KEY.sub("_", _base(name))[:80]


def _move(source: Path, target: Path) -> bool:
    """Rename atomically; False when ``source`` is gone (another worker moved it first)."""
    try:
        os.rename(source, target)
    except FileNotFoundError:
        return False
    return True


def _recover(root: Path, now: datetime) -> None:
    """Put claims older than CLAIM_LEASE (a worker died holding them) back into new/.

    A rename sets the file's ctime, so ctime is when it was claimed.
    """
    with os.scandir(root / "cur") as entries:
        stale = [
            e.name
            for e in entries
            if e.name.endswith(CLAIMED)
            and datetime.fromtimestamp(e.stat().st_ctime, UTC) < now - CLAIM_LEASE
        ]
    for name in stale:
        if _move(root / "cur" / name, root / "new" / _base(name)):
            log.warning("bounce %s: claim of a stopped worker released", _key(name))


# -- one DSN ------------------------------------------------------------------------------


def _sender_domain(settings: Settings) -> str:
    """The domain of PORTAL_MAIL_FROM, which our Message-IDs carry (worker.sender_domain)."""
    return parseaddr(settings.mail_from)[1].rpartition("@")[2] or "localhost"


def _handle(
    session: Session, root: Path, name: str, now: datetime, stats: BounceStats, settings: Settings
) -> None:
    """Claim one DSN, record it, then flag it handled or kept aside."""
    claimed = root / "cur" / (_base(name) + CLAIMED)
    if not _move(root / "new" / name, claimed):
        return  # another worker claimed it
    key = _key(name)
    try:
        result = _record(session, claimed, key, now, _sender_domain(settings))
    except DBAPIError:
        _move(claimed, root / "new" / _base(name))  # the database's fault: read it again later
        raise
    except Exception:
        log.exception("bounce %s could not be recorded; kept aside", key)
        result = Result.KEPT_ASIDE
    flags = KEPT_ASIDE if result is Result.KEPT_ASIDE else HANDLED
    _move(claimed, root / "cur" / (_base(name) + flags))
    stats.add(result)


def _record(session: Session, path: Path, key: str, now: datetime, domain: str) -> Result:
    with path.open("rb") as handle:
        raw = handle.read(dsn.MAX_BYTES + 1)
    try:
        report = dsn.parse(raw, domain)
    except dsn.DsnError as err:
        log.warning("bounce %s kept aside: %s", key, err.reason)
        return Result.KEPT_ASIDE
    if report.notice_id is None:
        log.warning("bounce %s kept aside: it returns no Message-ID of a notice", key)
        return Result.KEPT_ASIDE
    with _job(session):
        return _apply(session, report, key, now)


@contextmanager
def _job(session: Session) -> Iterator[None]:
    """One DSN's commit: worker.job's boundary (the worker imports this module, so it is
    restated here rather than imported): commit at the end, roll back and re-raise on error."""
    try:
        yield
        session.commit()
    except BaseException:
        session.rollback()
        raise


def _apply(session: Session, report: dsn.Report, key: str, now: datetime) -> Result:
    """Record ``report`` on its notice (flushed); the notice must still be ``sent``."""
    assert report.notice_id is not None  # _record keeps such reports aside
    taken = _take(session, report.notice_id) if report.severity is not dsn.Severity.NONE else None
    if taken is None:
        found = session.scalar(
            select(Notification.id).where(Notification.public_id == report.notice_id)
        )
        if found is None:
            log.warning("bounce %s kept aside: no such notice", key)
            return Result.KEPT_ASIDE
        log.info("bounce %s: notice %d unchanged (%s)", key, found, report.status)
        return Result.IGNORED
    row = session.get(Notification, taken, populate_existing=True)
    assert row is not None  # _take just matched it
    if not _for_recipient(session, row, report):
        log.warning("bounce %s kept aside: its recipient is not the notice's", key)
        return Result.KEPT_ASIDE
    if report.severity is dsn.Severity.DELAYED:
        return _delayed(session, row, report, key)
    row.failure_reason = f"bounce:{report.status}"
    hard = report.severity is dsn.Severity.HARD
    result = _bounced(session, row, now) if hard else _retry(session, row, now)
    _audit(session, row, report.status, result)
    session.flush()
    log.info(
        "bounce %s: notice %d %s (%s)",
        key,
        row.id,
        result,
        report.status,
        extra={"notice_id": row.id},
    )
    return result


def _for_recipient(session: Session, row: Notification, report: dsn.Report) -> bool:
    """Whether the report may concern the notice: it names no recipient, or the notice's
    recipient address is among those it names (in memory only; never logged)."""
    if not report.recipients:
        return True
    user = session.get(User, row.recipient_id)
    return user is not None and user.email.strip().lower() in report.recipients


def _delayed(session: Session, row: Notification, report: dsn.Report, key: str) -> Result:
    """The relay is still trying: audit it and show it on the notice, which stays ``sent``
    with its link (nothing is resent: the relay may yet deliver it)."""
    row.failure_reason = f"delayed:{report.status}"
    _audit(session, row, report.status, Result.DELAYED)
    session.flush()
    log.info("bounce %s: notice %d delayed (%s)", key, row.id, report.status)
    return Result.DELAYED


def _take(session: Session, public_id: str) -> int | None:
    """Lock the notice if it is still ``sent`` and return its id; None otherwise.

    A conditional UPDATE, and the job's first statement: it takes the lock
    (PostgreSQL's row lock, SQLite's write lock) before reading anything, and
    holds it until the commit, so a second DSN for the same notice waits, then
    finds it no longer ``sent``.
    """
    found = session.scalars(
        update(Notification)
        .where(Notification.public_id == public_id, Notification.status == SENT)
        .values(status=Notification.status)
        .returning(Notification.id)
        .execution_options(synchronize_session=False)
    ).all()
    return found[0] if len(found) == 1 else None


def _bounced(session: Session, row: Notification, now: datetime) -> Result:
    """The address does not work: bounced, and its link revoked (a copy of the notice,
    link included, lies in the bounce mailbox)."""
    row.status = NoticeStatus.BOUNCED.value
    row.payload_sealed = None
    messaging.revoke_notice_link(session, row, now)
    return Result.BOUNCED


def _retry(session: Session, row: Notification, now: datetime) -> Result:
    """Queue the notice again after the outbox's backoff for its attempts so far (the send
    counted one), with a fresh link; fail it when the window is spent or no link can be had."""
    if outbox.total_backoff(row.attempts) > outbox.RETRY_WINDOW or not _fresh_link(
        session, row, now
    ):
        row.status = NoticeStatus.FAILED.value
        row.payload_sealed = None
        messaging.revoke_notice_link(session, row, now)
        return Result.FAILED
    attempts = max(row.attempts, 1)
    row.status = NoticeStatus.QUEUED.value
    row.next_attempt_at = now + outbox.total_backoff(attempts) - outbox.total_backoff(attempts - 1)
    row.claimed_by = row.claimed_at = None
    row.sent_at = None
    return Result.RETRYING


def _fresh_link(session: Session, row: Notification, now: datetime) -> bool:
    """Give the notice what its next attempt needs; False when it cannot be sent again."""
    if row.kind in NO_RETRY_KINDS:
        return False
    if row.kind not in PICKUP_KINDS:
        return True  # it points at the portal's front page: there is no link of its own
    message = session.get(Message, row.message_id) if row.message_id else None
    if message is None:
        return False
    try:
        messaging.relink(session, row, message, now)
    except (ServiceError, CryptoError):  # revoked, expired or destroyed; a shredded key
        return False
    return True


def _audit(session: Session, row: Notification, status: str, result: Result) -> None:
    audit.record(
        session,
        Action.NOTICE_BOUNCED,
        actor=SYSTEM,
        outcome=Outcome.FAILURE,
        target_type="notification",
        target_id=row.public_id,
        patient_id=_patient_id(session, row),
        message_id=row.message_id,
        details={
            "kind": row.kind,
            "attempts": row.attempts,
            "status": status,
            "result": result.value,
        },
    )


def _patient_id(session: Session, row: Notification) -> int | None:
    """The patient the notice concerns: its recipient, or for a notice to staff the
    patient who wrote the message (as the outbox's audit events name them)."""
    recipient = session.get(User, row.recipient_id)
    if recipient is not None and recipient.role == Role.PATIENT:
        return recipient.id
    message = session.get(Message, row.message_id) if row.message_id else None
    return message.sender_id if message is not None else None
