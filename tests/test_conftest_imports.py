"""Tests import helpers from modules (tests/support/...), never from a conftest.py.

A conftest is pytest's: imported as a module too, it runs twice under some import modes
and its fixtures leak into the importer's namespace (helpers belong in fixtures or
modules, not imports from conftest.py).
"""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CONFTEST_IMPORT = re.compile(
    r"^\s*(from\s+[\w.]*conftest\s+import|import\s+[\w.]*conftest)", re.MULTILINE
)


def test_no_test_imports_from_a_conftest() -> None:
    offenders = [
        str(path.relative_to(TESTS))
        for path in sorted(TESTS.rglob("*.py"))
        if CONFTEST_IMPORT.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == [], f"move what these import from a conftest to tests/support/: {offenders}"


def test_the_check_sees_both_import_forms() -> None:
    assert CONFTEST_IMPORT.search("from tests.pickup.conftest import send\n")
    assert CONFTEST_IMPORT.search("    import tests.conftest\n")
    assert not CONFTEST_IMPORT.search("from tests.support.pickup import send\n")
