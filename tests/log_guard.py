"""A pytest plugin: no log record written during the suite may carry PHI, an email or a token.

Every record that reaches the root logger's handlers (so, at the level the
portal configures) is formatted as the portal formats it, JSON with its
extras, and searched for the recognisable PHI of ``tests.factories``, any email
address and any 43-character URL token. A test whose run logged one fails in
its teardown, naming the logger, so the leak is traced to its source.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import pytest

from portal.logs import JsonFormatter
from tests.factories import PHI_STRINGS

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
# A pickup/invite/reset token: 43 URL-safe base64 characters standing alone (hashes
# are 64 hex characters and request ids are shorter, so neither matches).
TOKEN = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")
# The notifier's own Message-IDs (<notice-<row id>@<mail domain>>) are shaped like addresses
# but name a row, not a person: the one address-shaped thing logs may carry.
MESSAGE_ID = re.compile(r"<notice-[A-Za-z0-9]+@[A-Za-z0-9.-]+>")


def leaks_in(line: str) -> list[str]:
    """Return what ``line`` leaks: PHI strings, email addresses and tokens found in it."""
    line = MESSAGE_ID.sub("<message-id>", line)
    found = [phi for phi in PHI_STRINGS if phi in line]
    found += EMAIL.findall(line)
    found += [t for t in TOKEN.findall(line) if re.search(r"[A-Za-z]", t) and re.search(r"\d", t)]
    return found


class _Collector(logging.Handler):
    """Keeps the formatted records of the current test."""

    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that cannot be formatted is not ours to judge
            self.lines.append(f"{record.name}: <unformattable>")


_COLLECTOR = _Collector()


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger().addHandler(_COLLECTOR)


def pytest_unconfigure(config: pytest.Config) -> None:
    logging.getLogger().removeHandler(_COLLECTOR)


@pytest.fixture(autouse=True)
def _no_phi_in_logs() -> Iterator[None]:
    """Fail the test if anything it logged carries PHI, an email address or a token."""
    _COLLECTOR.lines.clear()
    yield
    bad = [(line[:300], leaks) for line in _COLLECTOR.lines if (leaks := leaks_in(line))]
    _COLLECTOR.lines.clear()
    if bad:
        pytest.fail(
            "logged PHI, an email address or a token:\n"
            + "\n".join(f"  {leaks}: {line}" for line, leaks in bad[:10]),
            pytrace=False,
        )
