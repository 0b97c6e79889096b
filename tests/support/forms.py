"""Form helpers for the Flask test client."""

from __future__ import annotations

import re

from flask.testing import FlaskClient

CSRF = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')


def csrf_token(client: FlaskClient, url: str) -> str:
    """GET ``url`` and return the CSRF token of its form."""
    response = client.get(url)
    match = CSRF.search(response.get_data(as_text=True))
    assert match, f"no CSRF token on {url} (status {response.status_code})"
    return match.group(1)
