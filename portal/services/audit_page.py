"""The SQL of an auditor's page: one statement for the events, their people and the count.

A page used to take five round trips (events, users, their data keys, message ids, a
``count(*)`` of every match) and an unwrap per person. Here one statement returns the
page's events, with each the columns that name its actor and its patient
(:func:`portal.services.audit_names.sealed_columns`) and its message's public id, and
with the number of matches counted only up to COUNT_LIMIT + 1 rows. Statements are built
once per filter shape (which fields are set) and take the filter's values as bound
parameters (times and limits are written into the text: see audit_filters._WRITTEN_IN
and _written), so a page costs no statement building and the database sees the same
few statements.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import ColumnElement, Integer, Select, bindparam, func, literal_column, select, true
from sqlalchemy.orm import Session, aliased

from portal.models import AuditEvent, DataKey, Message, User
from portal.services.audit_filters import (
    EVENT_COLUMNS,
    AuditFilter,
    filter_params,
    shaped_conditions,
)
from portal.services.audit_names import SEALED_WIDTH, sealed_columns

# A page counts its matches up to here, then says "more than": counting every match of a
# broad filter over millions of events cost more than the page itself.
COUNT_LIMIT = 10_000
TEMPLATES = 512  # statements kept built: filter shape, paging, dialect, limits (LRU)
# Where each part of a page row starts: count, events, actor, patient, message public id.
EVENT_AT = 1
ACTOR_AT = EVENT_AT + len(EVENT_COLUMNS)
PATIENT_AT = ACTOR_AT + SEALED_WIDTH
MESSAGE_AT = PATIENT_AT + SEALED_WIDTH


def page_query(
    session: Session, flt: AuditFilter, *, before_seq: int | None, limit: int, count_limit: int
) -> tuple[Select[Any], dict[str, Any]]:
    """Return the statement of one page and its parameters.

    Each row is: the count (up to ``count_limit + 1``; without a filter, the trail's
    length), the :data:`EVENT_COLUMNS`, what names the actor and the patient, and the
    message's public id. At most ``limit`` events, newest first, below ``before_seq``.
    """
    params = filter_params(flt)
    lateral = session.get_bind().dialect.name == "postgresql"
    stmt = _template(tuple(params), before_seq is not None, lateral, limit, count_limit + 1)
    values = {**params, "before_seq": before_seq} if before_seq is not None else params
    return stmt, values


def count_query(flt: AuditFilter, count_limit: int) -> tuple[Select[Any], dict[str, Any]]:
    """Return the statement counting ``flt``'s matches as the page does, and its parameters."""
    params = filter_params(flt)
    return _count(tuple(params), count_limit + 1), params


@functools.lru_cache(maxsize=TEMPLATES)
def _template(
    names: tuple[str, ...], before: bool, lateral: bool, limit: int, count_limit: int
) -> Select[Any]:
    """The page statement of one filter shape (its values given at execution).

    The page is cut first (ordered and limited on ``seq``, served by the same index as
    the page alone), then joined by primary key, so the joins cost a few lookups per row
    shown, never per event matched. The count is the outer side of the join, so an
    empty page still returns one row carrying it (its event columns NULL).
    """
    events = (
        select(*EVENT_COLUMNS)
        .where(*shaped_conditions(names))
        .order_by(AuditEvent.seq.desc())
        .limit(_written(limit))
    )
    if before:
        events = events.where(AuditEvent.seq < bindparam("before_seq", type_=AuditEvent.seq.type))
    page = events.subquery("page")
    counted = _count(names, count_limit).subquery("total")
    stmt = select(counted.c.n, *page.c).select_from(counted).outerjoin(page, true())
    for user_id, name in ((page.c.actor_id, "actor"), (page.c.patient_id, "patient")):
        stmt = _join_person(stmt, user_id, name, lateral)
    return (
        stmt.outerjoin(Message, Message.id == page.c.message_id)
        .add_columns(Message.public_id)
        .order_by(page.c.seq.desc())
    )


def _join_person(stmt: Select[Any], user_id: Any, name: str, lateral: bool) -> Select[Any]:
    """Outer-join the user ``user_id`` names and their data key; add their sealed columns.

    On PostgreSQL a LATERAL subquery with LIMIT 1: it cannot be flattened, so each row is
    one primary-key lookup. As a plain join the planner prefers a hash join over a
    sequential scan of users whenever that table is small, costing more than the page.
    SQLite has no LATERAL; it always joins by lookups.
    """
    if lateral:
        person = (
            select(*sealed_columns(User, DataKey))
            .outerjoin(DataKey, DataKey.id == User.data_key_id)
            .where(User.id == user_id)
            .limit(literal_column("1", Integer))
            .lateral(name)
        )
        return stmt.outerjoin(person, true()).add_columns(*person.c)
    user, key = aliased(User, name=name), aliased(DataKey, name=f"{name}_key")
    return (
        stmt.outerjoin(user, user.id == user_id)
        .outerjoin(key, key.id == user.data_key_id)
        .add_columns(*sealed_columns(user, key))
    )


def _written(limit: int) -> ColumnElement[int]:
    """A LIMIT written into the SQL text: PostgreSQL then plans a prepared page once for any
    values (a LIMIT parameter it cannot see it estimates as 10% of the rows), and no
    parameter is rendered at each execution. Part of the template's key: a few values."""
    return literal_column(str(int(limit)), Integer)


@functools.lru_cache(maxsize=TEMPLATES)
def _count(names: tuple[str, ...], count_limit: int) -> Select[Any]:
    """Count the matches of a filter shape, reading at most ``count_limit`` of them.

    Without a filter the count is the highest ``seq``: the trail numbers its events
    from 1 with no gaps (portal.audit; ``portal audit verify`` finds a gap), so that
    index lookup is exact and never capped.
    """
    if not names:
        return select(func.coalesce(func.max(AuditEvent.seq), 0).label("n"))
    capped = (
        select(AuditEvent.seq)
        .where(*shaped_conditions(names))
        .limit(_written(count_limit))
        .subquery("capped")
    )
    return select(func.count().label("n")).select_from(capped)
