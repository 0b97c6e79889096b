"""PDF documents rendered with WeasyPrint: a message as a letter, and an accounting of disclosures.

Nothing a message body holds can make WeasyPrint fetch anything. The body is
rendered from plain text or Markdown without raw HTML, sanitised to a tag
allowlist without images, styles or scripts; and whatever still asks for a
resource goes through :class:`SafeURLFetcher`, which serves only the portal's
own bundled static files (no network, no other file: OWASP ASVS 5.2.6, SSRF).

Templates come from a standalone Jinja environment (no Flask app context
needed), so the CLI, the notifier and the web views can all render.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import nh3
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markdown_it import MarkdownIt
from markupsafe import Markup
from weasyprint import HTML
from weasyprint.urls import URLFetcher, URLFetcherResponse

from portal.paths import asset_dir

STATIC_SCHEME = "portal-static"  # portal-static:///css/pdf.css names static/css/pdf.css
MAX_ASSET_BYTES = 2 * 1024 * 1024  # bundled stylesheets, fonts and logos are far smaller
FETCH_TIMEOUT_SECONDS = 10

BODY_TAGS = {
    "p",
    "br",
    "hr",
    "strong",
    "em",
    "ul",
    "ol",
    "li",
    "h1",
    "h2",
    "h3",
    "h4",
    "blockquote",
    "code",
    "pre",
    "a",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
}
LINK_SCHEMES = ("http://", "https://", "mailto:")


# --- Fetching: the portal's own static files, nothing else -------------------------------------


def static_asset_path(url: str) -> Path:
    """Return the file inside static/ that ``url`` names, resolved (symlinks followed).

    Accepts ``portal-static:///<path>`` and ``file://`` URLs. Raises ValueError
    for any other scheme, a host, a path that leaves static/ (``..``, a
    symlink), or a file that is missing or larger than MAX_ASSET_BYTES. The
    message never repeats the URL.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    root = asset_dir("static").resolve()
    if scheme == STATIC_SCHEME and not parts.netloc:
        candidate = root / unquote(parts.path).lstrip("/")
    elif scheme == "file" and parts.netloc in ("", "localhost"):
        candidate = Path(url2pathname(parts.path))
    else:
        raise ValueError("refused: PDFs may load only the portal's bundled static files")
    try:
        resolved = candidate.resolve()
        inside = resolved.is_relative_to(root) and resolved.is_file()
    except (OSError, ValueError):  # a NUL byte, a symlink loop
        inside = False
    if not inside:
        raise ValueError("refused: not a bundled static file")
    if resolved.stat().st_size > MAX_ASSET_BYTES:
        raise ValueError("refused: static file too large")
    return resolved


def safe_url_fetcher(
    url: str, timeout: int = FETCH_TIMEOUT_SECONDS, ssl_context: object = None
) -> URLFetcherResponse:
    """Return the bundled static file ``url`` names, as a WeasyPrint fetch response.

    ``timeout`` and ``ssl_context`` exist for signature compatibility and are
    unused: nothing is fetched over a network. WeasyPrint 70 takes a
    :class:`URLFetcher` object, not a function; renderers use
    :class:`SafeURLFetcher`, which calls this. Raises ValueError for every URL
    that is not a bundled static file (see :func:`static_asset_path`).
    """
    path = static_asset_path(url)
    mime_type, _ = mimetypes.guess_type(path.name)
    content_type = mime_type or "application/octet-stream"
    if content_type.startswith("text/"):
        content_type += "; charset=utf-8"
    return URLFetcherResponse(
        path.as_uri(), path.read_bytes(), headers={"Content-Type": content_type}
    )


class SafeURLFetcher(URLFetcher):  # type: ignore[misc]  # weasyprint ships no type information
    """A WeasyPrint fetcher that serves only bundled static files and refuses everything else.

    A refused URL raises ValueError inside WeasyPrint, which logs a warning and
    renders without the resource. No urllib handler is ever reached.
    """

    def __init__(
        self, timeout: int = FETCH_TIMEOUT_SECONDS, ssl_context: object = None, **_: Any
    ) -> None:
        super().__init__(
            timeout=timeout,
            ssl_context=ssl_context,
            allowed_protocols=(),
            allow_redirects=False,
            fail_on_errors=False,
        )

    def fetch(self, url: str, headers: Mapping[str, str] | None = None) -> URLFetcherResponse:
        """Return the static file ``url`` names; raise ValueError for anything else."""
        return safe_url_fetcher(url)


# --- Message bodies: shared with the web pages -------------------------------------------------


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    # Raw HTML off: "<b>" in a body is text, never markup (CommonMark 0.31, 6.6).
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    # Only web and mail links become links; the rest stay text. nh3 checks again below.
    md.validateLink = _is_allowed_link  # type: ignore[method-assign]  # markdown-it-py's documented per-instance hook
    return md


def _is_allowed_link(url: str) -> bool:
    return url.strip().lower().startswith(LINK_SCHEMES)


def _keep_attribute(element: str, attribute: str, value: str) -> str | None:
    if element == "a" and attribute == "href":
        return value if _is_allowed_link(value) else None
    return value


def render_body_html(body: str, body_format: str) -> Markup:
    """Return a message body as safe HTML, for a page or a PDF.

    "text" is escaped into ``<div class="body-text">`` (CSS keeps its line
    breaks); "markdown" is rendered without raw HTML and sanitised to
    BODY_TAGS, with links limited to http, https and mailto (rel="noopener
    noreferrer") and no images, so a body can never load anything. Raises
    ValueError for another format.
    """
    if body_format == "text":
        return Markup('<div class="body-text">{}</div>').format(body)
    if body_format != "markdown":
        raise ValueError(f"unknown body format {body_format!r}")
    html = nh3.clean(
        _markdown().render(body),
        tags=BODY_TAGS,
        attributes={"a": {"href", "title"}},
        attribute_filter=_keep_attribute,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer",
    )
    return Markup('<div class="body-markdown">{}</div>').format(Markup(html))  # noqa: S704


# --- Rendering ---------------------------------------------------------------------------------


def format_when(value: datetime | date) -> str:
    """Return ``value`` for a reader: UTC "YYYY-MM-DD HH:MM UTC" for a datetime, ISO for a date."""
    if not isinstance(value, datetime):
        return value.isoformat()
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M UTC")


def format_size(size: int) -> str:
    """Return a byte count as "12.3 KB (12,345 bytes)", decimal units."""
    if size < 1000:
        return f"{size:,} bytes"
    amount, unit = float(size), "B"
    for unit in ("KB", "MB", "GB", "TB"):  # noqa: B007 - the last unit reached is the one used
        amount /= 1000
        if amount < 1000:
            break
    return f"{amount:.1f} {unit} ({size:,} bytes)"


@lru_cache(maxsize=1)
def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(asset_dir("templates")),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = format_when
    env.filters["filesize"] = format_size
    return env


def _write_pdf(template: str, context: dict[str, Any]) -> bytes:
    html = _environment().get_template(template).render(**context)
    base_url = asset_dir("static").resolve().as_uri() + "/"
    pdf: bytes | None = HTML(
        string=html, base_url=base_url, url_fetcher=SafeURLFetcher()
    ).write_pdf()
    assert pdf is not None  # write_pdf returns bytes when no target is given
    return pdf


def render_message_pdf(
    *,
    org_name: str,
    org_address: str,
    sender_name: str,
    sent_at: datetime,
    subject: str,
    body: str,
    body_format: str,
    attachments: Sequence[tuple[str, int, str]],
    recipient_name: str,
    generated_at: datetime | None = None,
) -> bytes:
    """Return a message as a PDF letter: letterhead, sender, date, recipient, subject, body.

    ``attachments`` are (name, size in bytes, SHA-256 hex) and are listed, not
    embedded. The document holds PHI: hand it only to the message's recipient
    or sender. Raises ValueError for an unknown ``body_format``.
    """
    return _write_pdf(
        "pdf/message.html",
        {
            "org_name": org_name,
            "org_address": org_address,
            "sender_name": sender_name,
            "sent_at": sent_at,
            "subject": subject,
            "recipient_name": recipient_name,
            "body_html": render_body_html(body, body_format),
            "attachments": [{"name": n, "size": s, "sha256": h} for n, s, h in attachments],
            "generated_at": generated_at or datetime.now(UTC),
        },
    )


DISCLOSURE_KEYS = ("when", "who", "role", "action", "item", "how", "from_address")


def render_disclosures_pdf(
    *,
    org_name: str,
    org_address: str,
    patient_name: str,
    period_start: date,
    period_end: date,
    rows: Sequence[Mapping[str, Any]],
    generated_at: datetime | None = None,
) -> bytes:
    """Return a patient's accounting of disclosures (HIPAA, 45 CFR 164.528) as a PDF.

    Each row has DISCLOSURE_KEYS: ``when`` (datetime), ``who``, ``role``,
    ``action``, ``item``, ``how`` and ``from_address``. The table repeats its
    header on every page; an empty period says so. Raises KeyError when a row
    lacks a key.
    """
    table = [{key: row[key] for key in DISCLOSURE_KEYS} for row in rows]
    return _write_pdf(
        "pdf/disclosures.html",
        {
            "org_name": org_name,
            "org_address": org_address,
            "patient_name": patient_name,
            "period_start": period_start,
            "period_end": period_end,
            "rows": table,
            "generated_at": generated_at or datetime.now(UTC),
        },
    )
