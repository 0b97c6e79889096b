"""``python -m notifier``: the same as the ``notifier`` command."""

from notifier.cli import main

main()
