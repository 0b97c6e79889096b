"""QR codes as inline SVG, drawn locally with segno (no external service, no script)."""

from __future__ import annotations

import segno

TARGET_PIXELS = 200  # about this wide on screen, quiet zone included
MIN_SCALE = 2  # pixels per module
BORDER_MODULES = 4  # quiet zone required by ISO/IEC 18004
DEFAULT_TITLE = "QR code to scan with your authenticator app"
DEFAULT_CLASS = "qr-code"


def qr_svg(data: str, *, title: str = DEFAULT_TITLE, css_class: str = DEFAULT_CLASS) -> str:
    """Return an inline ``<svg>`` element encoding ``data``, for embedding in HTML.

    No XML declaration, no script, no external reference; a ``<title>`` gives it an
    accessible name (WCAG 1.1.1) and ``role="img"``. segno escapes the title. The
    data (a provisioning URI holds the TOTP secret) must only go to its owner.
    Raises segno.DataOverflowError when ``data`` is too long for any QR version.
    """
    code = segno.make(data, error="m", micro=False)
    width, _ = code.symbol_size(scale=1, border=BORDER_MODULES)
    scale = max(MIN_SCALE, round(TARGET_PIXELS / width))
    svg = code.svg_inline(
        scale=scale,
        border=BORDER_MODULES,
        title=title,
        svgclass=css_class,
        lineclass=f"{css_class}-modules",
        dark="#000",
        light="#fff",  # scanners need a light quiet zone, also in dark themes
    )
    return svg.replace("<svg ", '<svg role="img" ', 1)
