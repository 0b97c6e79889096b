"""Bounce helpers: delivery status notifications as relays write them, odd ones included,
and the state of a bounce Maildir as a test reads it."""

from __future__ import annotations

import base64
import mailbox
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

from notifier import dsn
from notifier.smtp import make_message_id

RELAY = "mx.relay.example.net"
DOMAIN = "portal.example.org"


def original(message_id: str, to: str = "zq@example.org", subject: str = "A message") -> bytes:
    """A notice as a relay returns it: the headers that matter and a short body."""
    return (
        f"From: Riverside <no-reply@portal.example.org>\r\nTo: {to}\r\n"
        f"Subject: {subject}\r\nMessage-ID: {message_id}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nA secure message is waiting.\r\n"
    ).encode()


def report(
    message_id: str,
    bounce: dsn.Bounce = dsn.HARD,
    *,
    to: str = "zq@example.org",
    headers_only: bool = False,
) -> bytes:
    """The DSN a relay sends about the notice ``message_id`` to ``to``."""
    return dsn.build(
        original(message_id, to),
        recipient=to,
        bounce=bounce,
        to="no-reply@portal.example.org",
        reporting_mta=RELAY,
        headers_only=headers_only,
    )


def handmade(
    status_part: bytes, returned: bytes = b"", *, report_type: str = "delivery-status"
) -> bytes:
    """A multipart/report whose delivery-status part (headers, blank line, body) and returned
    part are given as raw bytes, for the encodings and shapes dsn.build never writes."""
    parts = [
        b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"Zustellung fehlgeschlagen: \xe4\xf6\xfc\r\n",
        status_part,
    ]
    if returned:
        parts.append(returned)
    body = b"".join(b"--XYZ\r\n" + part + b"\r\n" for part in parts) + b"--XYZ--\r\n"
    head = (
        b"From: MAILER-DAEMON@" + RELAY.encode() + b"\r\nTo: no-reply@portal.example.org\r\n"
        b"Subject: Undeliverable\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/report; report-type=" + report_type.encode() + b";\r\n"
        b' boundary="XYZ"\r\n\r\n'
    )
    return head + body


def recipient_block(
    action: str = "failed", status: str = "5.1.1", to: str = "zq@example.org"
) -> bytes:
    """The per-message and per-recipient blocks of a delivery-status part."""
    return (
        f"Reporting-MTA: dns; {RELAY}\r\n\r\n"
        f"Final-Recipient: rfc822; {to}\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; 550 {status} <{to}>: no such user\r\n"
    ).encode()


def encoded(content_type: str, encoding: str, payload: bytes) -> bytes:
    """A part of ``content_type`` with ``payload`` in ``encoding`` (base64 or 7bit)."""
    body = base64.encodebytes(payload) if encoding == "base64" else payload
    return (
        f"Content-Type: {content_type}\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n".encode()
        + body
    )


def deliver(root: Path, raw: bytes) -> str:
    """Deliver ``raw`` into the Maildir ``root`` as an MDA does (tmp/, then new/); its key."""
    return mailbox.Maildir(root, create=True).add(raw)


@dataclass(frozen=True)
class MaildirState:
    """File names in a Maildir's new/ and cur/."""

    new: list[str]
    cur: list[str]

    def flagged(self, info: str) -> list[str]:
        """Names in cur/ whose Maildir info is exactly ``info`` (":2,S", ":2,F", ":2,")."""
        return [name for name in self.cur if name.endswith(info)]


def state(root: Path) -> MaildirState:
    """What is in ``root``'s new/ and cur/ now."""
    return MaildirState(sorted(os.listdir(root / "new")), sorted(os.listdir(root / "cur")))


# -- mail a bounce Maildir may receive; each builder takes our notice's Message-ID ----------


def _foreign(notice: str) -> bytes:
    return report("<CAF9f3k2@example.com>")


def _unknown(notice: str) -> bytes:
    return report(make_message_id(uuid4().hex, DOMAIN))


def _no_returned_part(notice: str) -> bytes:
    return handmade(encoded("message/delivery-status", "7bit", recipient_block()))


def _no_status(notice: str) -> bytes:
    block = recipient_block().replace(b"Status: 5.1.1\r\n", b"")
    returned = encoded("text/rfc822-headers", "7bit", original(notice))
    return handmade(encoded("message/delivery-status", "7bit", block), returned)


def _auto_reply(notice: str) -> bytes:
    return (
        f"From: zq@example.org\r\nTo: no-reply@{DOMAIN}\r\nSubject: Out of office\r\n"
        f"In-Reply-To: {notice}\r\nAuto-Submitted: auto-replied\r\n\r\nBack on Monday.\r\n"
    ).encode()


def _huge(notice: str) -> bytes:
    padding = b"Content-Type: text/plain\r\n\r\n" + b"x" * (dsn.MAX_BYTES + 10)
    return handmade(padding, report(notice))


def _nested(notice: str) -> bytes:
    head = b'Content-Type: multipart/report; report-type=delivery-status; boundary="b0"\r\n\r\n'
    parts = b"".join(
        b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (n, n + 1)
        for n in range(900)  # the review's stalling input, and still under MAX_BYTES
    )
    assert len(head + parts) < dsn.MAX_BYTES
    return head + parts


def _many_parts(notice: str) -> bytes:
    flat = b"".join(
        b"--b0\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(dsn.MAX_PARTS + 1)
    )
    head = b'Content-Type: multipart/report; report-type=delivery-status; boundary="b0"\r\n\r\n'
    return head + flat + b"--b0--\r\n"


def _bad_base64(notice: str) -> bytes:
    status = b"Content-Type: message/delivery-status\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    return handmade(status + b"%%%% not base64 \xff\xfe %%%%\r\n")


def _garbage(notice: str) -> bytes:
    return bytes(range(256)) * 16


def _empty(notice: str) -> bytes:
    return b""


SET_ASIDE: dict[str, Callable[[str], bytes]] = {
    "foreign-message-id": _foreign,
    "unknown-notice": _unknown,
    "no-returned-part": _no_returned_part,
    "no-status": _no_status,
    "auto-reply": _auto_reply,
    "huge": _huge,
    "nested-mime": _nested,
    "many-parts": _many_parts,
    "bad-base64": _bad_base64,
    "binary": _garbage,
    "empty": _empty,
}


def _base64_status(notice: str) -> bytes:
    returned = encoded("text/rfc822-headers", "7bit", original(notice))
    return handmade(encoded("message/delivery-status", "base64", recipient_block()), returned)


def _global(notice: str) -> bytes:
    block = recipient_block(to="zoë@exämple.org")
    returned = encoded("message/global-headers", "base64", original(notice))
    status = encoded("message/global-delivery-status", "base64", block)
    return handmade(status, returned, report_type="global-delivery-status")


def _folded_lf(notice: str) -> bytes:
    raw = report(notice).replace(b"\r\n", b"\n")
    return raw.replace(f"Message-ID: {notice}".encode(), f"Message-ID:\n\t{notice}".encode())


def _headers_only(notice: str) -> bytes:
    return report(notice, headers_only=True)


ODD_BUT_VALID: dict[str, Callable[[str], bytes]] = {
    "base64-status": _base64_status,
    "rfc6533-global": _global,
    "lf-and-folded": _folded_lf,
    "headers-only": _headers_only,
}
