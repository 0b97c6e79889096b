"""Delivery status notifications (RFC 3464): read one for matching, or write one as a relay.

A DSN is a ``multipart/report; report-type=delivery-status`` (RFC 6522). Its
``message/delivery-status`` part holds a block of per-message fields, then one
block per recipient (``Final-Recipient``, ``Action``, ``Status``); its
optional last part returns the message (``message/rfc822``) or only its
headers (``text/rfc822-headers``), whose Message-ID names our notice. Relays
that speak SMTPUTF8 send the ``global`` variants of each part (RFC 6533).

:func:`parse` keeps what matching needs and nothing else: how severe the
report is, the status code (RFC 3463) and the notice id in the returned
Message-ID. Diagnostic texts (which name the patient) are read only to check
the report's shape and are never returned; the recipient addresses are
returned only to be compared in memory with the notice's, never logged or stored.
Every way a mail can fail to be a usable DSN is a :class:`DsnError` whose
``reason`` is a fixed word.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.parser import BytesParser, HeaderParser
from email.utils import collapse_rfc2231_value, format_datetime, make_msgid
from enum import StrEnum

# A DSN for one notice is a few KiB even with the notice returned. The stdlib parser's
# cost grows with lines times nesting depth, so a big or deeply nested mail is refused
# (kept aside unparsed) before it reaches the parser: a crafted one cannot stall sending.
MAX_BYTES = 64 * 1024
MAX_MULTIPARTS = 8  # the report, and a returned notice's alternative/mixed/related
MAX_PARTS = 64  # boundary lines (``--boundary``) in the whole mail
_MULTIPART = re.compile(rb"(?im)^content-type:\s*multipart/")
_DELIMITER = re.compile(rb"(?m)^--")
REPORT_TYPES = frozenset({"delivery-status", "global-delivery-status"})
# The email package parses the body of every message/* part itself (delivery-status into
# header blocks, the others into a message), which garbles a transfer-encoded one (RFC 6533
# allows base64 and quoted-printable). Renamed before parsing, these parts stay leaves whose
# bytes are decoded first and then read as headers.
_LEAF_TYPES = re.compile(
    rb"(?im)^(content-type:\s*)message/"
    rb"((?:global-)?delivery-status|rfc822|global(?:-headers)?)(?![\w-])"
)
_LEAF = "application/x-leaf-"
STATUS_PARTS = frozenset({f"{_LEAF}delivery-status", f"{_LEAF}global-delivery-status"})
RETURNED_PARTS = frozenset(
    {f"{_LEAF}rfc822", f"{_LEAF}global", "text/rfc822-headers", f"{_LEAF}global-headers"}
)
_STATUS = re.compile(r"([245])\.\d{1,3}\.\d{1,3}")  # RFC 3463 class.subject.detail
_NOTICE_MESSAGE_ID = re.compile(r"<notice-([A-Za-z0-9._-]{1,128})@([A-Za-z0-9.-]{1,253})>")
_BLOCK_BREAK = re.compile(r"\n(?:[ \t]*\n)+")
# Compat32 keeps every header as the raw text it was, and never raises on reading one.
_RAW = email.policy.compat32


class Severity(StrEnum):
    """What a report means for its notice."""

    HARD = "hard"  # Action: failed with a 5.x.x status: the address does not work
    SOFT = "soft"  # Action: failed with 4.x.x: the relay gave up; worth another attempt
    DELAYED = "delayed"  # Action: delayed: the relay is still trying; nothing to resend
    NONE = "none"  # delivered, relayed or expanded: nothing went wrong


_RANK = {Severity.NONE: 0, Severity.DELAYED: 1, Severity.SOFT: 2, Severity.HARD: 3}


class DsnError(ValueError):
    """The mail is no usable DSN; ``reason`` says how (``not-dsn``, ``malformed``,
    ``too-large``, ``too-complex``) and is the only text the error carries."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Report:
    """A DSN reduced to what matching needs: no diagnostic text.

    ``recipients`` (the lowercased Final-Recipient and Original-Recipient
    addresses) is only for comparing in memory with the notice's address: it is
    left out of repr and equality, and is never logged or stored.
    """

    severity: Severity
    status: str  # the RFC 3463 code of the most severe recipient, such as "5.1.1"
    notice_id: str | None  # public id from the returned <notice-{id}@domain>, if any
    recipients: frozenset[str] = field(default=frozenset(), repr=False, compare=False)


def notice_id_of(message_id: str, domain: str | None = None) -> str | None:
    """Return the notice id in one of our Message-IDs (smtp.make_message_id), else None;
    with ``domain``, only when the Message-ID's domain is it (case-insensitive)."""
    match = _NOTICE_MESSAGE_ID.fullmatch(message_id.strip())
    if match is None:
        return None
    if domain is not None and match.group(2).lower() != domain.lower():
        return None
    return match.group(1)


def parse(raw: bytes, domain: str | None = None) -> Report:
    """Return the report in the DSN ``raw``; raises DsnError for anything else.

    Accepts the RFC 3464 and RFC 6533 (global) forms, with any transfer
    encoding. The most severe recipient block decides. With ``domain`` (our
    sender's), a returned Message-ID of another domain names no notice. Never raises anything
    but DsnError, whatever the input (the email package's own errors, deep
    nesting, undecodable parts are all ``malformed``).
    """
    prescan(raw)
    try:
        leaf = _LEAF_TYPES.sub(rb"\1" + _LEAF.encode() + rb"\2", raw)
        message = BytesParser(policy=_RAW).parsebytes(leaf)
        return _report(message, domain)
    except DsnError:
        raise
    except Exception:  # RecursionError, LookupError, binascii.Error...: the mail's fault
        raise DsnError("malformed") from None


def prescan(raw: bytes) -> None:
    """Raise DsnError unless ``raw`` is small and shallow enough to parse.

    Counts on the raw bytes (linear, no parsing): more than MAX_BYTES is
    ``too-large``; more than MAX_MULTIPARTS multipart declarations (which bound
    the nesting depth) or MAX_PARTS boundary lines is ``too-complex``.
    """
    if len(raw) > MAX_BYTES:
        raise DsnError("too-large")
    if len(_MULTIPART.findall(raw)) > MAX_MULTIPARTS or len(_DELIMITER.findall(raw)) > MAX_PARTS:
        raise DsnError("too-complex")


def _report(message: Message, domain: str | None) -> Report:
    report_type = message.get_param("report-type")
    kind = str(collapse_rfc2231_value(report_type)).lower() if report_type else ""
    if message.get_content_type() != "multipart/report" or kind not in REPORT_TYPES:
        raise DsnError("not-dsn")
    payload = message.get_payload()
    if not isinstance(payload, list):
        raise DsnError("malformed")
    parts = [p for p in payload if isinstance(p, Message)]
    statuses = [p for p in parts if p.get_content_type() in STATUS_PARTS]
    if not statuses:
        raise DsnError("malformed")
    blocks = _blocks(statuses[0])[1:]
    valid = [r for r in (_recipient(block) for block in blocks) if r is not None]
    if not valid:
        raise DsnError("malformed")
    severity, status = max(valid, key=lambda r: _RANK[r[0]])
    addresses = frozenset(a for block in blocks for a in _addresses(block))
    return Report(severity, status, _returned_notice_id(parts, domain), addresses)


def _addresses(block: Message) -> list[str]:
    """The lowercased addresses of a block's Final-Recipient and Original-Recipient
    (``rfc822; name@host``); other address types are skipped."""
    found = []
    for name in ("Final-Recipient", "Original-Recipient"):
        kind, _, address = str(block.get(name, "")).partition(";")
        if kind.strip().lower() in ("rfc822", "utf-8") and address.strip():
            found.append(address.strip().strip("<>").lower())
    return found


def _recipient(block: Message) -> tuple[Severity, str] | None:
    """(severity, status) of one per-recipient block; None when a required field is missing."""
    action = str(block.get("Action", "")).split()
    status = _STATUS.match(str(block.get("Status", "")).strip())
    if not action or status is None or ";" not in str(block.get("Final-Recipient", "")):
        return None
    verb, code = action[0].lower(), status.group(0)
    if verb == "failed" and code[0] == "5":
        return Severity.HARD, code
    if verb == "failed" and code[0] == "4":
        return Severity.SOFT, code
    if verb == "delayed":
        return Severity.DELAYED, code
    if verb in ("delivered", "relayed", "expanded"):
        return Severity.NONE, code
    return None  # an unknown action, or failed with a 2.x.x success code


def _blocks(part: Message) -> list[Message]:
    """The header blocks of a delivery-status part, decoded whatever its transfer encoding."""
    text = _body_text(part).replace("\r\n", "\n").strip()
    parser = HeaderParser(policy=_RAW)
    return [parser.parsestr(chunk + "\n") for chunk in _BLOCK_BREAK.split(text) if chunk.strip()]


def _returned_notice_id(parts: list[Message], domain: str | None) -> str | None:
    """The notice id in the Message-ID of the returned message or headers, if any."""
    for part in parts:
        if part.get_content_type() in RETURNED_PARTS:
            headers = HeaderParser(policy=_RAW).parsestr(_body_text(part))
            return notice_id_of(str(headers.get("Message-ID", "")), domain)
    return None


def _body_text(part: Message) -> str:
    """The body of a leaf ``part`` as text, its Content-Transfer-Encoding undone."""
    if part.is_multipart():
        raise DsnError("malformed")
    body = part.get_payload(decode=True)
    return body.decode("utf-8", "replace") if isinstance(body, bytes) else ""


# -- writing one, as a relay does (the mail sink, the tests) -------------------------------

SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
}


@dataclass(frozen=True)
class Bounce:
    """What a relay reports about one recipient: ``action`` (failed or delayed), the
    RFC 3463 ``status`` and the remote server's ``reply`` (its Diagnostic-Code)."""

    action: str
    status: str
    reply: str


HARD = Bounce(
    "failed", "5.1.1", "550 5.1.1 The email account that you tried to reach does not exist"
)
SOFT = Bounce("failed", "4.2.2", "452 4.2.2 The recipient's mailbox is full, try again later")
DELAYED = Bounce("delayed", "4.4.1", "421 4.4.1 Connection timed out, still trying")


def build(
    original: bytes,
    *,
    recipient: str,
    bounce: Bounce,
    to: str,
    reporting_mta: str = "localhost",
    headers_only: bool = False,
    now: datetime | None = None,
) -> bytes:
    """Return the RFC 3464 DSN a relay on ``reporting_mta`` sends to ``to`` (the return
    path) about ``original`` for ``recipient``: a human-readable part, the
    delivery-status part and the original message (or, ``headers_only``, its headers)."""
    now = now or datetime.now(UTC)
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = to
    report["Subject"] = SUBJECTS.get(bounce.action, "Delivery Status Notification")
    report["Date"] = format_datetime(now)
    report["Message-ID"] = make_msgid(domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"
    report.attach(_text(_explanation(recipient, bounce, reporting_mta), "plain"))
    report.attach(_status_part(recipient, bounce, reporting_mta, now))
    returned = BytesParser(policy=_RAW).parsebytes(original, headersonly=headers_only)
    if headers_only:
        headers = "".join(f"{name}: {value}\n" for name, value in returned.items())
        report.attach(_text(headers, "rfc822-headers"))
    else:
        report.attach(MIMEMessage(returned))
    return report.as_bytes(policy=_RAW.clone(linesep="\r\n"))


def _text(body: str, subtype: str) -> MIMEText:
    """A text part, 7bit when it is ASCII (as relays write them), else UTF-8 in base64."""
    return MIMEText(body, subtype, "us-ascii" if body.isascii() else "utf-8")


OPENINGS = {
    "failed": "Your message could not be delivered to one or more recipients.",
    "delayed": "Your message could not be delivered yet; the system will keep trying.",
}


def _explanation(recipient: str, bounce: Bounce, reporting_mta: str) -> str:
    opening = OPENINGS.get(bounce.action, "Your message was delivered.")
    return (
        f"This is the mail system at host {reporting_mta}.\n\n{opening}\n\n"
        f"<{recipient}>: host mx.{recipient.rpartition('@')[2]} said: {bounce.reply}\n"
    )


def _status_part(recipient: str, bounce: Bounce, reporting_mta: str, now: datetime) -> Message:
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    per_message["Arrival-Date"] = format_datetime(now)
    per_recipient = Message()
    per_recipient["Final-Recipient"] = f"rfc822; {recipient}"
    per_recipient["Original-Recipient"] = f"rfc822; {recipient}"
    per_recipient["Action"] = bounce.action
    per_recipient["Status"] = bounce.status
    per_recipient["Remote-MTA"] = f"dns; mx.{recipient.rpartition('@')[2]}"
    per_recipient["Diagnostic-Code"] = f"smtp; {bounce.reply}"
    part = Message()
    part["Content-Type"] = "message/delivery-status"
    part.set_payload([per_message, per_recipient])
    return part
