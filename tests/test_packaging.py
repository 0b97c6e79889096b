"""The distribution: one wheel with both packages, templates/ and static/ inside, two scripts."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_carries_templates_static_and_migrations(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, timeout=300,
                   capture_output=True)
    wheel = next(tmp_path.glob("pickup_portal-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "portal/templates/base.html" in names
    assert "portal/templates/auth/signin.html" in names
    assert "portal/static/css/portal.css" in names
    assert "notifier/__init__.py" in names
    assert any(n.startswith("migrations/versions/0001") for n in names)
    assert "migrations/script.py.mako" in names
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
