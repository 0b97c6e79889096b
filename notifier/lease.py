"""A claimed batch's lease: the rows a worker still holds, renewed while it sends them.

A claim lasts ``PORTAL_NOTIFIER_LEASE`` from its ``claimed_at``. The worker
renews it (one fenced UPDATE of ``claimed_at`` for the rows it still holds)
once a third of the lease has passed, checked before every send, and gives
each send a deadline a sixth of the lease before the lease ends. So a send,
however slow the relay, ends (cut off and retried if need be) while the rows
are still the worker's, and only a dead or stuck worker's rows ever expire.

On SQLite one worker sends at a time (:func:`send_lock`): SQLite keeps no row lock
over a send, and the commit of a send's outcome may wait on its write lock (the
30 s busy timeout) past the end of the lease, when another worker could claim
the row and send it again. The other workers are hot standbys.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.engine import URL

from notifier import outbox

RENEW_AFTER = 1 / 3  # of the lease: renew once this much of it has passed
SEND_MARGIN = 1 / 6  # of the lease: a send must end this long before the lease does


@dataclass
class Lease:
    """The batch ``claim`` holds: ``pending`` rows not yet processed, oldest first.

    ``renewed`` is the ``time.monotonic()`` of the claim or the last renewal: the
    send deadline counts from it, so a wall clock that jumps cannot stretch it.
    """

    claim: outbox.Claim
    pending: list[int]
    length: timedelta
    renewed: float = field(default_factory=time.monotonic)

    def due_for_renewal(self, now: datetime) -> bool:
        """Return True once a third of the lease has passed (by either clock)."""
        elapsed = max(
            now - self.claim.claimed_at, timedelta(seconds=time.monotonic() - self.renewed)
        )
        return elapsed >= self.length * RENEW_AFTER

    def renewed_to(self, now: datetime, held: list[int], at: float) -> int:
        """Take note that :func:`outbox.renew` renewed ``held`` from ``now`` (committed),
        ``now`` having been read at monotonic time ``at``.

        From then on the claim is ``Claim(worker_id, now)``. Returns how many
        pending rows were no longer held (taken or finished meanwhile); they are
        dropped from ``pending``.
        """
        kept = set(held)
        lost = len(self.pending) - len(kept)
        self.pending = [notice_id for notice_id in self.pending if notice_id in kept]
        self.claim = outbox.Claim(self.claim.worker_id, now)
        self.renewed = at
        return lost

    def send_deadline(self) -> float:
        """The ``time.monotonic()`` by which the next send must end."""
        return self.renewed + (self.length * (1 - SEND_MARGIN)).total_seconds()


LOCK_SUFFIX = ".notifier.lock"  # beside the SQLite database file: <db file>.notifier.lock


def send_lock_path(url: URL) -> Path | None:
    """The lock file of the SQLite database at ``url``; None for PostgreSQL (row locks
    fence its sends) and for an in-memory SQLite database (one process only)."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database in ("", ":memory:") or url.query.get("mode") == "memory":
        return None
    path = Path(database[5:] if database.startswith("file:") else database.split("?")[0])
    path = Path(os.path.realpath(path))  # two spellings of one database share one lock
    return path.with_name(path.name + LOCK_SUFFIX)


class UnsafeLockFile(PermissionError):
    """The send lock's path is a symbolic link, not a regular file, or another user's."""


@contextmanager
def send_lock(url: URL) -> Iterator[bool]:
    """Hold the database's send lock for the block, if it is free: yields True when this
    worker may claim and send (it holds the lock, or none is needed), False when another
    worker holds it (claim and send nothing: this worker is a standby).

    An exclusive, non-blocking ``flock`` on a file opened for this block: it conflicts
    with every other open of the file, in this process too, and the OS drops it when
    the holder exits or is killed, so nothing stale is ever left. The file must be a
    regular file of this user, opened without following a link: one planted by another
    user could otherwise be held to keep every worker standing by. Raises UnsafeLockFile
    otherwise, and OSError when the file cannot be opened or created.

    Local file systems only: on NFS mounted with ``nolock`` (or ``local_lock``), flock
    is host-local and two hosts could send at once, but SQLite itself must not be used
    over NFS either: run the notifier on the database's host.
    """
    path = send_lock_path(url)
    if path is None:
        yield True
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        raise UnsafeLockFile(f"the notifier send lock {path} is a symbolic link") from None
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode) or found.st_uid != os.geteuid():
            raise UnsafeLockFile(
                f"the notifier send lock {path} is not a regular file owned by this user"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            held = False
        yield held  # outside the handler: an error of the block is not chained to it
    finally:
        os.close(fd)  # releases the lock
