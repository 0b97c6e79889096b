"""The database goes away mid-pass and comes back (issue 12, item 2).

A TCP proxy stands between the worker and the shared PostgreSQL and is cut
for a few seconds while the worker is sending a batch to a slow relay. The
worker's error path must not leave its batch stuck (it used to wait out the
ten-minute lease): once the database is back, the batch is sent within
seconds, well inside the lease and the worker's poll, each notice once (or
again with the same Message-ID for those of the slice in flight at the cut: sent, not
yet recorded).

The outage lasts 3 s, shorter than the 30 s lease on purpose: the worker must
take its own rows back at once rather than wait for their lease, and retry
within seconds rather than after its 60 s poll.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from flask import Flask
from sqlalchemy.engine import make_url

from notifier import worker
from notifier.sink import MailSink
from tests.notifier.test_worker import app_for, seed
from tests.notifier.test_worker_process import (
    COUNT,
    _all_sent,
    _sent_once_or_again_with_the_same_id,
)
from tests.support.faults import TcpProxy
from tests.support.notifier_process import wait_for

OUTAGE_SECONDS = 3.0
SINK_DELAY = 0.3  # seconds the sink takes over each message
MOST_SENT_AGAIN = 2  # a slice of 0.5 s takes 2 sends of 0.3 s: at most those sent again
LEASE_SECONDS = 30
POLL_SECONDS = 60.0  # the worker's wait after a good pass: far longer than the test allows


@pytest.mark.postgres_only
def test_the_batch_is_sent_promptly_once_the_database_is_back(
    make_app: Callable[..., Flask], slow_sink: Callable[[float], MailSink]
) -> None:
    sink = slow_sink(SINK_DELAY)
    direct = app_for(make_app, sink.port, sink.cert_file)
    seed(direct, notices_count=COUNT)
    url = make_url(direct.config["DATABASE_URL"])
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    app = app_for(
        make_app, sink.port, sink.cert_file, DATABASE_URL=through, NOTIFIER_LEASE=LEASE_SECONDS
    )
    stop = threading.Event()
    runner = threading.Thread(target=worker.run_forever, args=(app, "w1", POLL_SECONDS, stop))
    runner.start()
    try:
        wait_for(lambda: sink.handler.stored >= 3)
        proxy.cut()
        stop.wait(OUTAGE_SECONDS)  # the outage
        assert not _all_sent(direct)
        proxy.restore()
        wait_for(lambda: _all_sent(direct), LEASE_SECONDS / 2)  # the old worker: 10 minutes
    finally:
        stop.set()
        runner.join(timeout=30)
        proxy.cut()  # close its listener and connections

    assert not runner.is_alive()
    _sent_once_or_again_with_the_same_id(direct, sink, MOST_SENT_AGAIN)
