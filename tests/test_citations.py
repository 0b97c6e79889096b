"""Comments and docstrings cite only documents the repository has (issue 11 item 8).

The design and style notes the code once cited live outside the checkout: a reader
sent there from the code finds nothing. The repository's own documents (README.md,
CHANGELOG.md) sit at its top.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = re.compile(r"\b[\w-]+\.md\b")
SOURCES = (
    ".py",
    ".toml",
    ".cfg",
    ".mako",
    ".html",
    ".txt",
    ".conf",
    ".service",
    ".timer",
    ".yaml",
    ".yml",
    ".sh",
    "Makefile",
    "Containerfile",
)


def sources() -> list[Path]:
    """Return the checkout's source files (tracked, or new and not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / name for name in listed if name.endswith(SOURCES) and (ROOT / name).is_file()]


def test_every_cited_document_is_in_the_repository() -> None:
    missing = [
        f"{path.relative_to(ROOT)}:{number}: {name}"
        for path in sources()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        for name in DOCUMENT.findall(line)
        if not (ROOT / name).is_file()
    ]
    assert missing == []
