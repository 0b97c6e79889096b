"""SMTP transport for notices: TLS required, certificate checked, one connection per batch.

Errors are :class:`DeliveryError` subclasses whose ``reason`` is short,
machine-readable and free of PHI: it never holds an address, a server reply
text (servers echo addresses in them) or message content. The smtplib error
they replace is suppressed (``from None``) so that a logged traceback cannot
carry the recipient either.

Classification, for the outbox's retry policy:

- :class:`TransportFault` (the relay's or our settings' fault, not the
  message's: the notifier keeps every row queued with its link, backs off and
  reports the setting to check, ``TransportFault.setting``). Everything that
  goes wrong while connecting: the server cannot be reached
  (``connect-failed``), a 4xx greeting, and the misconfigurations that must
  never be worked around by sending in clear or unverified
  (``starttls-unavailable``, ``tls-verify-failed``, ``tls-failed``,
  ``auth-failed``, ``auth-unavailable``, ``ca-file-unusable``); a relay that
  stops answering mid-transaction or not within the deadline (``timeout``);
  a sender the relay refuses (``auth-required`` for a 530, ``sender-refused:550``);
  a relay that refuses to relay for us (``relay-denied:5.7.1``: Postfix's
  "Relay access denied" at RCPT, Exchange's 5.7.54 and 5.7.57 anywhere; read
  from the enhanced status code, digits only); a 4xx to MAIL FROM, a 421 at
  any point and a TLS error after the handshake (the relay, not the notice);
  and an unusable DKIM key (``dkim-failed``). :class:`TransportConfigError`
  (a permanent one) and :class:`RelayUnavailable` (a transient one) are the two
  kinds; both are also Permanent/TransientDeliveryError for callers that only
  retry or give up.
- :class:`TransientDeliveryError` (retry this message with backoff): the
  connection dropped (``connection-lost``), a 4xx reply (``smtp-4xx:451``).
- :class:`PermanentDeliveryError` (mark this message failed): a 5xx reply to
  RCPT or DATA (``smtp-5xx:550``), ``smtputf8-unavailable`` (its address needs
  SMTPUTF8), ``invalid-message``.

A send can be given a deadline (:attr:`SmtpTransport.deadline`): every socket
operation is cut short at it, so a send never outlives the worker's lease.
"""

from __future__ import annotations

import contextlib
import copy
import email.policy
import logging
import re
import smtplib
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import getaddresses
from types import TracebackType
from typing import Any, Literal

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
        # Set on a RelayUnavailable met after the relay accepted MAIL for this message:
        # the relay broke off this message's transaction, which may be the message's doing.
        self.mid_transaction = False


class TransientDeliveryError(DeliveryError):
    """Delivery may succeed later: connection problems, timeouts, 4xx replies."""


class PermanentDeliveryError(DeliveryError):
    """Retrying will not help: 5xx replies, missing STARTTLS, failed certificate checks."""


RELAY_SETTINGS = "PORTAL_SMTP_HOST / PORTAL_SMTP_PORT"
# The setting to check for each transport fault, and what the reason means to an operator.
TRANSPORT_ADVICE: dict[str, tuple[str, str]] = {
    "ca-file-unusable": ("PORTAL_SMTP_CA_FILE", "the CA file cannot be read or holds no CA"),
    "tls-verify-failed": (
        "PORTAL_SMTP_CA_FILE",
        "the relay's certificate is not trusted or not for PORTAL_SMTP_HOST",
    ),
    "tls-failed": (
        "PORTAL_SMTP_TLS",
        "the TLS handshake failed (implicit TLS on a STARTTLS port?)",
    ),
    "starttls-unavailable": ("PORTAL_SMTP_TLS", "the relay does not offer STARTTLS"),
    "auth-failed": ("PORTAL_SMTP_USERNAME / PORTAL_SMTP_PASSWORD", "the relay refused the login"),
    "auth-unavailable": ("PORTAL_SMTP_USERNAME", "the relay offers no usable AUTH"),
    "auth-required": ("PORTAL_SMTP_USERNAME / PORTAL_SMTP_PASSWORD", "the relay wants a login"),
    "sender-refused": ("PORTAL_MAIL_FROM", "the relay refuses the sender address"),
    "relay-denied": (
        "PORTAL_SMTP_USERNAME (and the relay's permissions for this host)",
        "the relay refuses to relay for this sender or host",
    ),
    "dkim-failed": ("PORTAL_DKIM_KEY", "the DKIM key cannot sign"),
    "timeout": (
        f"{RELAY_SETTINGS} (or PORTAL_NOTIFIER_LEASE)",
        "the relay stopped answering, or is slower than the lease allows",
    ),
}


class TransportFault(DeliveryError):
    """No notice can go out through the relay as configured; not any message's fault.

    ``setting`` names what an operator should check (``"PORTAL_SMTP_CA_FILE"``),
    ``advice`` says what the reason means; both are PHI-free.
    """

    def __init__(self, reason: str, smtp_code: int | None = None) -> None:
        super().__init__(reason, smtp_code)
        self.setting, self.advice = transport_advice(reason)


def transport_advice(reason: str) -> tuple[str, str]:
    """Return (the setting to check, what it means) for a transport fault's ``reason``."""
    return TRANSPORT_ADVICE.get(
        reason.partition(":")[0], (RELAY_SETTINGS, "the relay cannot be reached or used")
    )


class TransportConfigError(TransportFault, PermanentDeliveryError):
    """A misconfiguration (ours or the relay's): nothing goes out until a setting is fixed."""


class RelayUnavailable(TransportFault, TransientDeliveryError):
    """The relay cannot be reached or stopped answering: nothing goes out until it is back."""


def transport_fault(err: DeliveryError) -> TransportFault:
    """Return ``err`` as the TransportFault of the same reason and kind (itself if it is one)."""
    if isinstance(err, TransportFault):
        return err
    if isinstance(err, PermanentDeliveryError):
        return TransportConfigError(err.reason, err.smtp_code)
    return RelayUnavailable(err.reason, err.smtp_code)


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
    """The DeliveryError for an SMTP reply code: 4xx transient, 5xx (and others) permanent;
    421 (the relay is closing the channel, RFC 5321 3.8) is the relay's, not the notice's."""
    if code == SERVICE_CLOSING:
        return RelayUnavailable(prefix or f"smtp-4xx:{code}", code)
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


def _tls_broke(err: smtplib.SMTPServerDisconnected) -> bool:
    """Whether smtplib's disconnect was a TLS error other than an end of file (smtplib
    turns every socket error in a read or write into SMTPServerDisconnected)."""
    cause = err.__context__
    return isinstance(cause, ssl.SSLError) and not isinstance(
        cause, ssl.SSLEOFError | ssl.SSLZeroReturnError
    )


def _translate(err: Exception, connecting: bool) -> DeliveryError:
    """Turn an smtplib/ssl/socket error into our PHI-free DeliveryError.

    A TLS error after the handshake (a bad record, a reset inside TLS) is a lost
    connection to the relay, not a misconfiguration and not the notice's fault.
    """
    if isinstance(err, DeliveryError):
        return err
    if isinstance(err, ssl.SSLError):
        return _tls_error(err) if connecting else RelayUnavailable("connection-lost")
    if isinstance(err, smtplib.SMTPAuthenticationError):
        return _error_for_code(err.smtp_code, "auth-failed")
    if isinstance(err, smtplib.SMTPNotSupportedError):
        return PermanentDeliveryError("auth-unavailable")
    if isinstance(err, smtplib.SMTPResponseException):
        return _error_for_code(err.smtp_code)
    if isinstance(err, smtplib.SMTPServerDisconnected):
        if not connecting and _tls_broke(err):
            return RelayUnavailable("connection-lost")
        return TransientDeliveryError("connect-failed" if connecting else "connection-lost")
    if isinstance(err, smtplib.SMTPException):
        # smtplib raises the bare class when no AUTH mechanism is in common.
        return PermanentDeliveryError("auth-unavailable" if connecting else "smtp-error")
    if isinstance(err, TimeoutError) and not connecting:
        return RelayUnavailable("timeout")
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
    import dkim  # only with DKIM_KEY set: keeps `notifier run` start-up short

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
            raise TransportConfigError("dkim-failed") from None
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
    ``deadline`` (a ``time.monotonic()`` value, or None) bounds every send:
    each socket operation waits at most until then, so the worker's lease
    never runs out while a send is under way.
    """

    def __init__(self, settings: SmtpSettings, *, dkim_key: DkimKey | None = None) -> None:
        self.settings = settings
        self._dkim_key = dkim_key
        self._smtp: _BoundedSMTP | None = None
        self.connections_opened = 0
        self.deadline: float | None = None

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
            self._smtp.deadline = self.deadline
            try:
                return self._transmit(self._smtp, outgoing)
            except TransientDeliveryError as err:
                if err.reason != "connection-lost" and err.smtp_code != 421:
                    raise
                log.info("SMTP connection dropped by the server; reconnecting once")
        return self._transmit(self._connection(), outgoing)

    def open(self) -> None:
        """Connect now (TLS verified, logged in) unless connected: a probe of the relay.

        Raises a TransportFault when the relay cannot be used as configured.
        """
        self._connection()

    def close(self) -> None:
        """Say QUIT and close the connection, if one is open. Never raises."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        smtp.deadline = None  # QUIT after the last notice: the ordinary timeout
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()
        smtp.close()
        log.debug("SMTP connection closed")

    def _discard(self) -> None:
        """Drop the connection without QUIT (it is broken or the server refused to go on)."""
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    def _connection(self) -> _BoundedSMTP:
        """The open connection, or a new one: TLS negotiated, verified, authenticated."""
        if self._smtp is None:
            self._smtp = self._open()
            self.connections_opened += 1
        self._smtp.deadline = self.deadline
        return self._smtp

    def _open(self) -> _BoundedSMTP:
        """Connect, negotiate and verify TLS, EHLO, and log in when a username is set.

        Whatever fails here fails for every notice alike: raises a TransportFault.
        """
        s = self.settings
        try:
            context = _client_context(s.ca_file)
            with _delivery_errors(connecting=True):
                smtp = _connect(s, context, self.deadline)
                try:
                    if s.tls == "starttls":
                        _starttls(smtp, context)
                    smtp.ehlo()
                    if s.username is not None:
                        smtp.login(s.username, s.password or "")
                except BaseException:
                    smtp.close()
                    raise
        except DeliveryError as err:
            raise transport_fault(err) from None
        log.info("SMTP connection opened to %s:%d (tls=%s)", s.host, s.port, s.tls)
        return smtp

    def _transmit(self, smtp: smtplib.SMTP, outgoing: _Outgoing) -> str:
        """MAIL, RCPT for each recipient, DATA; on a refusal RSET and raise."""
        mail_accepted = False
        try:
            with _delivery_errors(connecting=False):
                options = _mail_options(smtp, outgoing)
                _expect_sender_accepted(smtp.mail(outgoing.sender, options))
                mail_accepted = True
                for rcpt in outgoing.recipients:
                    self._expect(smtp.rcpt(rcpt), (250, 251), at_rcpt=True)
                code, reply = smtp.data(outgoing.payload)  # SMTPDataError if DATA is refused
                self._expect((code, reply), (250,))
        except DeliveryError as err:
            err.mid_transaction = mail_accepted and isinstance(err, RelayUnavailable)
            self._end_refused_transaction(smtp, err)
            raise
        except BaseException:
            # Not the relay's answer (a bug, a signal): the transaction may be half done,
            # so the connection goes, or the next MAIL would meet "503 nested MAIL".
            self._discard()
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
    def _expect(
        response: tuple[int, bytes], accepted: tuple[int, ...], *, at_rcpt: bool = False
    ) -> None:
        """Raise the DeliveryError for ``response`` unless its code is in ``accepted``."""
        if response[0] in accepted:
            return
        if response[0] == AUTH_REQUIRED:
            raise TransportConfigError("auth-required", AUTH_REQUIRED)
        _raise_if_relay_denied(response, at_rcpt=at_rcpt)
        raise _error_for_code(response[0])


AUTH_REQUIRED = 530  # RFC 4954 section 6: "Authentication required"
TOO_BIG = 552  # RFC 1870 6: to MAIL FROM with SIZE, "message size exceeds fixed limit"
SERVICE_CLOSING = 421  # RFC 5321 3.8: the server is closing the transmission channel
# Enhanced status codes (RFC 3463) that refuse relaying itself, not one recipient:
# Exchange/Office 365's "unable to relay" (5.7.54) and "client not authenticated"
# (5.7.57) anywhere; 5.7.1 at RCPT is Postfix's "Relay access denied".
RELAY_DENIED = frozenset({"5.7.54", "5.7.57"})
RELAY_DENIED_AT_RCPT = RELAY_DENIED | {"5.7.1"}
_ENHANCED = re.compile(rb"\s*([245]\.\d{1,3}\.\d{1,3})(?![\d.])")


def enhanced_status(reply: bytes) -> str | None:
    """The RFC 3463 code a reply's text starts with (``"5.7.1"``), digits only; else None.
    Nothing else of the reply is kept (it can echo the recipient)."""
    match = _ENHANCED.match(reply)
    return match.group(1).decode("ascii") if match else None


def _raise_if_relay_denied(response: tuple[int, bytes], *, at_rcpt: bool) -> None:
    """Raise TransportConfigError("relay-denied:5.7.x") when the relay refuses to relay."""
    code, reply = response
    if not 500 <= code < 600:
        return
    status = enhanced_status(reply) if isinstance(reply, bytes) else None
    if status in (RELAY_DENIED_AT_RCPT if at_rcpt else RELAY_DENIED):
        raise TransportConfigError(f"relay-denied:{status}", code)


def _expect_sender_accepted(response: tuple[int, bytes]) -> None:
    """MAIL FROM names our one sender, so a 5xx to it refuses every notice, and a 4xx
    defers every notice: both are TransportFaults, never one row's failure."""
    code = response[0]
    if code == 250:
        return
    if code == AUTH_REQUIRED:
        raise TransportConfigError("auth-required", code)
    _raise_if_relay_denied(response, at_rcpt=False)
    if code == TOO_BIG:  # the SIZE we declared: this message is too big, not the sender
        raise PermanentDeliveryError(f"smtp-5xx:{code}", code)
    if 500 <= code < 600:
        raise TransportConfigError(f"sender-refused:{code}", code)
    if 400 <= code < 500:
        raise RelayUnavailable(f"smtp-4xx:{code}", code)
    raise _error_for_code(code)


def _bounded(limit: float, deadline: float | None) -> float:
    """The timeout for the next socket operation: ``limit``, less if ``deadline`` is nearer.

    Raises TimeoutError once the deadline has passed.
    """
    if deadline is None:
        return limit
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("send deadline reached")
    return min(limit, left)


def _arm(smtp: _BoundedSMTP) -> None:
    """Let the next socket operation wait no longer than the deadline allows."""
    smtp.timeout = _bounded(smtp.limit, smtp.deadline)
    if smtp.sock is not None:
        smtp.sock.settimeout(smtp.timeout)


class _BoundedSMTP(smtplib.SMTP):
    """smtplib's client whose every read and write ends by ``deadline`` (monotonic seconds).

    ``limit`` is the configured per-operation timeout. smtplib turns a timed-out
    read or write into SMTPServerDisconnected; it is raised as the TimeoutError it was.
    """

    def __init__(
        self, host: str, port: int, *, limit: float, deadline: float | None, **options: Any
    ) -> None:
        self.limit, self.deadline = limit, deadline
        # Connects, bounded as every later operation (the greeting goes through getreply).
        super().__init__(host, port, timeout=_bounded(limit, deadline), **options)

    def send(self, s: Any) -> None:
        _arm(self)
        try:
            super().send(s)
        except smtplib.SMTPServerDisconnected as err:
            _timed_out(err)
            raise

    def getreply(self) -> tuple[int, bytes]:
        _arm(self)
        try:
            return super().getreply()
        except smtplib.SMTPServerDisconnected as err:
            _timed_out(err)
            raise


class _BoundedSMTPSSL(_BoundedSMTP, smtplib.SMTP_SSL):
    """:class:`_BoundedSMTP` over implicit TLS."""


def _timed_out(err: smtplib.SMTPServerDisconnected) -> None:
    """Raise TimeoutError when smtplib's disconnect was a socket timeout."""
    if isinstance(err.__context__, TimeoutError):
        raise TimeoutError("the relay did not answer in time") from None


def _client_context(ca_file: str | None) -> ssl.SSLContext:
    """``tls_context(ca_file)``, with an unreadable or invalid CA file as a permanent error."""
    try:
        return tls_context(ca_file)
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        raise PermanentDeliveryError("ca-file-unusable") from None


def _connect(s: SmtpSettings, context: ssl.SSLContext, deadline: float | None) -> _BoundedSMTP:
    """Open the TCP connection, by ``deadline``; with implicit TLS the handshake (and
    verification) too. Raises SMTPConnectError unless the server greets with 220."""
    if s.tls == "implicit":
        return _BoundedSMTPSSL(
            s.host,
            s.port,
            limit=s.timeout,
            deadline=deadline,
            local_hostname=s.local_hostname,
            context=context,
        )
    return _BoundedSMTP(
        s.host, s.port, limit=s.timeout, deadline=deadline, local_hostname=s.local_hostname
    )


def _starttls(smtp: _BoundedSMTP, context: ssl.SSLContext) -> None:
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
