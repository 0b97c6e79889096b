"""Run the portal under gunicorn, without gunicorn's access log (it would log raw URLs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gunicorn.app.base import BaseApplication

from portal.config import ProxyNetwork


class _Gunicorn(BaseApplication):
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from portal.wsgi import app

        return app


def run_gunicorn(
    host: str, port: int, *, workers: int, threads: int, forwarded_allow_ips: str = ""
) -> None:
    """Serve ``portal.wsgi:app`` on host:port until interrupted: ``workers`` processes of
    ``threads`` threads each (gthread; README "Serving" says how to size them).

    gthread because a request's thread spends a download mostly in ``send``, without the
    GIL, while argon2, AES-GCM, SQLite and WeasyPrint would stall every request of an
    event-loop worker; idle keep-alive connections wait in the worker's poller, not on a
    thread. The portal keeps some threads from downloads (portal.web.downloads).
    ``forwarded_allow_ips`` (see :func:`gunicorn_trusted`) are the peers whose
    X-Forwarded-Proto gunicorn itself believes; default none.
    """
    _Gunicorn(
        {
            "bind": f"{host}:{port}",
            "workers": workers,
            "threads": threads,
            "worker_class": "gthread",
            "accesslog": None,
            "errorlog": "-",
            "timeout": 120,
            "forwarded_allow_ips": forwarded_allow_ips,
        }
    ).run()


def gunicorn_trusted(trusted: int | Sequence[ProxyNetwork]) -> str:
    """Return gunicorn's ``forwarded_allow_ips`` for PORTAL_TRUSTED_PROXIES, so both agree.

    A hop count trusts whatever peer connects ("*"); addresses trust those only;
    none trusts nobody (a local user could otherwise claim https).
    """
    if isinstance(trusted, int):
        return "*" if trusted else ""
    return ",".join(str(network) for network in trusted)
