"""The distribution: one wheel with both packages, templates/ and static/ inside, two scripts."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCKS = {"main": ROOT / "requirements" / "main.txt", "test": ROOT / "requirements" / "test.txt"}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
# An extra the lock lists as its own package (pip-compile --strip-extras).
EXTRA_PACKAGES = {("psycopg", "binary"): "psycopg-binary"}


def _project() -> dict[str, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    main = [Requirement(r) for r in project["dependencies"]]
    return {
        "main": main,
        "test": main + [Requirement(r) for r in project["optional-dependencies"]["test"]],
    }


def pins(lock: Path) -> dict[str, tuple[str, int]]:
    """Return {canonical name: (version, number of hashes)} for each package ``lock`` pins."""
    found: dict[str, tuple[str, int]] = {}
    name = None
    for line in lock.read_text().splitlines():
        if match := _PIN.match(line):
            name = canonicalize_name(match[1])
            found[name] = (match[2], 0)
        elif name and line.strip().startswith("--hash=sha256:"):
            found[name] = (found[name][0], found[name][1] + 1)
    return found


def test_wheel_carries_templates_static_and_migrations(tmp_path: Path) -> None:
    # Built from a copy: an in-tree build reuses the checkout's build/lib, which keeps files
    # a change moved or deleted (a top-level migrations/ stayed in the wheel that way).
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("portal", "notifier", "migrations", "templates", "static"):
        shutil.copytree(
            ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("pickup_portal-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "portal/templates/base.html" in names
    assert "portal/templates/auth/signin.html" in names
    assert "portal/static/css/portal.css" in names
    assert "notifier/__init__.py" in names
    assert any(n.startswith("portal/migrations/versions/0001") for n in names)
    assert "portal/migrations/script.py.mako" in names
    # Inside the portal package: no top-level `migrations` to clash in site-packages.
    assert not [n for n in names if n.startswith("migrations/")]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "portal = portal.cli:main" in text
    assert "notifier = notifier.cli:main" in text


def test_asset_dir_prefers_installed_copy(tmp_path: Path, monkeypatch: object) -> None:
    from portal import paths

    (tmp_path / "templates").mkdir()
    monkeypatch.setattr(paths, "PACKAGE_DIR", tmp_path)  # type: ignore[attr-defined]
    assert paths.asset_dir("templates") == tmp_path / "templates"


def test_asset_dir_falls_back_to_checkout() -> None:
    from portal import paths

    assert paths.asset_dir("templates") == ROOT / "templates"


@pytest.mark.parametrize("which", list(LOCKS))
def test_lock_pins_every_dependency_of_pyproject_within_its_range(which: str) -> None:
    """Dependencies added to pyproject.toml without `make lock` would not be installed."""
    locked = pins(LOCKS[which])
    missing, outside = [], []
    for req in _project()[which]:
        names = [canonicalize_name(req.name)] + [
            EXTRA_PACKAGES[(canonicalize_name(req.name), extra)] for extra in sorted(req.extras)
        ]
        missing += [n for n in names if n not in locked]
        if names[0] in locked and not req.specifier.contains(locked[names[0]][0]):
            outside.append(f"{req} but the lock has {locked[names[0]][0]}")
    assert (missing, outside) == ([], [])


def test_locks_agree_are_hashed_and_name_no_index() -> None:
    """A fresh machine gets CI's files from whatever index it is configured with."""
    main, test = pins(LOCKS["main"]), pins(LOCKS["test"])
    assert {n: v for n, (v, _) in test.items() if n in main} == {n: v for n, (v, _) in main.items()}
    assert [n for n, (_, hashes) in test.items() if hashes == 0] == []
    for lock in LOCKS.values():
        options = [
            line
            for line in lock.read_text().splitlines()
            if line.startswith(
                ("-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--trusted-host")
            )
        ]
        assert options == []
        assert not re.search(r"file:|https?://(?!pypi\.org)|/opt/", lock.read_text())


def test_linters_are_pinned_exactly() -> None:
    test = {canonicalize_name(r.name): str(r.specifier) for r in _project()["test"]}
    assert test["ruff"].startswith("==")
    assert test["mypy"].startswith("==")


def test_make_installs_from_the_lock() -> None:
    """`make` reinstalls when a lock changes, from the lock, and resolves nothing itself."""
    makefile = (ROOT / "Makefile").read_text()
    stamp = re.search(r"^\$\(STAMP\):(.*)\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert stamp is not None
    assert "requirements/main.txt requirements/test.txt" in makefile
    assert "$(LOCKS)" in stamp[1]
    assert stamp[2].split("\n")[:2] == [
        "\t$(BIN)/pip install --quiet --require-hashes -r requirements/test.txt",
        "\t$(BIN)/pip install --quiet --no-deps -e .",
    ]
