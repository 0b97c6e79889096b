"""Where templates/, static/ and migrations/ are: inside the installed package (setup.py
puts them there), or at the checkout's top."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def asset_dir(name: str) -> Path:
    """Return the folder ``name`` ("templates", "static", "migrations") of a wheel or a checkout.

    Raises FileNotFoundError when neither exists (a broken install).
    """
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{name}/ not found beside or inside the portal package")
