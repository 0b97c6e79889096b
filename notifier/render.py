"""Render a notice into an email from ``templates/email/<kind>/`` and a PHI-free context.

Each kind has one context function. It receives only what may appear in a
notice (the organisation's name, address and support contact, the link and
its expiry) and returns only that: no patient name, subject or content can
reach a template by construction. :mod:`notifier.phi` checks the result anyway.

It runs once per notice: templates are compiled once (jinja2 re-reads a file that
changed), and messages are built with a policy that makes each header class once
(email's own registry makes a new class for every header, a third of the cost of
building a notice), parses each constant header value once and folds each header
once.
"""

from __future__ import annotations

import functools
import secrets
import sys
from collections.abc import Callable
from datetime import datetime
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage
from email.policy import EmailPolicy, Policy
from email.utils import format_datetime, formataddr
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from notifier.smtp import make_message_id
from portal.database import utcnow
from portal.models import Notification
from portal.models.notifications import NoticeKind
from portal.paths import asset_dir

# Link lifetimes the notices state; tests check they match portal.services.account_links.
INVITE_VALID_HOURS = 72
RESET_VALID_MINUTES = 60
PARTS = ("subject.txt", "body.txt", "body.html")

Context = dict[str, Any]


def template_dir(kind: str) -> Path:
    """Return the folder of ``kind``'s templates; FileNotFoundError for a broken install,
    ValueError for an unknown kind."""
    return _email_templates() / NoticeKind(kind).value


@functools.cache
def _email_templates() -> Path:
    return asset_dir("templates") / "email"  # where the install put them: fixed for the process


class _FoldedOnce(BaseHeader):
    """A header that folds itself once per policy: the notices of a pass share their
    constant headers (see _NoticePolicy), and SMTP flattens each message again."""

    def fold(self, *, policy: Policy[Any]) -> str:
        folded: dict[int, tuple[Policy[Any], str]] = self.__dict__.setdefault("_folded", {})
        hit = folded.get(id(policy))
        if hit is None or hit[0] is not policy:
            hit = folded[id(policy)] = (policy, super().fold(policy=policy))
        return hit[1]


class _HeaderClasses(HeaderRegistry):
    """email's header registry, remembering the class it makes for each header name (the
    standard one builds a new one with ``type()`` for every header it parses)."""

    MAX_NAMES = 64  # a notice has a dozen header names; never grow without bound

    def __init__(self) -> None:
        super().__init__(base_class=_FoldedOnce)
        self._made: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        found = self._made.get(name.lower())
        if found is None:
            found = super().__getitem__(name)
            if len(self._made) < self.MAX_NAMES:
                self._made[name.lower()] = found
        return found


class _NoticePolicy(EmailPolicy):
    """email.policy.default (what EmailMessage() uses), parsing each header value once.

    Most of a notice's headers are the same on every notice of a kind (Subject, From,
    the MIME headers), so their parsed form is shared. Never the addresses (PHI) nor
    the Message-ID (one per notice).
    """

    def header_store_parse(self, name: str, value: Any) -> tuple[str, Any]:
        if not isinstance(value, str) or name.lower() in _NEVER_SHARED or "boundary=" in value:
            return super().header_store_parse(name, value)  # a boundary is one message's
        key = (name, value)
        found = _SHARED.get(key)
        if found is None:
            if len(_SHARED) >= MAX_SHARED:
                _SHARED.clear()
            found = _SHARED[key] = super().header_store_parse(name, value)
        return found


_NEVER_SHARED = frozenset({"to", "cc", "bcc", "reply-to", "sender", "message-id"})
MAX_SHARED = 256  # header values kept parsed (a Date per second is the only churn)
_SHARED: dict[tuple[str, str], tuple[str, Any]] = {}
POLICY = _NoticePolicy(header_factory=_HeaderClasses())


@functools.lru_cache(maxsize=4)
def _environment(root: str) -> Environment:
    return Environment(
        loader=FileSystemLoader(root),
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
    )


def expiry_text(moment: datetime | None) -> str:
    """Return ``moment`` as an unambiguous UTC date such as ``7 June 2031`` ("" for None)."""
    if moment is None:
        return ""
    return f"{moment.day} {moment:%B %Y}"


def _base(*, url: str, org_name: str, org_address: str, support_contact: str) -> Context:
    return {
        "url": url,
        "org_name": org_name,
        "org_address": org_address,
        "support_contact": support_contact,
    }


def pickup_context(
    *, url: str, org_name: str, org_address: str, support_contact: str, expires_at: datetime | None
) -> Context:
    """Return the context of a pickup notice: organisation, link, expiry date. No PHI."""
    return {
        **_base(
            url=url, org_name=org_name, org_address=org_address, support_contact=support_contact
        ),
        "expires_on": expiry_text(expires_at),
    }


def reminder_context(
    *, url: str, org_name: str, org_address: str, support_contact: str, expires_at: datetime | None
) -> Context:
    """Return the context of a reminder: the same fields as a pickup notice. No PHI."""
    return pickup_context(
        url=url,
        org_name=org_name,
        org_address=org_address,
        support_contact=support_contact,
        expires_at=expires_at,
    )


def invite_context(
    *, url: str, org_name: str, org_address: str, support_contact: str, expires_at: datetime | None
) -> Context:
    """Return the context of a staff invitation: organisation, link, validity in hours."""
    return {
        **_base(
            url=url, org_name=org_name, org_address=org_address, support_contact=support_contact
        ),
        "valid_hours": INVITE_VALID_HOURS,
    }


def reset_context(
    *, url: str, org_name: str, org_address: str, support_contact: str, expires_at: datetime | None
) -> Context:
    """Return the context of a password reset: organisation, link, validity in minutes."""
    return {
        **_base(
            url=url, org_name=org_name, org_address=org_address, support_contact=support_contact
        ),
        "valid_minutes": RESET_VALID_MINUTES,
    }


def reply_context(
    *, url: str, org_name: str, org_address: str, support_contact: str, expires_at: datetime | None
) -> Context:
    """Return the context of a notice to staff of a patient's message (a reply, or a new
    conversation with their team): organisation and the conversation's link only."""
    return {"url": url, "org_name": org_name}


def credential_changed_context(
    *, url: str, org_name: str, org_address: str, support_contact: str, expires_at: datetime | None
) -> Context:
    """Return the context of a "your password / sign-in settings changed" notice.

    Organisation, whom to contact, and the portal's address: no name, no time,
    nothing about the account beyond the fact of the change (ASVS 2.2.3).
    """
    return _base(
        url=url, org_name=org_name, org_address=org_address, support_contact=support_contact
    )


def account_locked_context(
    *, url: str, org_name: str, org_address: str, support_contact: str, expires_at: datetime | None
) -> Context:
    """Return the context of a "your account was locked" notice.

    Organisation, whom to contact to unlock it, and the portal's address: no
    name, no time, no count of attempts, no address they came from.
    """
    return _base(
        url=url, org_name=org_name, org_address=org_address, support_contact=support_contact
    )


CONTEXTS: dict[str, Callable[..., Context]] = {
    NoticeKind.PICKUP: pickup_context,
    NoticeKind.REMINDER: reminder_context,
    NoticeKind.INVITE: invite_context,
    NoticeKind.RESET: reset_context,
    NoticeKind.REPLY: reply_context,
    NoticeKind.TEAM_MESSAGE: reply_context,
    NoticeKind.MFA_CHANGED: credential_changed_context,
    NoticeKind.PASSWORD_CHANGED: credential_changed_context,
    NoticeKind.ACCOUNT_LOCKED: account_locked_context,
}


def render_parts(kind: str, context: Context) -> tuple[str, str, str]:
    """Return (subject, plain text, HTML) of ``kind`` rendered with ``context``.

    Raises jinja2.TemplateError for a broken template or a missing variable.
    """
    env = _environment(str(template_dir(kind)))
    subject, text, html = (env.get_template(name).render(context) for name in PARTS)
    return " ".join(subject.split()), text, html


def render(
    notification: Notification,
    *,
    url: str,
    org_name: str,
    org_address: str,
    support_contact: str,
    expires_at: datetime | None,
    mail_from: str,
    to_address: str,
    message_id_domain: str,
    now: datetime | None = None,
) -> EmailMessage:
    """Return the notice email: plain text with an HTML alternative, and its headers.

    The Message-ID is derived from the notice's public id, so a retried notice
    keeps it. Raises jinja2.TemplateError for a broken template, ValueError for
    an unknown kind or a domain unusable in a Message-ID.
    """
    context = CONTEXTS[NoticeKind(notification.kind)](
        url=url,
        org_name=org_name,
        org_address=org_address,
        support_contact=support_contact,
        expires_at=expires_at,
    )
    subject, text, html = render_parts(notification.kind, context)
    msg = EmailMessage(policy=POLICY)
    msg["Subject"] = subject
    msg["From"] = formataddr((org_name, mail_from))
    msg["To"] = to_address
    msg["Date"] = format_datetime(now or utcnow())
    msg["Message-ID"] = make_message_id(notification.public_id, message_id_domain)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies, please
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    msg.set_boundary(_boundary(msg))
    return msg


def _boundary(msg: EmailMessage) -> str:
    """A MIME boundary found in none of ``msg``'s parts, shaped as email's generator makes
    them. Chosen here because the generator, left to choose, compiles a regular expression
    for every message (its boundary is random) to check it: a tenth of a notice's cost."""
    payloads = [str(part.get_payload()) for part in msg.iter_parts()]
    while True:
        boundary = "=" * 15 + f"{secrets.randbelow(sys.maxsize):019d}" + "=="
        if not any(boundary in payload for payload in payloads):
            return boundary


def readable_texts(msg: EmailMessage) -> list[str]:
    """Return what a reader of ``msg`` sees: Subject, From, and both bodies (HTML as sent)."""
    texts = [str(msg.get("Subject", "")), str(msg.get("From", ""))]
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            texts.append(part.get_content())
    return texts
