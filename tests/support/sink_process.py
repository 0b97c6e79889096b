"""The mail sink as a real process: started, SIGKILLed and started again on its port.

For the tests where the relay itself dies under the notifier (issue 12). The sink
keeps its port, its Maildir and its certificate path across restarts, as a relay
restarted by its supervisor does. Each start writes a freshly generated
certificate to that path (MailSink generates one per start, and ``notifier sink``
cannot be given one); the notifier reads its CA file at every connect.

``stall_at`` makes the one place a relay's death can duplicate a notice happen on
cue: the process (``python -m tests.support.sink_process``, the same MailSink as
``notifier sink``) stores the message that brings the Maildir to one of those
counts and then never answers its 250, until it is killed. The notifier must
then send that notice again, with the same Message-ID. Without ``stall_at`` the
process is ``notifier sink`` itself.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import click
from aiosmtpd.smtp import SMTP, Envelope, Session

from notifier.sink import MaildirHandler, MailSink, wait_for_shutdown_signal
from tests.support.notifier_process import ROOT, wait_for

LISTENING = re.compile(r"mail sink listening on (\S+):(\d+)")
MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>]+>)", re.MULTILINE | re.IGNORECASE)


class SinkProcess:
    """The sink as a process in ``folder``: ``Maildir/``, ``cert.pem``, one log per start.

    The first start takes a free port (``--port 0``); every later one asks for that
    same port, so the notifier's PORTAL_SMTP_PORT stays right.
    """

    host = "127.0.0.1"

    def __init__(self, folder: Path, stall_at: Sequence[int] = ()) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.maildir = folder / "Maildir"
        self.cert_file = folder / "cert.pem"
        self.stall_at = tuple(stall_at)
        self.port = 0
        self.starts = 0
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """``notifier sink ...``, or this module's stalling sink when ``stall_at`` is set."""
        options = ["--port", str(self.port), "--maildir", str(self.maildir)]
        options += ["--cert", str(self.cert_file)]
        if not self.stall_at:
            return [sys.executable, "-m", "notifier", "sink", *options]
        stalls = ",".join(map(str, self.stall_at))
        return [sys.executable, "-m", __name__, *options, "--stall-at", stalls]

    def start(self, seconds: float = 30.0) -> SinkProcess:
        """Start the sink and return once it listens (it printed its address)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        log = self.folder / f"sink-{self.starts}.log"
        path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(path)}
        with log.open("wb") as out:
            process = subprocess.Popen(self.command(), env=env, stdout=out, stderr=out)
        self.process = process

        def listening() -> bool:
            assert process.poll() is None, f"sink exited: {log.read_text()[-2000:]}"
            return LISTENING.search(log.read_text()) is not None

        wait_for(listening, seconds)
        found = LISTENING.search(log.read_text())
        assert found is not None
        self.port = int(found.group(2))
        return self

    def kill(self) -> None:
        """SIGKILL: open connections are cut mid-transaction, nothing is flushed or said."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM if still running (teardown); SIGKILL if it does not stop in 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def stored(self) -> int:
        """How many messages the Maildir holds (delivered ones are renamed into ``new``)."""
        return len(os.listdir(self.maildir / "new"))

    def messages(self) -> list[bytes]:
        """Every stored message, raw, as the sink wrote it."""
        folder = self.maildir / "new"
        return [(folder / name).read_bytes() for name in sorted(os.listdir(folder))]


def message_ids(messages: list[bytes]) -> Counter[str]:
    """How many times each Message-ID was delivered."""
    found: Counter[str] = Counter()
    for raw in messages:
        match = MESSAGE_ID.search(raw)
        assert match is not None, "a stored message without a Message-ID"
        found[match.group(1).decode()] += 1
    return found


class StallingHandler(MaildirHandler):
    """Stores every message; the one that brings the Maildir (earlier runs' messages
    included) to a count in ``stall_at`` is stored but never answered."""

    def __init__(self, maildir: Path, stall_at: Sequence[int]) -> None:
        super().__init__(maildir)
        self.stall_at = frozenset(stall_at)
        self.before = len(self.mailbox)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = await super().handle_DATA(server, session, envelope)  # stored, no await inside
        if self.before + self.stored in self.stall_at:
            await asyncio.Event().wait()  # queued, and the relay dies before it says so
        return reply


@click.command()
@click.option("--port", type=int, required=True)
@click.option("--maildir", type=click.Path(path_type=Path), required=True)
@click.option("--cert", "cert_file", type=click.Path(path_type=Path), required=True)
@click.option("--stall-at", required=True, help="Comma-separated Maildir counts.")
def main(port: int, maildir: Path, cert_file: Path, stall_at: str) -> None:
    """A STARTTLS mail sink like ``notifier sink`` that stalls at the given counts."""
    handler = StallingHandler(maildir, [int(n) for n in stall_at.split(",")])
    with MailSink(maildir, port=port, cert_file=cert_file, handler=handler) as sink:
        click.echo(f"mail sink listening on {sink.host}:{sink.port}, stalling at {stall_at}")
        wait_for_shutdown_signal()


if __name__ == "__main__":
    main()
