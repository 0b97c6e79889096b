"""``portal.wsgi:app`` for any WSGI server. A wrong setting exits with one line."""

from __future__ import annotations

import sys

from portal import create_app
from portal.config import ConfigError

try:
    app = create_app()
except ConfigError as error:
    print(f"portal: configuration error: {error}", file=sys.stderr)  # noqa: T201
    sys.exit(2)
