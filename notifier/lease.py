"""A claimed batch's lease: the rows a worker still holds, renewed while it sends them.

A claim lasts ``PORTAL_NOTIFIER_LEASE`` from its ``claimed_at``. The worker
renews it (one fenced UPDATE of ``claimed_at`` for the rows it still holds)
once a third of the lease has passed, checked before every send, and gives
each send a deadline a sixth of the lease before the lease ends. So a send,
however slow the relay, ends (cut off and retried if need be) while the rows
are still the worker's, and only a dead or stuck worker's rows ever expire.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

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
