"""A local SMTP server that requires TLS and stores every message in a Maildir.

For the demo and the test suite only: it accepts mail for any recipient. It
behaves like a careful relay on the points the notifier must get right: it
offers STARTTLS on a certificate it generates (written to ``cert_file`` so the
notifier can trust exactly that certificate), refuses mail before STARTTLS,
and can require AUTH (only over TLS). Given a bounce Maildir, it also bounces
as a relay does: mail for ``bounce-hard@…``, ``bounce-soft@…`` or
``bounce-delay@…`` (any domain, ``+tag`` allowed) is accepted with 250, not
stored, and an RFC 3464 delivery status notification goes to the bounce
Maildir, addressed to the envelope sender (notifier.bounces reads it).

Run it with ``notifier sink --port P --maildir DIR [--cert FILE]`` or
``python -m notifier.sink ...``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import mailbox
import signal
import ssl
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import click
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from notifier import dsn
from notifier.tlscert import (
    DEFAULT_HOSTNAMES,
    generate_self_signed,
    write_private_file,
    write_public_file,
)

log = logging.getLogger(__name__)

BIND_ADDRESS = "127.0.0.1"
SERVER_NAME = "localhost"
DEFAULT_PORT = 8025
DEFAULT_IDLE_TIMEOUT = 300.0  # seconds before the server drops an idle client (RFC 5321 4.5.3.2)
MAILDIR_SUBDIRS = ("tmp", "new", "cur")
# Local parts the sink bounces when it has a bounce Maildir: a hard bounce (no such user),
# a soft one (mailbox full) and a delay (still trying), as a relay reports them.
RESERVED_BOUNCES = {"bounce-hard": dsn.HARD, "bounce-soft": dsn.SOFT, "bounce-delay": dsn.DELAYED}


def open_maildir(path: Path) -> mailbox.Maildir:
    """The Maildir at ``path``, its tmp/new/cur made (mode 0700) if missing."""
    for sub in MAILDIR_SUBDIRS:
        (path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    return mailbox.Maildir(path, create=False)


class MaildirHandler:
    """aiosmtpd handler: store each message, as received, in a Maildir.

    Subclass and override ``handle_RCPT`` / ``handle_DATA`` to simulate a
    server that refuses mail (the test suite does).

    With ``bounce_maildir``, recipients with a reserved local part
    (:data:`RESERVED_BOUNCES`), and any address put in ``bounce_rules``
    (lower-case address to the :class:`notifier.dsn.Bounce` it gets), are
    bounced: the mail is accepted but not stored, and a DSN returning it (or,
    with ``return_headers_only``, its headers) is written to the bounce Maildir.
    """

    def __init__(self, maildir: str | Path, bounce_maildir: str | Path | None = None) -> None:
        self.path = Path(maildir)
        self.mailbox = open_maildir(self.path)
        self.bounce_path = Path(bounce_maildir) if bounce_maildir else None
        self.bounce_box = open_maildir(self.bounce_path) if self.bounce_path else None
        self.bounce_rules: dict[str, dsn.Bounce] = {}
        self.return_headers_only = False
        self.stored = 0
        self.bounced = 0
        self._lock = threading.Lock()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Store the message with Return-Path/Delivered-To trace headers, or bounce it for
        the recipients this sink bounces; answer 250 either way."""
        bounces = [(rcpt, b) for rcpt in envelope.rcpt_tos if (b := self.bounce_for(rcpt))]
        if bounces and envelope.mail_from:  # never bounce a bounce (RFC 5321 6.1)
            keys = [self.write_dsn(envelope, rcpt, bounce) for rcpt, bounce in bounces]
            if len(bounces) == len(envelope.rcpt_tos):
                return f"250 2.0.0 OK queued as {keys[0]}"
        key = self.store(envelope)
        return f"250 2.0.0 OK queued as {key}"

    def bounce_for(self, address: str) -> dsn.Bounce | None:
        """The bounce ``address`` gets, or None (always None without a bounce Maildir)."""
        if self.bounce_box is None:
            return None
        lowered = address.lower()
        local = lowered.rpartition("@")[0].partition("+")[0]
        return self.bounce_rules.get(lowered) or RESERVED_BOUNCES.get(local)

    def write_dsn(self, envelope: Envelope, recipient: str, bounce: dsn.Bounce) -> str:
        """Write the DSN for ``recipient`` to the bounce Maildir; return its key (logged alone)."""
        assert self.bounce_box is not None  # bounce_for answers None without one
        report = dsn.build(
            envelope.original_content or b"",
            recipient=recipient,
            bounce=bounce,
            to=envelope.mail_from or "",
            reporting_mta=SERVER_NAME,
            headers_only=self.return_headers_only,
        )
        with self._lock:
            key = self.bounce_box.add(report)
            self.bounced += 1
        log.info("mail sink bounced a message (%s), report %s", bounce.status, key)
        return key

    def store(self, envelope: Envelope) -> str:
        """Write the message to the Maildir and return its key. Logs the key only."""
        content = envelope.original_content or b""
        trace = [f"Return-Path: <{envelope.mail_from or ''}>"]
        trace += [f"Delivered-To: {rcpt}" for rcpt in envelope.rcpt_tos]
        header = ("\r\n".join(trace) + "\r\n").encode("utf-8")
        with self._lock:
            key = self.mailbox.add(header + content)
            self.stored += 1
        log.info("mail sink stored message %s", key)
        return key


class _SinkController(Controller):
    """aiosmtpd's threaded controller, plus port 0 and a connection counter."""

    def __init__(self, handler: Any, server_class: type[SMTP] = SMTP, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.connections = 0
        self._count_lock = threading.Lock()
        self._server_class = server_class

    def factory(self) -> SMTP:
        """Called once per accepted TCP connection (aiosmtpd's documented hook)."""
        with self._count_lock:
            self.connections += 1
        # As aiosmtpd's own factory, with the server class the sink was given.
        return self._server_class(self.handler, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        # With port 0 the OS picked the port: learn it before aiosmtpd connects to itself.
        if self.port == 0 and isinstance(self.server, asyncio.Server):
            self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]  # unannotated, as above


def _server_tls_context(hostnames: Sequence[str]) -> tuple[ssl.SSLContext, bytes]:
    """A server TLS context on a fresh self-signed certificate; returns it and the cert PEM."""
    cert_pem, key_pem = generate_self_signed(hostnames)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # ssl can only load a key from a file: keep it in a private directory for a moment.
    with tempfile.TemporaryDirectory(prefix="mail-sink-") as tmp:
        cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_path.write_bytes(cert_pem)
        write_private_file(key_path, key_pem)
        context.load_cert_chain(cert_path, key_path)
    return context, cert_pem


def _authenticator(username: str, password: str) -> Any:
    """An aiosmtpd authenticator accepting exactly one login, compared in constant time."""
    expected_user, expected_password = username.encode(), password.encode()

    def authenticate(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword)
        ok = ok and hmac.compare_digest(auth_data.login, expected_user)
        ok = ok and hmac.compare_digest(auth_data.password, expected_password)
        return AuthResult(success=bool(ok), handled=False)

    return authenticate


class MailSink:
    """A local SMTP server in a background thread, writing each message to a Maildir.

    ``starttls=True`` (default) offers STARTTLS and refuses mail before it;
    ``starttls=False`` is a plain server that does not offer STARTTLS (to test
    that the client refuses it); ``implicit_tls=True`` speaks TLS from the
    first byte (SMTPS) instead. ``auth=(user, password)`` requires AUTH
    PLAIN/LOGIN, which is only offered over TLS. A fresh certificate for
    ``hostnames`` is generated at each ``start()`` and written to ``cert_file``
    when one is given. ``handler`` replaces the Maildir handler (it must store
    to ``maildir`` itself if it should); ``server_class`` replaces aiosmtpd's
    ``SMTP`` (the test suite uses it to refuse the DATA command itself, which
    no handler hook can). ``bounce_maildir`` gives the default handler a
    bounce Maildir (see :class:`MaildirHandler`).
    """

    def __init__(
        self,
        maildir: str | Path,
        *,
        port: int = 0,
        cert_file: str | Path | None = None,
        starttls: bool = True,
        implicit_tls: bool = False,
        auth: tuple[str, str] | None = None,
        hostnames: Sequence[str] = DEFAULT_HOSTNAMES,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        handler: MaildirHandler | None = None,
        server_class: type[SMTP] = SMTP,
        bounce_maildir: str | Path | None = None,
    ) -> None:
        if starttls and implicit_tls:
            raise ValueError("choose STARTTLS or implicit TLS, not both")
        if handler is not None and bounce_maildir is not None:
            raise ValueError("give the bounce Maildir to the handler, not the sink")
        self.maildir = Path(maildir)
        self.handler = handler or MaildirHandler(self.maildir, bounce_maildir)
        self.cert_file = Path(cert_file) if cert_file is not None else None
        self.cert_pem: bytes | None = None
        self._requested_port = port
        self._starttls, self._implicit_tls = starttls, implicit_tls
        self._auth, self._hostnames, self._idle_timeout = auth, tuple(hostnames), idle_timeout
        self._server_class = server_class
        self._controller: _SinkController | None = None

    @property
    def port(self) -> int:
        """The port the sink listens on (the one the OS chose when started with port 0)."""
        if self._controller is None:
            raise RuntimeError("mail sink is not running")
        return int(self._controller.port)

    @property
    def host(self) -> str:
        """The address the sink listens on."""
        return BIND_ADDRESS

    @property
    def connection_count(self) -> int:
        """How many TCP connections clients opened since ``start()``."""
        return self._controller.connections if self._controller is not None else 0

    @property
    def tls_mode(self) -> str:
        """``"starttls"``, ``"implicit"`` or ``"none"``."""
        if self._implicit_tls:
            return "implicit"
        return "starttls" if self._starttls else "none"

    def _smtp_options(self, context: ssl.SSLContext | None) -> dict[str, Any]:
        """Keyword arguments for aiosmtpd's SMTP class and the controller."""
        options: dict[str, Any] = {
            "server_hostname": SERVER_NAME,
            "timeout": self._idle_timeout,
        }
        if self._implicit_tls:
            options["ssl_context"] = context
        elif self._starttls:
            options.update(tls_context=context, require_starttls=True)
        if self._auth is not None:
            options["authenticator"] = _authenticator(*self._auth)
            options["auth_required"] = True
            # aiosmtpd only counts STARTTLS as TLS; an SMTPS connection is TLS throughout,
            # so its "AUTH without TLS" warning does not apply there.
            options["auth_require_tls"] = not self._implicit_tls
            if self._implicit_tls:
                warnings.filterwarnings(
                    "ignore", "Requiring AUTH while not requiring TLS", UserWarning
                )
        return options

    def start(self) -> MailSink:
        """Generate the certificate, write ``cert_file``, start listening; returns self."""
        if self._controller is not None:
            raise RuntimeError("mail sink is already running")
        context = None
        if self._starttls or self._implicit_tls:
            context, self.cert_pem = _server_tls_context(self._hostnames)
            if self.cert_file is not None:
                self.cert_file.parent.mkdir(parents=True, exist_ok=True)
                write_public_file(self.cert_file, self.cert_pem)
        controller = _SinkController(
            self.handler,
            server_class=self._server_class,
            hostname=BIND_ADDRESS,
            port=self._requested_port,
            **self._smtp_options(context),
        )
        controller.start()
        controller.connections = 0  # forget aiosmtpd's own start-up probe connection
        self._controller = controller
        log.info("mail sink listening on %s:%d (%s)", BIND_ADDRESS, self.port, self.tls_mode)
        return self

    def stop(self) -> None:
        """Stop listening, drop open connections and join the server thread. Idempotent."""
        if self._controller is None:
            return
        self._controller.stop()
        self._controller = None

    def __enter__(self) -> MailSink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def default_cert_path(maildir: Path) -> Path:
    """Where the CLI writes the certificate when ``--cert`` is not given: beside the Maildir."""
    return maildir.parent / f"{maildir.name}.cert.pem"


def wait_for_shutdown_signal() -> int:
    """Block the main thread until SIGINT or SIGTERM arrives; returns the signal number."""
    received: list[int] = []
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return received[0]


@click.command("sink")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="Port on 127.0.0.1 (0: any free port; the one chosen is printed).",
)
@click.option(
    "--maildir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Maildir to store messages in (created if missing).",
)
@click.option(
    "--cert",
    "cert_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the generated certificate, for PORTAL_SMTP_CA_FILE "
    "[default: DIR.cert.pem beside the Maildir].",
)
@click.option(
    "--bounce-maildir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Bounce mail for bounce-hard@, bounce-soft@ and bounce-delay@ recipients, writing "
    "a delivery status notification here (for PORTAL_BOUNCE_MAILDIR).",
)
def sink_command(
    port: int, maildir: Path, cert_file: Path | None, bounce_maildir: Path | None
) -> None:
    """Run a local SMTP server with STARTTLS that stores every message in a Maildir."""
    cert_file = cert_file or default_cert_path(maildir)
    with MailSink(maildir, port=port, cert_file=cert_file, bounce_maildir=bounce_maildir) as sink:
        bounces = f", bounces to {bounce_maildir}" if bounce_maildir else ""
        click.echo(
            f"mail sink listening on {sink.host}:{sink.port}, "
            f"STARTTLS with certificate {cert_file}, Maildir {maildir}{bounces}"
        )
        wait_for_shutdown_signal()
    click.echo("mail sink stopped")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point for ``python -m notifier.sink``; exits through ``SystemExit`` like click."""
    sink_command.main(args=list(argv) if argv is not None else None, prog_name="notifier sink")


if __name__ == "__main__":
    main()
