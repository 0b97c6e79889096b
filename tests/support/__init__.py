"""Importable test helpers. Fixtures live in the conftest.py files; whatever a test imports
lives here (tests/test_conftest_imports.py keeps it that way)."""
