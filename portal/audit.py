"""The audit trail: append events in the caller's transaction, and verify the hash chain.

Each event stores the hash of the one before it and its own SHA-256 over a
canonical JSON encoding of every field, so an edited, deleted or reordered row
breaks the chain. Appends lock the single ``audit_head`` row first (an UPDATE,
which PostgreSQL row-locks and SQLite serialises with its write lock), so
concurrent writers queue: no forks, no gaps in ``seq``.

The lock is held until the transaction ends, so every writer waits for the one
before it to commit. A session that records many events per transaction (the
notifier) can call :func:`chain_at_commit`: its events are then chained when it
commits, all of them under one short hold of the lock (one head update, one
batched insert), instead of the first one taking the lock for the rest of the
transaction.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, cast

from sqlalchemy import Connection, Engine, Pool, bindparam, func, insert, select, update
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session, SessionTransaction

from portal.audit_group import APPENDER
from portal.database import utcnow
from portal.models import AuditEvent, AuditHead, User

if TYPE_CHECKING:
    from sqlalchemy import Table

GENESIS_HASH = "0" * 64
MAX_DETAIL_TEXT = 200
_DETAIL_KEY = re.compile(r"[a-z][a-z0-9_]{0,39}")


class Action(StrEnum):
    """The fixed vocabulary of audited actions (``area.subject.verb``)."""

    AUTH_SIGNIN = "auth.signin"
    AUTH_SIGNIN_FAILED = "auth.signin.failed"
    AUTH_PASSWORD_OK = "auth.password.ok"
    AUTH_CODE_REPLAY = "auth.code.replay"
    AUTH_LOCKOUT = "auth.lockout"
    AUTH_SIGNOUT = "auth.signout"
    AUTH_REAUTH = "auth.reauth"
    AUTH_MFA_ENROL = "auth.mfa.enrol"
    AUTH_MFA_CHANGE_START = "auth.mfa.change.start"
    AUTH_MFA_CHANGE = "auth.mfa.change"
    AUTH_RECOVERY_USED = "auth.recovery.used"
    AUTH_RECOVERY_REGENERATED = "auth.recovery.regenerated"
    AUTH_IDENTITY_VERIFY = "auth.identity.verify"
    AUTH_PASSWORD_SET = "auth.password.set"
    AUTH_PASSWORD_CHANGE = "auth.password.change"
    AUTH_RESET_REQUEST = "auth.reset.request"
    AUTH_RESET = "auth.reset"
    AUTH_INVITE_ACCEPT = "auth.invite.accept"
    USER_CREATE = "user.create"
    USER_DISABLE = "user.disable"
    USER_ENABLE = "user.enable"
    USER_MFA_RESET = "user.mfa.reset"
    USER_UNLOCK = "user.unlock"
    TEAM_CREATED = "team.created"
    TEAM_UPDATED = "team.updated"  # renamed, described, opened to or closed to patients
    TEAM_ARCHIVED = "team.archived"
    TEAM_MEMBER_ADDED = "team.member.added"
    TEAM_MEMBER_REMOVED = "team.member.removed"
    MESSAGE_SEND = "message.send"
    MESSAGE_LIST = "message.list"
    MESSAGE_VIEW = "message.view"
    MESSAGE_PDF = "message.pdf"
    MESSAGE_REPLY = "message.reply"
    MESSAGE_REVOKE = "message.revoke"
    MESSAGE_RESEND = "message.resend"
    MESSAGE_SHRED = "message.shred"
    MESSAGE_COVER = "message.cover"
    CONVERSATION_START = "conversation.start"  # a patient wrote first, to a care team
    CONVERSATION_READ = "conversation.read"  # staff opened a conversation's thread
    REPLY_READ = "reply.read"  # staff were shown one patient message of a thread
    CONVERSATION_ASSIGN = "conversation.assign"
    CONVERSATION_DONE = "conversation.done"
    CONVERSATION_REOPEN = "conversation.reopen"
    PATIENT_LOOKUP = "patient.lookup"
    PATIENT_VIEW = "patient.view"
    PATIENT_HISTORY_VIEW = "patient.history.view"
    ATTACHMENT_DOWNLOAD = "attachment.download"
    ATTACHMENT_VIEW = "attachment.view"
    UPLOAD_SCANNED = "upload.scanned"
    LINK_OPEN = "link.open"
    LINK_REISSUE = "link.reissue"
    ACCESS_DENIED = "access.denied"
    CONTENT_TAMPERED = "content.tampered"
    NOTICE_SENT = "notice.sent"
    NOTICE_FAILED = "notice.failed"
    NOTICE_BOUNCED = "notice.bounced"
    KEY_ROTATE = "key.rotate"
    KEY_REWRAP_FAILED = "key.rewrap.failed"
    AUDIT_SEARCH = "audit.search"
    AUDIT_EXPORT = "audit.export"
    AUDIT_REPORT = "audit.report"
    AUDIT_VERIFY = "audit.verify"
    RETENTION_RUN = "retention.run"
    BACKUP_CREATE = "backup.create"
    BACKUP_RESTORE = "backup.restore"


class Outcome(StrEnum):
    """How an audited action ended."""

    SUCCESS = "success"
    FAILURE = "failure"
    DENIED = "denied"


@dataclass(frozen=True)
class Actor:
    """Who acts: a user id and role, or the system (id None)."""

    id: int | None
    role: str


SYSTEM = Actor(None, "system")


def actor_of(user: User) -> Actor:
    """Return the audit actor for ``user`` (the one place a user becomes an Actor)."""
    return Actor(user.id, user.role)


@dataclass(frozen=True)
class RequestMeta:
    """Where a request came from; the CLI and workers pass :data:`NO_REQUEST`."""

    client_ip: str | None = None
    user_agent: str | None = None
    request_id: str | None = None


NO_REQUEST = RequestMeta()


class AuditDetailError(ValueError):
    """Details must be short scalars under snake_case keys: no room for free-text PHI."""


def _check_details(details: Mapping[str, object]) -> str:
    for key, value in details.items():
        if not _DETAIL_KEY.fullmatch(key):
            raise AuditDetailError(f"audit detail key {key!r} is not snake_case")
        if isinstance(value, str) and len(value) > MAX_DETAIL_TEXT:
            raise AuditDetailError(f"audit detail {key!r} is longer than {MAX_DETAIL_TEXT}")
        if value is not None and not isinstance(value, str | int | bool | float):
            raise AuditDetailError(f"audit detail {key!r} must be a scalar")
    return _canonical(dict(details))


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _timestamp(moment: datetime) -> str:
    # Same text as strftime("%Y-%m-%dT%H:%M:%S.%fZ") for years 1000-9999, several times faster.
    if moment.utcoffset():
        moment = moment.astimezone(UTC)
    return moment.isoformat(timespec="microseconds")[:26] + "Z"


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def event_hash(event: AuditEvent) -> str:
    """Return the SHA-256 (hex) of the event's canonical encoding, ``prev_hash`` included."""
    return _hash_fields(
        event.seq,
        event.occurred_at,
        event.actor_id,
        event.actor_role,
        event.action,
        event.target_type,
        event.target_id,
        event.patient_id,
        event.message_id,
        event.outcome,
        event.client_ip,
        event.user_agent,
        event.request_id,
        event.details,
        event.prev_hash,
    )


def _hash_fields(
    seq: object,
    occurred_at: object,
    actor_id: object,
    actor_role: object,
    action: object,
    target_type: object,
    target_id: object,
    patient_id: object,
    message_id: object,
    outcome: object,
    client_ip: object,
    user_agent: object,
    request_id: object,
    details: object,
    prev_hash: object,
) -> str:
    if isinstance(occurred_at, datetime):
        occurred_at = _timestamp(occurred_at)
    # Keys written in sorted order: the same bytes as _canonical() of this dict (the chain's
    # encoding), without sorting on every call; verify() runs this once per event.
    return hashlib.sha256(
        _ENCODER.encode(
            {
                "action": action,
                "actor_id": actor_id,
                "actor_role": actor_role,
                "client_ip": client_ip,
                "details": details,
                "message_id": message_id,
                "occurred_at": occurred_at,
                "outcome": outcome,
                "patient_id": patient_id,
                "prev_hash": prev_hash,
                "request_id": request_id,
                "seq": seq,
                "target_id": target_id,
                "target_type": target_type,
                "user_agent": user_agent,
            }
        ).encode()
    ).hexdigest()


def record(
    session: Session,
    action: Action,
    *,
    actor: Actor = SYSTEM,
    meta: RequestMeta = NO_REQUEST,
    outcome: Outcome = Outcome.SUCCESS,
    target_type: str | None = None,
    target_id: str | None = None,
    patient_id: int | None = None,
    message_id: int | None = None,
    details: Mapping[str, object] | None = None,
) -> AuditEvent:
    """Append an event in ``session``'s transaction (flushed, not committed) and return it
    (a copy of the row inserted, not attached to the session).

    The caller's commit makes the event and the change it records durable
    together. In a session given to :func:`chain_at_commit` the event is only
    staged: it gets its ``seq``, time and hashes, and is inserted, when the
    session commits (a rollback drops it); inside a savepoint it is appended at
    once, so that rolling the savepoint back takes it with it. Raises
    AuditDetailError for details that could carry free text.
    """
    event = _new_event(
        action, actor, meta, outcome, target_type, target_id, patient_id, message_id, details
    )
    pending: list[AuditEvent] | None = session.info.get(_PENDING)
    if pending is not None and not session.connection().in_nested_transaction():
        pending.append(event)
        return event
    _append(session, [event])
    session.flush()
    return event


def record_read(
    session: Session,
    action: Action,
    *,
    actor: Actor = SYSTEM,
    meta: RequestMeta = NO_REQUEST,
    patient_id: int | None = None,
    details: Mapping[str, object] | None = None,
) -> None:
    """Record that PHI was shown, for a request whose transaction changes nothing.

    With the app's group appender (``portal.audit_group``, in ``session.info``) the event
    is appended with other requests' in one short transaction of the appender's, and is
    committed when this returns. Without one (the CLI, an in-memory database), or when
    ``session`` has changes or its transaction has written or locked rows (the appender
    would wait for that transaction's locks), it is appended in ``session`` as
    :func:`record` does, and commits with it. Raises AuditDetailError as :func:`record`
    does, and the database's errors (the caller must then show nothing).
    """
    appender: _Appender | None = session.info.get(APPENDER)
    if appender is None or _has_changes(session) or _holds_locks(session):
        record(session, action, actor=actor, meta=meta, patient_id=patient_id, details=details)
        return
    appender.append(
        _new_event(action, actor, meta, Outcome.SUCCESS, None, None, patient_id, None, details)
    )


def _has_changes(session: Session) -> bool:
    return bool(session.new or session.dirty or session.deleted or session.info.get(_PENDING))


def _new_event(
    action: Action,
    actor: Actor,
    meta: RequestMeta,
    outcome: Outcome,
    target_type: str | None,
    target_id: str | None,
    patient_id: int | None,
    message_id: int | None,
    details: Mapping[str, object] | None,
) -> AuditEvent:
    return AuditEvent(
        actor_id=actor.id,
        actor_role=actor.role,
        action=Action(action).value,
        target_type=target_type,
        target_id=target_id,
        patient_id=patient_id,
        message_id=message_id,
        outcome=Outcome(outcome).value,
        client_ip=meta.client_ip,
        user_agent=(meta.user_agent or "")[:256] or None,
        request_id=meta.request_id,
        details=_check_details(details or {}),
    )


class _Appender(Protocol):
    def append(self, audit_event: AuditEvent) -> None: ...


# Connection.info key: whether the connection's transaction has written or taken row
# locks (then record_read must not wait for the group appender, which would wait for
# them). Set from the SQL itself as it is sent, whoever sends it (the ORM, Core, raw SQL
# text, a savepoint's statements), and cleared only when the transaction really ends:
# a savepoint's release or rollback leaves the outer transaction's locks in place.
_WROTE = "audit_wrote"
_READ = re.compile(r"\s*(?:SELECT|WITH)\b", re.IGNORECASE)
_WRITES_OR_LOCKS = re.compile(
    r"\b(?:INSERT|UPDATE|DELETE|MERGE|FOR\s+(?:NO\s+KEY\s+)?UPDATE|FOR\s+(?:KEY\s+)?SHARE)\b",
    re.IGNORECASE,
)


def _holds_locks(session: Session) -> bool:
    """Whether ``session``'s transaction may hold locks (module constant ``_WROTE``)."""
    return bool(session.connection().info.get(_WROTE))


@sa_event.listens_for(Engine, "before_cursor_execute")
def _note_write(
    conn: Connection, _cursor: object, statement: str, *_args: object, **_kwargs: object
) -> None:
    if not conn.info.get(_WROTE) and (
        not _READ.match(statement) or _WRITES_OR_LOCKS.search(statement)
    ):
        conn.info[_WROTE] = True  # a false alarm only costs the group commit


@sa_event.listens_for(Engine, "commit")
@sa_event.listens_for(Engine, "rollback")
def _transaction_ended(conn: Connection) -> None:
    conn.info.pop(_WROTE, None)


@sa_event.listens_for(Pool, "checkin")
def _returned(_dbapi_connection: object, record: Any) -> None:
    if record is not None:
        record.info.pop(_WROTE, None)  # the pool's reset rolled the transaction back


# The head's two statements, built once: Core statements on the table (not ORM-enabled
# UPDATEs, which build and synchronise per call), so an audited request pays for the round
# trips only (README "Inbox": the per-request cost). No ORM object of the head is ever
# loaded for writing, so there is nothing in a session to synchronise.
_HEAD_TABLE = cast("Table", AuditHead.__table__)  # a declarative model's table is a Table
_HEAD = _HEAD_TABLE.c
_TAKE_HEAD = (
    update(_HEAD_TABLE)
    .where(_HEAD.id == 1)
    .values(seq=_HEAD.seq + bindparam("count"))
    .returning(_HEAD.seq, _HEAD.hash)
)
_SET_HEAD_HASH = update(_HEAD_TABLE).where(_HEAD.id == 1).values(hash=bindparam("hash"))
# The events themselves, the same way: a Core INSERT of their columns, not the unit of work
# (an ORM flush of one new object costs more Python than the rest of the append). The
# events recorded are returned unattached to the session; nothing ever updates one.
_EVENT_TABLE = cast("Table", AuditEvent.__table__)
_EVENT_COLUMNS = tuple(c.key for c in _EVENT_TABLE.c if not c.primary_key)
_INSERT_EVENTS = insert(_EVENT_TABLE)


def append_events(connection: Connection, events: list[AuditEvent]) -> None:
    """Chain ``events`` after the head, in ``connection``'s transaction (the group
    appender's: ``portal.audit_group``), under one lock of the head row."""
    _append(connection, events)


def _append(session: Session | Connection, events: list[AuditEvent]) -> None:
    """Chain ``events`` after the head, in order, under one lock of the head row (flushed)."""
    last, prev_hash = session.execute(_TAKE_HEAD, {"count": len(events)}).one()
    now = utcnow()
    for seq, event in enumerate(events, start=last - len(events) + 1):
        event.seq, event.occurred_at, event.prev_hash = seq, now, prev_hash
        event.hash = prev_hash = event_hash(event)
    session.execute(
        _INSERT_EVENTS, [{name: getattr(e, name) for name in _EVENT_COLUMNS} for e in events]
    )
    session.execute(_SET_HEAD_HASH, {"hash": prev_hash})


# Session.info key: the events a chain_at_commit session has recorded and not yet chained.
_PENDING = "audit_events_pending"


def chain_at_commit(session: Session) -> None:
    """From now on, chain ``session``'s events when it commits instead of as recorded.

    Each commit then appends all its events under one short hold of the head lock
    (one head update, one batched insert), so concurrent writers wait for each
    other's commit only, not for each other's whole transaction. An event
    recorded this way is not in the database (nor its ``seq`` known) before the
    commit: for sessions whose transactions do not read their own new events
    back, such as the notifier's. Lasts for the session's life. Raises nothing.
    """
    session.info.setdefault(_PENDING, [])


@sa_event.listens_for(Session, "before_commit")
def _chain_pending(session: Session) -> None:
    pending: list[AuditEvent] | None = session.info.get(_PENDING)
    # before_commit fires for a savepoint's release too: the transaction's events are
    # chained when it commits, not inside a savepoint that may yet be rolled back.
    if pending and not session.in_nested_transaction():
        events = pending[:]
        pending.clear()
        _append(session, events)  # the commit flushes them with the rest


@sa_event.listens_for(Session, "after_soft_rollback")
def _drop_pending(session: Session, previous: SessionTransaction) -> None:
    pending: list[AuditEvent] | None = session.info.get(_PENDING)
    if pending and not previous.nested:  # a savepoint's own events were appended at once
        pending.clear()  # their changes are gone: so are the events that recorded them


@dataclass(frozen=True)
class Verification:
    """The outcome of walking the chain."""

    ok: bool
    count: int
    head_hash: str
    head_time: datetime | None
    bad_seq: int | None = None
    problem: str | None = None


VERIFY_COLUMNS = (
    AuditEvent.seq,
    AuditEvent.occurred_at,
    AuditEvent.actor_id,
    AuditEvent.actor_role,
    AuditEvent.action,
    AuditEvent.target_type,
    AuditEvent.target_id,
    AuditEvent.patient_id,
    AuditEvent.message_id,
    AuditEvent.outcome,
    AuditEvent.client_ip,
    AuditEvent.user_agent,
    AuditEvent.request_id,
    AuditEvent.details,
    AuditEvent.prev_hash,
    AuditEvent.hash,
)


def read_head(session: Session) -> tuple[int, str] | None:
    """Return the committed head (seq, hash), read now (never from the identity map), or None.

    Verification reads it first and walks only up to it: events that others
    append meanwhile are past the head read, so they cannot look like a gap.
    """
    row = session.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)).first()
    return (int(row[0]), str(row[1])) if row is not None else None


def _rows(
    session: Session, upto: int | None, batch: int = 5000
) -> Iterator[tuple[Any, ...]]:  # raw rows of VERIFY_COLUMNS
    connection = session.connection()
    stmt = select(*VERIFY_COLUMNS).order_by(AuditEvent.seq)
    if upto is not None:
        stmt = stmt.where(AuditEvent.seq <= upto)
    if connection.dialect.name == "postgresql":
        # A plain server-side cursor of the driver: SQLAlchemy's per-row processing costs
        # as much as the hash. timestamptz arrives timezone-aware; _timestamp makes it UTC.
        sql = str(
            stmt.compile(dialect=connection.dialect, compile_kwargs={"literal_binds": True})
        )  # an int, ours
        driver = connection.connection.driver_connection
        # mypy: the DBAPI connection is psycopg's here (PostgreSQL only path); SQLAlchemy types
        #   it Any | None.
        with driver.cursor(name="audit_verify", binary=True) as cursor:  # type: ignore[union-attr]
            cursor.itersize = batch
            cursor.execute(sql)
            yield from cursor
        return
    yield from connection.execute(stmt.execution_options(yield_per=batch, stream_results=True))


def verify(session: Session) -> Verification:
    """Walk the whole chain in ``seq`` order and return a :class:`Verification`.

    Finds an edited row (hash mismatch), a deleted row (gap in ``seq`` or a
    broken ``prev_hash``), a reordering (``prev_hash`` mismatch) and a trail
    cut short at its end (the head row counts further than the last event).
    The head is read before the walk, and the walk stops there, so events
    appended while it runs are left for the next verification.
    """
    head = read_head(session)
    if head is None:  # the migration creates the row; without it a cut end would pass
        return Verification(
            False,
            0,
            GENESIS_HASH,
            None,
            1,
            "the audit head row is missing (deleted outside the chain)",
        )
    expected_seq, prev, head_time = 1, GENESIS_HASH, None
    for row in _rows(session, head[0]):
        # The common case inlined (this loop runs once per event); _check_row explains.
        if row[0] != expected_seq or row[14] != prev or _hash_fields(*row[:15]) != row[15]:
            problem = _check_row(row, expected_seq, prev) or "unreadable event"
            return Verification(
                False, expected_seq - 1, str(prev), _utc(head_time), int(row[0]), problem
            )
        expected_seq, prev, head_time = expected_seq + 1, row[15], row[1]
    if head != (expected_seq - 1, prev):
        return Verification(
            False,
            expected_seq - 1,
            str(prev),
            _utc(head_time),
            expected_seq,
            "events are missing after the last one (the head counts further)",
        )
    if _past_head(session):
        return Verification(
            False,
            expected_seq - 1,
            str(prev),
            _utc(head_time),
            expected_seq,
            "events lie past the head (not appended through the chain)",
        )
    return Verification(True, expected_seq - 1, str(prev), _utc(head_time))


def _past_head(session: Session) -> bool:
    # The highest seq is read before the head: an append commits its event and its head
    # update together, so one committing in between cannot make an honest event look past it.
    last = session.scalar(select(func.max(AuditEvent.seq)))
    head = read_head(session)
    return last is not None and head is not None and int(last) > head[0]


def _utc(moment: object) -> datetime | None:
    return moment.astimezone(UTC) if isinstance(moment, datetime) else None


def _check_row(row: tuple[object, ...], expected_seq: int, prev: str) -> str | None:
    if row[0] != expected_seq:
        return f"expected event {expected_seq}, found {row[0]} (deleted or reordered)"
    if row[-2] != prev:
        return "does not follow the event before it (deleted, inserted or reordered)"
    if _hash_fields(*row[:-1]) != row[-1]:
        return "contents do not match the hash (edited)"
    return None


# -- parallel verification (PostgreSQL) ----------------------------------------------------

PARALLEL_MIN_EVENTS = 200_000  # below this, starting processes costs more than it saves


def _libpq_url(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


def _verify_range(job: tuple[str, int, int]) -> tuple[int, str | None, str | None, str | None]:
    """Check seq, links and hashes of events ``[first, stop)`` on a connection of its own.

    Returns (events checked, prev_hash of the first, hash of the last, problem or None).
    """
    import psycopg

    url, first, stop = job
    sql = str(
        select(*VERIFY_COLUMNS)
        .where(AuditEvent.seq >= first, AuditEvent.seq < stop)
        .order_by(AuditEvent.seq)
        .compile(compile_kwargs={"literal_binds": True})
    )
    count, first_prev, prev, expected = 0, None, None, first
    with psycopg.connect(url) as connection, connection.cursor(name="verify", binary=True) as cur:
        cur.itersize = 5000
        cur.execute(sql)
        for row in cur:
            if first_prev is None:
                first_prev = prev = row[14]
            if row[0] != expected or row[14] != prev or _hash_fields(*row[:15]) != row[15]:
                return count, first_prev, prev, _check_row(row, expected, str(prev))
            count, prev, expected = count + 1, row[15], expected + 1
    return count, first_prev, prev, None


def verify_parallel(session: Session, jobs: int) -> Verification:
    """Verify like :func:`verify`, splitting the trail into ``jobs`` seq ranges checked by
    separate processes, then checking the joins (each range must start with the hash the
    range before it ends with). PostgreSQL only; smaller trails and SQLite use verify()."""
    head = read_head(session)  # first: the ranges end there, whatever is appended meanwhile
    url = session.get_bind().engine.url.render_as_string(hide_password=False)
    if (
        jobs < 2
        or head is None
        or head[0] < PARALLEL_MIN_EVENTS
        or not url.startswith("postgresql")
    ):
        return verify(session)
    head_seq, head_hash = head
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    bounds = [1 + head_seq * i // jobs for i in range(jobs)] + [head_seq + 1]
    work = [(_libpq_url(url), a, z) for a, z in itertools.pairwise(bounds)]
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        parts = list(pool.map(_verify_range, work))
    prev, total = GENESIS_HASH, 0
    for count, first_prev, last_hash, problem in parts:
        if problem is not None or not count or first_prev != prev:
            # Something is wrong in or around this range: the serial walk names it exactly.
            return verify(session)
        prev, total = str(last_hash), total + count
    if head_hash != prev or head_seq != total or _past_head(session):
        return verify(session)
    return Verification(
        True,
        total,
        prev,
        _utc(session.scalar(select(AuditEvent.occurred_at).where(AuditEvent.seq == total))),
    )
