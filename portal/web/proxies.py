"""Believe X-Forwarded-For/-Proto/-Host only from the proxies ``PORTAL_TRUSTED_PROXIES`` names.

Without the setting the headers are ignored: the client address is the TCP
peer's, so a client cannot choose the address its audit events record or the
rate-limit bucket it counts against (ASVS 7.1.3, OWASP "IP spoofing via HTTP
headers"). With a hop count N, Werkzeug's ProxyFix takes the N-th address from
the right, as N proxies appended them. With addresses, the headers count only
when the peer is one of them, and the client is the right-most forwarded address
that is not itself a trusted proxy (as nginx's ``real_ip_recursive`` does).
Each trusted proxy must set (not append to) X-Forwarded-Proto and -Host, as
deploy/nginx does; other forwarding headers (X-Forwarded-Ssl, -Protocol) are
never read.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from werkzeug.middleware.proxy_fix import ProxyFix

from portal.config import ProxyNetwork

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

Trusted = int | Sequence[ProxyNetwork]


def wrap(app: WSGIApplication, trusted: Trusted) -> WSGIApplication:
    """Return ``app`` behind the forwarded-header policy for ``trusted`` (unchanged when none)."""
    if not trusted:
        return app
    return TrustedProxies(app, trusted)


class TrustedProxies:
    """WSGI middleware applying ProxyFix only for the hops that trusted proxies added."""

    def __init__(self, app: WSGIApplication, trusted: Trusted) -> None:
        """Wrap ``app``; ``trusted`` is a hop count or the proxies' networks."""
        self.app = app
        self.trusted = trusted

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Rewrite REMOTE_ADDR, scheme and host from trusted forwarded headers; call the app."""
        hops = self._hops(environ)
        if not hops:
            return self.app(environ, start_response)
        other = 1 if not isinstance(self.trusted, int) else hops
        fixed = ProxyFix(self._checked, x_for=hops, x_proto=other, x_host=other)
        return fixed(environ, start_response)

    def _hops(self, environ: WSGIEnvironment) -> int:
        if isinstance(self.trusted, int):
            return self.trusted
        if not _within(environ.get("REMOTE_ADDR"), self.trusted):
            return 0  # an untrusted peer: its forwarded headers are the client's own words
        chain = [part.strip() for part in environ.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        hops = 0
        for address in reversed(chain):
            hops += 1
            if not _within(address, self.trusted):
                break
        return hops

    def _checked(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # A forwarded value that is not an address (junk from a client, a misconfigured hop
        # count) must not reach the audit trail: keep the peer's address instead.
        if _address(environ.get("REMOTE_ADDR")) is None:
            original: dict[str, Any] = environ.get("werkzeug.proxy_fix.orig", {})
            environ["REMOTE_ADDR"] = original.get("REMOTE_ADDR")
        return self.app(environ, start_response)


def _address(raw: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(raw or "")
    except ValueError:
        return None
    # A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d; compare them as IPv4.
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def _within(raw: str | None, networks: Sequence[ProxyNetwork]) -> bool:
    address = _address(raw)
    return address is not None and any(address in network for network in networks)
