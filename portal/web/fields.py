"""Form fields shared by the role blueprints: dates typed into filters and reports."""

from __future__ import annotations

import re
from datetime import date
from typing import Any

from wtforms import DateField
from wtforms.validators import StopValidation

from portal.services.audit_query import DAY_RANGE_HINT, EARLIEST_DAY, LATEST_DAY

_ISO_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")  # ASCII digits only, as the date input sends


class DayField(DateField):
    """A ``YYYY-MM-DD`` day between EARLIEST_DAY and LATEST_DAY, or a field error naming its label.

    wtforms' DateField takes any digits strptime takes (``"٢٠٢٤-..."`` too) and
    any year from 1 to 9999; the day after 9999-12-31 does not exist, and the
    database has limits of its own. Bad input is the user's error (ASVS 5.1.3),
    never a 500.
    """

    def process_formdata(self, valuelist: list[Any]) -> None:
        """Set ``data`` to the day typed; raise ValueError (a field error) when it is not one."""
        self.data = None
        raw = " ".join(str(v) for v in valuelist).strip() if valuelist else ""
        if not raw:
            return
        problem = f"{self.label.text}: enter a date as YYYY-MM-DD, {DAY_RANGE_HINT}."
        if not _ISO_DAY.fullmatch(raw):
            raise ValueError(problem)
        try:
            day = date.fromisoformat(raw)
        except ValueError:
            raise ValueError(problem) from None
        if not EARLIEST_DAY <= day <= LATEST_DAY:
            raise ValueError(problem)
        self.data = day


class DayRequired:
    """Validator: the field must hold a day. Unlike DataRequired it keeps DayField's own
    message (what was wrong with the typed date) instead of replacing it."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __call__(self, _form: object, field: DayField) -> None:
        """Stop the chain with DayField's error, or with ``message`` when nothing was typed."""
        if field.errors:
            raise StopValidation()
        if field.data is None:
            raise StopValidation(self.message)
