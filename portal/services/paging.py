"""Keyset pages for the lists: the same few queries for the first page and the thousandth.

A page is asked for by the row it comes after (``after``: the next page) or before
(``before``: the previous page), named by that row's opaque public id (or an audit
event's ``seq``): never by an offset, nor by anything the row holds, so a link carries
no PHI, and a row added meanwhile neither repeats nor hides another. The row named is
looked up within the list's own filters (one query), so a cursor naming another
reader's row is refused exactly like a malformed one, with :class:`PageError`, and
nothing of that row is shown or confirmed. Then one query fetches the page and one row
more, which tells whether a next (or previous) page exists without counting the list.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, TypeVarTuple

from sqlalchemy import BindParameter, ColumnElement, Select, and_, bindparam, or_, select
from sqlalchemy.engine import Connection, Row
from sqlalchemy.orm import InstrumentedAttribute, Session

from portal.services.errors import ServiceError

PAGE_SIZE = 50  # rows a list page shows
MAX_PAGE_SIZE = 200
_TOKEN = re.compile(r"[A-Za-z0-9]{1,64}")
_MAX_SEQ_DIGITS = 18  # below 2**63: BIGINT on PostgreSQL, INTEGER on SQLite
BAD_PAGE = "That page of the list cannot be shown. Open the list again from its first page."

T = TypeVar("T")
U = TypeVar("U")
Ts = TypeVarTuple("Ts")
S = TypeVar("S", bound=Select[*tuple[Any, ...]])


class PageError(ServiceError):
    """A page asked for with a cursor that is malformed, unknown or not the reader's."""

    def __init__(self) -> None:
        super().__init__(BAD_PAGE)


@dataclass(frozen=True)
class PageRequest:
    """Which page: the first (no cursor), the one after ``after`` or the one before ``before``."""

    after: str | None = None
    before: str | None = None
    size: int = PAGE_SIZE

    @classmethod
    def of(cls, after: str | None, before: str | None, size: int = PAGE_SIZE) -> PageRequest:
        """Return the request for these query parameters (None: absent).

        Raises PageError when both are given, either is empty or is not 1 to 64 letters
        and digits, or ``size`` is outside 1..MAX_PAGE_SIZE.
        """
        if after is not None and before is not None:
            raise PageError
        for token in (after, before):
            if token is not None and not _TOKEN.fullmatch(token):
                raise PageError
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise PageError
        return cls(after, before, size)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list, in the list's order, with the cursors of its neighbours.

    ``next_after`` names the row the next page comes after, ``previous_before`` the row
    the previous page comes before (None: there is none). ``first`` tells whether this is
    the top of the list, so a page that is not can link back to it.
    """

    rows: list[T]
    next_after: str | None = None
    previous_before: str | None = None
    first: bool = True

    def map(self, convert: Callable[[T], U]) -> Page[U]:
        """Return this page with each row converted, the cursors kept."""
        return Page(
            [convert(row) for row in self.rows], self.next_after, self.previous_before, self.first
        )


@dataclass(frozen=True)
class Listing:
    """A list: the filters that scope it to its reader, its order, how a link names a row.

    ``order`` are the columns (or expressions of the row, such as a correlated "unread"
    flag) it is sorted by, together unique (a timestamp, then the primary key); ``cursor``
    is the unique column a link names a row by (a public id, or a numeric ``seq`` when
    ``numeric``).
    """

    where: tuple[ColumnElement[bool], ...]
    order: tuple[InstrumentedAttribute[Any] | ColumnElement[Any], ...]
    cursor: InstrumentedAttribute[Any]
    descending: bool = True
    numeric: bool = False


class Prepared(Generic[*Ts]):
    """A list's statements, built once and run with bound parameters.

    Building, coercing and cache-keying a SELECT costs more Python than running it, so a
    list read on every page (the inbox) keeps one of these at module level, its filters
    naming bound parameters (``bindparam("reader")``) that :func:`fetch_prepared` is given
    per request; the page, the page past a cursor and the cursor's own row are each built
    on first use, then reused (README "Inbox"). :func:`fetch` makes one per call.

    ``narrow``: sort the sort columns alone, then join the page's rows to the rest (see
    :meth:`_narrow`). ``columns``: ``stmt`` selects columns only, no ORM entity, so it runs
    on the session's connection and its rows skip the ORM's result processing (nothing is
    flushed first: for lists read before anything is written in the transaction).
    """

    def __init__(
        self, listing: Listing, stmt: Select[*Ts], *, narrow: bool = False, columns: bool = False
    ) -> None:
        self.listing, self.stmt, self.narrow, self.columns = listing, stmt, narrow, columns
        self._pages: dict[tuple[bool, bool], Select[*Ts]] = {}
        self._anchor: Select[Any] | None = None

    def page(self, descending: bool, anchored: bool) -> Select[*Ts]:
        """The page walking down (``descending``) or up, past the cursor's row
        (``anchored``: its sort values bound as ``_anchor_0``...) or from the end; the
        row count bound as ``_limit``."""
        built = self._pages.get((descending, anchored))
        if built is None:
            built = (
                self._narrow(descending, anchored)
                if self.narrow
                else self._scoped(self.stmt, descending, anchored)
            )
            self._pages[descending, anchored] = built
        return built

    def _scoped(self, stmt: S, descending: bool, anchored: bool) -> S:
        listing = self.listing
        scoped = stmt.where(*listing.where)
        if anchored:
            values: list[BindParameter[Any]] = [
                bindparam(f"_anchor_{i}") for i in range(len(listing.order))
            ]
            scoped = scoped.where(_beyond(listing, tuple(values), descending))
        return scoped.order_by(*(c.desc() if descending else c.asc() for c in listing.order)).limit(
            bindparam("_limit")
        )

    def _narrow(self, descending: bool, anchored: bool) -> Select[*Ts]:
        """The page's rows picked by their sort columns alone, then joined to the rest.

        The database sorts every row the filters match (the list has no index in its
        order): sorting only the sort columns, then reading the joins and correlated
        columns of the page's rows alone, keeps a long list's page near a short one's.
        """
        order = self.listing.order
        keys = self._scoped(
            select(*(c.label(f"_key_{i}") for i, c in enumerate(order))), descending, anchored
        ).subquery("page_keys")
        picked = [keys.c[f"_key_{i}"] for i in range(len(order))]
        return self.stmt.join(
            keys, and_(*(c == k for c, k in zip(order, picked, strict=True)))
        ).order_by(*(k.desc() if descending else k.asc() for k in picked))

    def anchor(self) -> Select[Any]:
        """The sort values of the row whose cursor value is bound as ``_cursor``, within the
        listing's filters."""
        if self._anchor is None:
            listing = self.listing
            self._anchor = select(*listing.order).where(
                *listing.where, listing.cursor == bindparam("_cursor")
            )
        return self._anchor


def fetch(
    session: Session,
    listing: Listing,
    stmt: Select[*Ts],
    want: PageRequest,
    token_of: Callable[[Row[*Ts]], object],
) -> Page[Row[*Ts]]:
    """Return the page ``want`` asks for of ``stmt`` (its columns, the listing's filters).

    Two queries with a cursor (its row, then the page), one without; three when a
    previous page turns out to be a short top of the list (the top is fetched whole).
    ``token_of`` gives a fetched row's cursor value. Raises PageError for a cursor that
    names no row of this listing.
    """
    return fetch_prepared(session, Prepared(listing, stmt), want, token_of)


def fetch_prepared(
    session: Session,
    prepared: Prepared[*Ts],
    want: PageRequest,
    token_of: Callable[[Row[*Ts]], object],
    params: Mapping[str, Any] | None = None,
) -> Page[Row[*Ts]]:
    """:func:`fetch` with statements built once: ``params`` are the values of the bound
    parameters the listing's filters name. Same queries, same answers, same PageError."""
    listing, bound = prepared.listing, dict(params or {})
    forward = want.before is None
    token = want.after if forward else want.before
    descending = listing.descending == forward  # the direction this query walks the list
    if token is not None:
        anchor = _anchor(session, prepared, token, bound)
        bound.update((f"_anchor_{i}", value) for i, value in enumerate(anchor))
    ordered = prepared.page(descending, token is not None)
    runner = _runner(session, prepared)
    rows = list(runner.execute(ordered, {**bound, "_limit": want.size + 1}).all())
    more = len(rows) > want.size
    rows = rows[: want.size]
    if forward:
        return Page(
            rows,
            str(token_of(rows[-1])) if more else None,
            str(token_of(rows[0])) if token is not None and rows else None,
            first=token is None,
        )
    if not more and len(rows) < want.size:  # the top of the list, short: show the top whole
        return fetch_prepared(session, prepared, PageRequest(size=want.size), token_of, params)
    rows.reverse()
    return Page(
        rows,
        str(token_of(rows[-1])),
        str(token_of(rows[0])) if more else None,
        first=not more,
    )


def _anchor(
    session: Session, prepared: Prepared[*Ts], token: str, params: dict[str, Any]
) -> tuple[Any, ...]:
    """The sort values of the row ``token`` names, looked up within the listing's filters."""
    value: object = token
    if prepared.listing.numeric:
        if not token.isdigit() or len(token) > _MAX_SEQ_DIGITS:
            raise PageError
        value = int(token)
    runner = _runner(session, prepared)
    found = runner.execute(prepared.anchor(), {**params, "_cursor": value}).one_or_none()
    if found is None:
        raise PageError
    return tuple(found)


def _runner(session: Session, prepared: Prepared[*Ts]) -> Session | Connection:
    """Where ``prepared``'s statements run: the session, or for plain ``columns`` rows its
    connection, after flushing what the session holds (a connection never autoflushes, and
    a list must show the caller's own changes, a message just revoked among them). A clean
    session's flush runs no statement."""
    if not prepared.columns:
        return session
    if session.autoflush:
        session.flush()
    return session.connection()


def _beyond(
    listing: Listing, anchor: tuple[BindParameter[Any], ...], descending: bool
) -> ColumnElement[bool]:
    """Rows strictly past ``anchor`` going down (``descending``) or up the sort order.

    Spelled out as ``a < x OR (a = x AND b < y)`` rather than a row-value comparison, so
    both databases read it the same way.
    """
    columns = listing.order
    past: list[ColumnElement[bool]] = [
        c < v if descending else c > v for c, v in zip(columns, anchor, strict=True)
    ]
    condition = past[-1]
    for index in range(len(columns) - 2, -1, -1):
        condition = or_(past[index], and_(columns[index] == anchor[index], condition))
    return condition
