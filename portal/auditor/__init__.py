"""Auditor pages: search, export, accounting of disclosures, verification."""
