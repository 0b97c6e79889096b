"""``notifier`` with a shorter wait after a transport fault, for tests whose relay is back at once.

``notifier run`` waits ``notifier.worker.RELAY_BACKOFF`` (15 s, doubling to 5 min)
after a pass ends on a transport fault, and no setting shortens it: a test that
kills the relay three times would spend 105 s waiting. This runs the real
command, unchanged but for that pair of numbers, so such a test waits a fraction
of a second instead. Drop it for the setting once the worker has one.

``python -m tests.support.quick_relay_backoff FIRST,MOST run [ARGS...]``
"""

from __future__ import annotations

import sys

from notifier import cli, worker


def main(argv: list[str]) -> None:
    """Set the backoff from ``argv[0]`` ("FIRST,MOST" seconds), run ``notifier argv[1:]``."""
    if not isinstance(getattr(worker, "RELAY_BACKOFF", None), tuple):
        raise SystemExit("notifier.worker.RELAY_BACKOFF is gone: use the setting that replaced it")
    first, most = (float(part) for part in argv[0].split(","))
    worker.RELAY_BACKOFF = (first, most)
    cli.main.main(args=argv[1:], prog_name="notifier")


if __name__ == "__main__":
    main(sys.argv[1:])
