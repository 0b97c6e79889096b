"""Run the portal under gunicorn, without gunicorn's access log (it would log raw URLs)."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from portal.wsgi import app

        return app


def run_gunicorn(host: str, port: int, workers: int = 2, threads: int = 4) -> None:
    """Serve ``portal.wsgi:app`` on host:port until interrupted."""
    _Gunicorn({
        "bind": f"{host}:{port}",
        "workers": workers,
        "threads": threads,
        "worker_class": "gthread",
        "accesslog": None,
        "errorlog": "-",
        "timeout": 120,
        "forwarded_allow_ips": "127.0.0.1",
    }).run()
