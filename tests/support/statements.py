"""Count the SQL statements an app sends, on its engine (ORM, Core and server-side sessions).

``before_cursor_execute`` fires once per statement the driver runs, whatever issued it, so
a page that queries once per row shows up as a count that grows with the rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from flask import Flask
from sqlalchemy import event

from portal.audit_group import APPENDER


@dataclass
class Statements:
    """The statements seen, in order (their SQL text, parameters left out)."""

    sql: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sql)

    def touching(self, table: str) -> list[str]:
        """The statements that name ``table`` (a rough, readable filter for messages)."""
        return [s for s in self.sql if table in s]


@contextlib.contextmanager
def counting(app: Flask) -> Iterator[Statements]:
    """Count every statement ``app``'s engine runs inside the block, and its audit group
    appender's (``portal.audit_group``: the inbox's event is written there)."""
    seen = Statements()
    engines = [app.extensions["engine"]]
    appender = app.extensions["session_info"][APPENDER]
    if appender is not None:
        engines.append(appender.engine())

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.sql.append(" ".join(statement.split()))

    for engine in engines:
        event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", before)
