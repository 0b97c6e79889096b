"""Browser-test helpers: the served portal with its mail sink, and the viewports."""

from __future__ import annotations

import email.policy
import mailbox
import re
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

from flask import Flask

from notifier.sink import MailSink

_LINK = re.compile(r"https?://\S+/p/[A-Za-z0-9_\-]+")


@dataclass
class Portal:
    """The portal serving on ``base_url`` from a background thread, and its mail sink."""

    app: Flask
    base_url: str
    sink: MailSink

    def mails(self) -> list[EmailMessage]:
        """Every message the sink stored, oldest first."""
        box = mailbox.Maildir(self.sink.maildir, factory=None, create=False)
        parsed = [
            BytesParser(policy=email.policy.default).parsebytes(box.get_bytes(key))
            for key in sorted(box.keys())
        ]
        return [m for m in parsed if isinstance(m, EmailMessage)]

    def link_in_mail_to(self, address: str, known: int) -> str:
        """The pickup link in the plain-text part of the newest mail to ``address``.

        ``known`` is how many mails the sink held before: exactly one more must have arrived.
        """
        mails = self.mails()
        assert len(mails) == known + 1, f"expected one new mail, the sink holds {len(mails)}"
        to_them = [m for m in mails if address in str(m["To"])]
        assert to_them, f"no mail to {address}"
        part = to_them[-1].get_body(preferencelist=("plain",))
        assert part is not None, "the notice has no plain-text part"
        text = part.get_content()
        found = _LINK.findall(text)
        assert len(found) == 1, f"expected one pickup link in the notice, found {len(found)}"
        assert found[0].startswith(self.base_url + "/p/")
        return str(found[0])


VIEWPORTS: dict[str, dict[str, Any]] = {
    "desktop": {"viewport": {"width": 1280, "height": 800}},
    "phone": {
        "viewport": {"width": 360, "height": 740},
        "is_mobile": True,
        "has_touch": True,
        "device_scale_factor": 2,
    },
}
