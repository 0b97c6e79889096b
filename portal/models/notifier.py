"""Notifier workers' heartbeats: when each last worked, and whether it could use the mail relay.

One row per worker id, written only by that worker (``notifier run``); read by
``notifier status``, the notifier's health endpoint and the staff status pages
(``portal.services.delivery``). A table, not a file, so workers on many hosts
report in one place.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from portal.database import Base, UTCDateTime


class NotifierWorker(Base):
    """One worker's heartbeat and last pass; no PHI (ids, counts, reasons and times only).

    The transport error is current while ``transport_error_at`` is later than
    ``transport_ok_at`` (the last time the worker reached the relay and could use it).
    """

    __tablename__ = "notifier_workers"

    worker_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    lease_seconds: Mapped[int] = mapped_column(Integer)  # its PORTAL_NOTIFIER_LEASE
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    beat_at: Mapped[datetime] = mapped_column(UTCDateTime())
    pass_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # end of the last pass
    pass_sent: Mapped[int] = mapped_column(Integer, default=0)
    pass_failed: Mapped[int] = mapped_column(Integer, default=0)
    pass_retrying: Mapped[int] = mapped_column(Integer, default=0)
    pass_delayed: Mapped[int] = mapped_column(Integer, default=0)  # handed back: transport fault
    transport_error: Mapped[str | None] = mapped_column(String(64))  # the last one, e.g. tls-...
    transport_error_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    transport_ok_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
