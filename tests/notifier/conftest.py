"""Fixtures for the notifier transport: real TLS mail sinks on free ports, in-process."""

from __future__ import annotations

import asyncio
import datetime as dt
import email.policy
import mailbox
import socket
from collections.abc import Callable, Iterator, Sequence
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from notifier.sink import MaildirHandler, MailSink
from notifier.smtp import SmtpSettings, make_message_id
from notifier.tlscert import generate_self_signed
from tests.support.notifier_process import WorkerProcess
from tests.support.sink_process import SinkProcess

PATIENT = "pat.example@patients.example.org"
FROM = "Pickup Portal <no-reply@portal.example.org>"

SinkFactory = Callable[..., MailSink]


class RefusingHandler(MaildirHandler):
    """A Maildir handler that answers a fixed reply to MAIL, RCPT and/or DATA."""

    def __init__(
        self,
        maildir: Path,
        rcpt_reply: str | None = None,
        data_reply: str | None = None,
        mail_reply: str | None = None,
    ) -> None:
        super().__init__(maildir)
        self.rcpt_reply, self.data_reply, self.mail_reply = rcpt_reply, data_reply, mail_reply

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply:
            return self.data_reply
        return await super().handle_DATA(server, session, envelope)


class PickyHandler(MaildirHandler):
    """Stores mail, but answers ``reply`` at ``stage`` to any transaction for ``address``.

    ``stage`` is "rcpt", "data-command" (the DATA verb, before 354) or "data"
    (the end of DATA). ``rset_reply``, when set, is the answer to RSET, and the
    server then keeps the refused transaction (as a relay whose RSET failed).
    """

    def __init__(self, maildir: Path, address: str, stage: str, reply: str) -> None:
        super().__init__(maildir)
        self.address, self.stage, self.reply = address, stage, reply
        self.rset_reply: str | None = None

    def refusal(self, stage: str, recipients: list[str]) -> str | None:
        """The reply refusing ``stage`` for these recipients, or None to go on."""
        return self.reply if stage == self.stage and self.address in recipients else None

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        refused = self.refusal("rcpt", [address])
        if refused:
            return refused
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return self.refusal("data", envelope.rcpt_tos) or await super().handle_DATA(
            server, session, envelope
        )


class PickySMTP(SMTP):
    """aiosmtpd's server, letting a PickyHandler refuse the DATA verb and RSET."""

    async def smtp_DATA(self, arg: str) -> None:
        handler = self.event_handler
        recipients = self.envelope.rcpt_tos if self.envelope is not None else []
        refused = handler.refusal("data-command", recipients)
        if refused:
            await self.push(refused)
            return
        await super().smtp_DATA(arg)

    async def smtp_RSET(self, arg: str) -> None:
        if self.event_handler.rset_reply:
            await self.push(self.event_handler.rset_reply)  # the transaction stays open
            return
        await super().smtp_RSET(arg)


@pytest.fixture
def picky_sink(sink_factory: SinkFactory, tmp_path: Path) -> Callable[..., MailSink]:
    """``picky_sink(address, stage, reply)``: a STARTTLS sink refusing mail for one address."""

    def start(address: str, stage: str, reply: str) -> MailSink:
        handler = PickyHandler(tmp_path / "picky" / "Maildir", address, stage, reply)
        return sink_factory("picky", handler=handler, server_class=PickySMTP)

    return start


@pytest.fixture
def sink_factory(tmp_path: Path) -> Iterator[SinkFactory]:
    """Start a MailSink on a free port (options as MailSink's); all are stopped at teardown.

    Each sink gets its own ``tmp_path/<name>/`` with ``Maildir`` and ``cert.pem``.
    """
    started: list[MailSink] = []

    def start(name: str = "sink", **options: Any) -> MailSink:
        base = tmp_path / name
        options.setdefault("cert_file", base / "cert.pem")
        sink = MailSink(base / "Maildir", **options).start()
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.stop()


@pytest.fixture
def sink(sink_factory: SinkFactory) -> MailSink:
    """A running STARTTLS sink; its certificate is in ``sink.cert_file``."""
    return sink_factory()


@pytest.fixture
def bounce_sink(sink_factory: SinkFactory, tmp_path: Path) -> MailSink:
    """A STARTTLS sink that bounces as a relay does (reserved local parts, and the addresses
    in ``sink.handler.bounce_rules``), writing each DSN to the Maildir ``tmp_path/bounces``."""
    return sink_factory("relay", bounce_maildir=tmp_path / "bounces")


@pytest.fixture
def plain_sink(sink_factory: SinkFactory) -> MailSink:
    """A running sink that does not offer STARTTLS."""
    return sink_factory("plain", starttls=False, cert_file=None)


@pytest.fixture
def refusing_sink(sink_factory: SinkFactory, tmp_path: Path) -> Callable[..., MailSink]:
    """Start a STARTTLS sink answering ``rcpt_reply`` / ``data_reply`` / ``mail_reply``
    (e.g. "451 4.3.0 busy")."""

    def start(
        rcpt_reply: str | None = None, data_reply: str | None = None, mail_reply: str | None = None
    ) -> MailSink:
        handler = RefusingHandler(
            tmp_path / "refusing" / "Maildir", rcpt_reply, data_reply, mail_reply
        )
        return sink_factory("refusing", handler=handler)

    return start


class SlowHandler(MaildirHandler):
    """A Maildir handler that waits ``delay`` seconds before answering the end of DATA (a
    slow relay); it stores the message after the wait, as a relay queues it then answers."""

    def __init__(self, maildir: Path, delay: float) -> None:
        super().__init__(maildir)
        self.delay = delay

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(self.delay)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def slow_sink(sink_factory: SinkFactory, tmp_path: Path) -> Callable[[float], MailSink]:
    """``slow_sink(delay)``: a STARTTLS sink taking ``delay`` seconds over each message
    (``sink.handler.delay`` may be changed while it runs)."""

    def start(delay: float) -> MailSink:
        return sink_factory("slow", handler=SlowHandler(tmp_path / "slow" / "Maildir", delay))

    return start


@pytest.fixture
def other_ca_file(tmp_path: Path) -> str:
    """A CA file with a certificate no sink uses: trusting it must fail verification."""
    cert_pem, _ = generate_self_signed()
    path = tmp_path / "other-ca.pem"
    path.write_bytes(cert_pem)
    return str(path)


def settings_for(sink: MailSink, **overrides: Any) -> SmtpSettings:
    """SmtpSettings pointing at ``sink``, trusting its certificate."""
    values: dict[str, Any] = {
        "host": sink.host,
        "port": sink.port,
        "tls": "implicit" if sink.tls_mode == "implicit" else "starttls",
        "ca_file": str(sink.cert_file) if sink.cert_file else None,
        "username": None,
        "password": None,
        "timeout": 5.0,
        "local_hostname": "localhost",
    }
    values.update(overrides)
    return SmtpSettings(**values)


@pytest.fixture
def smtp_settings() -> Callable[..., SmtpSettings]:
    """``smtp_settings(sink, **overrides)``: settings that reach ``sink`` and trust its cert."""
    return settings_for


@pytest.fixture
def make_notice() -> Callable[..., EmailMessage]:
    """``make_notice(n=1, to=PATIENT)``: a PHI-free notice like the notifier sends."""

    def build(n: int = 1, to: str = PATIENT) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = FROM
        msg["To"] = to
        msg["Subject"] = "You have a secure message"
        msg["Date"] = format_datetime(dt.datetime.now(dt.UTC))
        msg["Message-ID"] = make_message_id(f"n{n}", "portal.example.org")
        msg.set_content(f"A secure message is waiting for you.\nNotice {n}.\n")
        return msg

    return build


@pytest.fixture
def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def delivered_messages(maildir: Path) -> list[EmailMessage]:
    """Every message in ``maildir``, parsed (oldest first by Maildir key)."""
    box = mailbox.Maildir(maildir, factory=None, create=False)
    parsed = [
        BytesParser(policy=email.policy.default).parsebytes(box.get_bytes(key))
        for key in sorted(box.keys())
    ]
    return [msg for msg in parsed if isinstance(msg, EmailMessage)]


@pytest.fixture
def delivered() -> Callable[[MailSink | Path], list[EmailMessage]]:
    """``delivered(sink_or_maildir)``: the messages stored in the sink's (or that) Maildir."""
    return lambda target: delivered_messages(
        target.maildir if isinstance(target, MailSink) else target
    )


@pytest.fixture
def worker_process(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """``worker_process(env, *args, relay_backoff=None)``: start ``notifier run *args`` as a
    process (see WorkerProcess for ``relay_backoff``); any still running at teardown is killed."""
    started: list[WorkerProcess] = []

    def start(
        env: dict[str, str], *args: str, relay_backoff: tuple[float, float] | None = None
    ) -> WorkerProcess:
        folder = tmp_path / f"worker-{len(started)}"
        started.append(WorkerProcess(env, args, folder, relay_backoff))
        return started[-1]

    yield start
    for proc in started:
        if proc.process.poll() is None:
            proc.kill()


@pytest.fixture
def sink_process(tmp_path: Path) -> Iterator[Callable[..., SinkProcess]]:
    """``sink_process(stall_at=())``: start the mail sink as a process of its own, to kill
    and start again on the same port and Maildir (see SinkProcess); stopped at teardown."""
    started: list[SinkProcess] = []

    def start(stall_at: Sequence[int] = ()) -> SinkProcess:
        started.append(SinkProcess(tmp_path / f"relay-{len(started)}", stall_at).start())
        return started[-1]

    yield start
    for relay in started:
        relay.stop()
