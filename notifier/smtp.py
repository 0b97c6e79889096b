"""SMTP transport for notices: TLS required, certificate checked, one connection per batch.

Errors are :class:`DeliveryError` subclasses whose ``reason`` is short,
machine-readable and free of PHI: it never holds an address, a server reply
text (servers echo addresses in them) or message content. The smtplib error
they replace is suppressed (``from None``) so that a logged traceback cannot
carry the recipient either.

Classification, for the outbox's retry policy:

- :class:`TransientDeliveryError` (retry with backoff): the server cannot be
  reached (``connect-failed``), the connection dropped or timed out
  (``connection-lost``, ``timeout``), a 4xx reply (``smtp-4xx:451``).
- :class:`PermanentDeliveryError` (mark the row failed): a 5xx reply
  (``smtp-5xx:550``), and configuration problems that retrying cannot fix and
  that must never be worked around by sending in clear or unverified:
  ``starttls-unavailable``, ``tls-verify-failed``, ``tls-failed``,
  ``auth-failed`` (5xx), ``auth-unavailable``, ``smtputf8-unavailable``,
  ``ca-file-unusable``, ``dkim-failed``, ``invalid-message``. A temporary AUTH
  failure (4xx) is transient.
"""

from __future__ import annotations

import contextlib
import copy
import email.policy
import logging
import re
import smtplib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import getaddresses
from types import TracebackType
from typing import Literal

import dkim

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0  # seconds, per socket operation
MAX_RESPONSE_CHARS = 200  # cap on the server reply kept for the outbox row
DKIM_SIGNED_HEADERS = (b"From", b"To", b"Subject", b"Date", b"Message-ID")
_NOTICE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_DOMAIN = re.compile(r"[A-Za-z0-9.-]{1,253}")


class DeliveryError(Exception):
    """A notice could not be handed to the SMTP server.

    ``reason`` is short, machine-readable and PHI-free (for example
    ``"smtp-5xx:550"``); ``smtp_code`` is the server's reply code when there was one.
    """

    def __init__(self, reason: str, smtp_code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.smtp_code = smtp_code


class TransientDeliveryError(DeliveryError):
    """Delivery may succeed later: connection problems, timeouts, 4xx replies."""


class PermanentDeliveryError(DeliveryError):
    """Retrying will not help: 5xx replies, missing STARTTLS, failed certificate checks."""


@dataclass(frozen=True)
class SmtpSettings:
    """Where and how to submit mail. ``ca_file=None`` trusts the system's CA store."""

    host: str
    port: int
    tls: Literal["starttls", "implicit"]
    ca_file: str | None
    username: str | None
    password: str | None = field(repr=False)
    timeout: float = DEFAULT_TIMEOUT
    local_hostname: str | None = None

    def __post_init__(self) -> None:
        # There is deliberately no plaintext mode: refuse anything else early.
        if self.tls not in ("starttls", "implicit"):
            raise ValueError("tls must be 'starttls' or 'implicit'")


@dataclass(frozen=True)
class DkimKey:
    """A DKIM signing key: ``selector._domainkey.domain`` publishes its public half."""

    selector: str
    domain: str
    private_key_pem: bytes = field(repr=False)


@dataclass(frozen=True)
class _Outgoing:
    """A flattened message and its envelope."""

    sender: str
    recipients: tuple[str, ...]
    payload: bytes
    smtputf8: bool
    message_id: str


def _error_for_code(code: int, prefix: str | None = None) -> DeliveryError:
    """The DeliveryError for an SMTP reply code: 4xx transient, 5xx (and others) permanent."""
    if 400 <= code < 500:
        return TransientDeliveryError(prefix or f"smtp-4xx:{code}", code)
    if 500 <= code < 600:
        return PermanentDeliveryError(prefix or f"smtp-5xx:{code}", code)
    return TransientDeliveryError(prefix or "smtp-error", code if code > 0 else None)


def _tls_error(err: ssl.SSLError) -> DeliveryError:
    """Map a TLS failure: a refused certificate is permanent, a cut connection transient."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return PermanentDeliveryError("tls-verify-failed")
    if isinstance(err, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return TransientDeliveryError("connection-lost")
    return PermanentDeliveryError("tls-failed")


def _translate(err: Exception, connecting: bool) -> DeliveryError:
    """Turn an smtplib/ssl/socket error into our PHI-free DeliveryError."""
    if isinstance(err, DeliveryError):
        return err
    if isinstance(err, ssl.SSLError):
        return _tls_error(err)
    if isinstance(err, smtplib.SMTPAuthenticationError):
        return _error_for_code(err.smtp_code, "auth-failed")
    if isinstance(err, smtplib.SMTPNotSupportedError):
        return PermanentDeliveryError("auth-unavailable")
    if isinstance(err, smtplib.SMTPResponseException):
        return _error_for_code(err.smtp_code)
    if isinstance(err, smtplib.SMTPServerDisconnected):
        return TransientDeliveryError("connect-failed" if connecting else "connection-lost")
    if isinstance(err, smtplib.SMTPException):
        # smtplib raises the bare class when no AUTH mechanism is in common.
        return PermanentDeliveryError("auth-unavailable" if connecting else "smtp-error")
    if isinstance(err, TimeoutError) and not connecting:
        return TransientDeliveryError("timeout")
    return TransientDeliveryError("connect-failed" if connecting else "connection-lost")


@contextlib.contextmanager
def _delivery_errors(connecting: bool) -> Iterator[None]:
    """Re-raise smtplib, ssl and socket errors as DeliveryError, dropping the original.

    The original is dropped (``from None``) because its text can name the
    recipient (SMTPRecipientsRefused, SMTPSenderRefused, server replies).
    """
    try:
        yield
    except (smtplib.SMTPException, OSError) as err:
        raise _translate(err, connecting) from None


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """A client TLS context that verifies the chain and the host name (TLS 1.2 or later).

    ``ca_file=None`` uses the system trust store. Verification is never
    disabled: there is no option to do so (ASVS V9.2.1).
    """
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    return context


def make_message_id(notice_id: str, domain: str) -> str:
    """Return ``<notice-{notice_id}@{domain}>``: stable, so a resent row keeps its Message-ID.

    Raises ``ValueError`` when either part holds characters a Message-ID cannot carry.
    """
    if not _NOTICE_ID.fullmatch(notice_id) or not _DOMAIN.fullmatch(domain):
        raise ValueError("notice id or domain not usable in a Message-ID")
    return f"<notice-{notice_id}@{domain}>"


def dkim_sign(msg_bytes: bytes, selector: str, domain: str, private_key_pem: bytes) -> bytes:
    """Return ``msg_bytes`` with a DKIM-Signature header (RFC 6376) prepended.

    Signs From, To, Subject, Date and Message-ID with relaxed/relaxed
    canonicalisation and rsa-sha256 (the key must be RSA, 1024 bits or more;
    2048 recommended). Raises ``ValueError`` when the key or message is unusable.
    """
    try:
        signature: bytes = dkim.sign(  # dkimpy is unannotated
            msg_bytes,
            selector.encode("ascii"),
            domain.encode("ascii"),
            private_key_pem,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=list(DKIM_SIGNED_HEADERS),
        )
    except (dkim.DKIMException, UnicodeEncodeError) as err:
        raise ValueError(f"DKIM signing failed: {type(err).__name__}") from None
    return signature + msg_bytes


def _prepare(msg: EmailMessage, dkim_key: DkimKey | None) -> _Outgoing:
    """Flatten ``msg`` (CRLF, as SMTP wants) and read its envelope from the headers."""
    sender_header = msg.get("Sender") or msg.get("From")
    senders = [addr for _, addr in getaddresses([str(sender_header or "")]) if addr]
    fields = [str(v) for key in ("To", "Cc", "Bcc") for v in msg.get_all(key, [])]
    recipients = tuple(addr for _, addr in getaddresses(fields) if addr)
    if len(senders) != 1 or not recipients:
        raise PermanentDeliveryError("invalid-message")
    smtputf8 = not all(a.isascii() for a in (*senders, *recipients))
    flat = _copy_without_bcc(msg) if "Bcc" in msg else msg
    policy = email.policy.SMTPUTF8 if smtputf8 else email.policy.SMTP
    payload = flat.as_bytes(policy=policy)
    if dkim_key is not None:
        try:
            key = dkim_key
            payload = dkim_sign(payload, key.selector, key.domain, key.private_key_pem)
        except ValueError:
            raise PermanentDeliveryError("dkim-failed") from None
    return _Outgoing(senders[0], recipients, payload, smtputf8, str(msg.get("Message-ID", "")))


def _copy_without_bcc(msg: EmailMessage) -> EmailMessage:
    """A copy of ``msg`` without its Bcc header (Bcc recipients must stay hidden)."""
    clone = copy.deepcopy(msg)
    del clone["Bcc"]
    return clone


class SmtpTransport:
    """Send notices through one SMTP connection, opened on first use and reused.

    Not thread-safe: use one per worker. The CA file is read at each connect,
    so a regenerated sink certificate is picked up by the next batch.
    """

    def __init__(self, settings: SmtpSettings, *, dkim_key: DkimKey | None = None) -> None:
        self.settings = settings
        self._dkim_key = dkim_key
        self._smtp: smtplib.SMTP | None = None
        self.connections_opened = 0

    def __enter__(self) -> SmtpTransport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def send(self, msg: EmailMessage) -> str:
        """Submit ``msg`` to its To/Cc/Bcc recipients; return the server's final reply.

        The reply is ``"250 <text>"`` for the end of DATA, capped at 200
        characters. Any refused recipient fails the whole message; after any
        refusal the transaction is RSET (or the connection dropped), so the
        next notice is unaffected. A reused connection that the server dropped
        (or closed with 421) is reopened once. Raises TransientDeliveryError
        or PermanentDeliveryError.
        """
        outgoing = _prepare(msg, self._dkim_key)
        if self._smtp is not None:
            try:
                return self._transmit(self._smtp, outgoing)
            except TransientDeliveryError as err:
                if err.reason != "connection-lost" and err.smtp_code != 421:
                    raise
                log.info("SMTP connection dropped by the server; reconnecting once")
        return self._transmit(self._connection(), outgoing)

    def close(self) -> None:
        """Say QUIT and close the connection, if one is open. Never raises."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()
        smtp.close()
        log.debug("SMTP connection closed")

    def _discard(self) -> None:
        """Drop the connection without QUIT (it is broken or the server refused to go on)."""
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    def _connection(self) -> smtplib.SMTP:
        """The open connection, or a new one: TLS negotiated, verified, authenticated."""
        if self._smtp is None:
            self._smtp = self._open()
            self.connections_opened += 1
        return self._smtp

    def _open(self) -> smtplib.SMTP:
        """Connect, negotiate and verify TLS, EHLO, and log in when a username is set."""
        s = self.settings
        context = _client_context(s.ca_file)
        with _delivery_errors(connecting=True):
            smtp = _connect(s, context)
            try:
                if s.tls == "starttls":
                    _starttls(smtp, context)
                smtp.ehlo()
                if s.username is not None:
                    smtp.login(s.username, s.password or "")
            except BaseException:
                smtp.close()
                raise
        log.info("SMTP connection opened to %s:%d (tls=%s)", s.host, s.port, s.tls)
        return smtp

    def _transmit(self, smtp: smtplib.SMTP, outgoing: _Outgoing) -> str:
        """MAIL, RCPT for each recipient, DATA; on a refusal RSET and raise."""
        try:
            with _delivery_errors(connecting=False):
                options = _mail_options(smtp, outgoing)
                self._expect(smtp.mail(outgoing.sender, options), (250,))
                for rcpt in outgoing.recipients:
                    self._expect(smtp.rcpt(rcpt), (250, 251))
                code, reply = smtp.data(outgoing.payload)  # SMTPDataError if DATA is refused
                self._expect((code, reply), (250,))
        except DeliveryError as err:
            self._end_refused_transaction(smtp, err)
            raise
        log.info("SMTP server accepted message %s", outgoing.message_id)
        text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
        return f"{code} {text}"[:MAX_RESPONSE_CHARS]

    def _end_refused_transaction(self, smtp: smtplib.SMTP, err: DeliveryError) -> None:
        """Leave the connection ready for the next notice after a refusal: RSET, or drop it.

        Every refusal (MAIL, RCPT, the DATA command, the end of DATA) is
        followed by RSET, so the server forgets the refused transaction
        (RFC 5321 4.1.1.5); otherwise the next MAIL meets "503 nested MAIL"
        and an innocent notice fails for good. Without a reply code (the link
        broke), on 421 (the server is closing) or when RSET is not answered
        250, the connection is dropped and the next notice opens a new one.
        """
        if err.smtp_code is not None and err.smtp_code != 421:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                if smtp.rset()[0] == 250:
                    return
            log.info("SMTP RSET failed after a refusal; reconnecting for the next notice")
        self._discard()

    @staticmethod
    def _expect(response: tuple[int, bytes], accepted: tuple[int, ...]) -> None:
        """Raise the DeliveryError for ``response`` unless its code is in ``accepted``."""
        if response[0] not in accepted:
            raise _error_for_code(response[0])


def _client_context(ca_file: str | None) -> ssl.SSLContext:
    """``tls_context(ca_file)``, with an unreadable or invalid CA file as a permanent error."""
    try:
        return tls_context(ca_file)
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        raise PermanentDeliveryError("ca-file-unusable") from None


def _connect(s: SmtpSettings, context: ssl.SSLContext) -> smtplib.SMTP:
    """Open the TCP connection; with implicit TLS the handshake (and verification) too."""
    if s.tls == "implicit":
        return smtplib.SMTP_SSL(
            s.host, s.port, local_hostname=s.local_hostname, timeout=s.timeout, context=context
        )
    return smtplib.SMTP(s.host, s.port, local_hostname=s.local_hostname, timeout=s.timeout)


def _starttls(smtp: smtplib.SMTP, context: ssl.SSLContext) -> None:
    """EHLO, then STARTTLS; refuse (before any MAIL) a server that does not offer it."""
    code, _ = smtp.ehlo()
    if code != 250:
        raise _error_for_code(code)
    if not smtp.has_extn("starttls"):
        raise PermanentDeliveryError("starttls-unavailable")
    smtp.starttls(context=context)


def _mail_options(smtp: smtplib.SMTP, outgoing: _Outgoing) -> list[str]:
    """MAIL FROM parameters: SIZE when offered, SMTPUTF8 when an address needs it."""
    options: list[str] = []
    if smtp.has_extn("size"):
        options.append(f"SIZE={len(outgoing.payload)}")
    if outgoing.smtputf8:
        if not smtp.has_extn("smtputf8"):
            raise PermanentDeliveryError("smtputf8-unavailable")
        options += ["SMTPUTF8", "BODY=8BITMIME"]
    return options
