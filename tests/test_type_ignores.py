"""Every ``# type: ignore`` in the product names its error code and says why (issue 11)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORE = re.compile(r"#\s*type:\s*ignore(?P<code>\[[^\]]+\])?(?P<rest>.*)$")


def unjustified(lines: list[str]) -> list[int]:
    """Line numbers of ignores without a code, or a reason beside or in the 6 lines above."""
    bad = []
    for number, line in enumerate(lines, 1):
        found = IGNORE.search(line)
        if not found:
            continue
        above = " ".join(lines[max(0, number - 7) : number - 1])
        reason = found["rest"].strip().lstrip("#").strip() or "# mypy:" in above
        if not found["code"] or not reason:
            bad.append(number)
    return bad


def test_every_type_ignore_has_a_code_and_a_reason() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("portal", "notifier")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number in unjustified(path.read_text(encoding="utf-8").splitlines())
    ]
    assert offenders == []


def test_the_check_sees_a_bare_ignore_and_accepts_a_reasoned_one() -> None:
    assert unjustified(["x = f()  # type: ignore"]) == [1]
    assert unjustified(["x = f()  # type: ignore[attr-defined]"]) == [1]
    assert unjustified(["x = f()  # type: ignore[attr-defined]  # untyped library"]) == []
    assert unjustified(["# mypy: untyped library", "x = f()  # type: ignore[attr-defined]"]) == []
