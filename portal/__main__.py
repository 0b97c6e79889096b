"""``python -m portal``: the same as the ``portal`` command."""

from portal.cli import main

main()
