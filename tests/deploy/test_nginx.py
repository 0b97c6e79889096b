"""deploy/nginx/portal.conf in front of `portal serve`: a pickup over verified HTTPS.

The patient connects from 127.0.0.2, nginx reaches gunicorn from 127.0.0.1, and the portal
trusts 127.0.0.1 as its proxy (PORTAL_TRUSTED_PROXIES): the audit trail must name the
patient's address, whatever X-Forwarded-For the patient sends. nginx must stream uploads
and downloads without spooling them (plaintext PHI) to its temp files.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from portal.config import MIB, SETTINGS
from portal.models import AuditEvent
from portal.security import otp
from tests.support.deploy import (
    CLIENT_ADDRESS,
    NGINX_SAMPLE,
    PASSWORD,
    PROXY_ADDRESS,
    Nginx,
    Pickup,
    Portal,
)

SPOOFED = "203.0.113.7"  # what a patient claims in X-Forwarded-For (TEST-NET-3)
_CSRF = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')
HSTS = "max-age=63072000; includeSubDomains"
STALL_SECONDS = 1.0
SLOW_RCVBUF = 16 * 1024


class Patient:
    """A browser-like client over one verified HTTPS connection: cookies, CSRF, no Referer.

    Sends Origin like a browser on POST; sends no Referer (the portal's Referrer-Policy is
    no-referrer) and a forged X-Forwarded-For on every request.
    """

    def __init__(self, nginx: Nginx) -> None:
        self.nginx = nginx
        self.connection = nginx.connection()
        self.cookies: dict[str, str] = {}
        self.origin = f"https://{PROXY_ADDRESS}:{nginx.https_port}"

    def headers(self) -> dict[str, str]:
        cookie = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        return {
            "X-Forwarded-For": SPOOFED,
            "X-Real-IP": SPOOFED,
            "Forwarded": f"for={SPOOFED}",
            **({"Cookie": cookie} if cookie else {}),
        }

    def request(
        self, method: str, path: str, body: bytes | None = None, extra: dict[str, str] | None = None
    ) -> http.client.HTTPResponse:
        self.connection.request(
            method, path, body=body, headers={**self.headers(), **(extra or {})}
        )
        response = self.connection.getresponse()
        for header in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = header.partition("=")
            self.cookies[name] = rest.split(";", 1)[0]
        return response

    def submit(self, path: str, fields: dict[str, str]) -> http.client.HTTPResponse:
        page = self.request("GET", path)
        found = _CSRF.search(page.read().decode())
        assert found, f"no form on {path} ({page.status})"
        body = urllib.parse.urlencode({"csrf_token": found.group(1), **fields}).encode()
        response = self.request(
            "POST",
            path,
            body,
            {"Content-Type": "application/x-www-form-urlencoded", "Origin": self.origin},
        )
        response.read()
        return response

    def sign_in(self, pickup: Pickup) -> None:
        """Password, then the current TOTP code; both must be accepted."""
        first = self.submit("/signin", {"email": pickup.email, "password": PASSWORD})
        assert (first.status, first.headers["Location"]) == (302, "/signin/code"), first.status
        code = otp.code_at(pickup.secret, int(time.time() // otp.STEP_SECONDS))
        second = self.submit("/signin/code", {"code": code})
        assert second.status == 302, second.status
        assert "/signin" not in second.headers["Location"]


def audit_events(portal: Portal, action: str) -> list[AuditEvent]:
    """The portal's audit events of ``action``, read from its database."""
    url = portal.env.get("PORTAL_DATABASE_URL")  # PostgreSQL; else the instance's SQLite file
    engine = create_engine(url or f"sqlite:///{portal.env['PORTAL_INSTANCE_DIR']}/portal.db")
    with Session(engine) as session:
        found = list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))
    engine.dispose()
    return found


def read_all(response: http.client.HTTPResponse) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    while piece := response.read(MIB):
        digest.update(piece)
        size += len(piece)
    return size, digest.hexdigest()


def directive(name: str) -> str:
    """The value of ``name`` in the sample (each directive appears once)."""
    found = re.findall(rf"^\s*{name}\s+([^;]+);", NGINX_SAMPLE.read_text(), re.MULTILINE)
    assert len(found) == 1, f"{name}: {found}"
    return found[0].strip()


def test_pickup_through_nginx_audits_the_patients_address_not_the_proxys(
    nginx: Nginx, portal: Portal, make_pickup: Callable[[str], Pickup]
) -> None:
    pickup = make_pickup("pat-audit@example.org")
    patient = Patient(nginx)
    patient.sign_in(pickup)
    response = patient.request("GET", pickup.download_path)
    assert response.status == 200
    assert response.headers.get_all("Strict-Transport-Security") == [HSTS]
    assert read_all(response) == (pickup.size, pickup.sha256)
    for action in ("auth.signin", "attachment.download"):
        addresses = {event.client_ip for event in audit_events(portal, action)}
        assert addresses == {CLIENT_ADDRESS}, (action, addresses)


def test_nginx_streams_downloads_without_spooling_them_to_disk(
    nginx: Nginx, make_pickup: Callable[[str], Pickup]
) -> None:
    pickup = make_pickup("pat-stream@example.org")
    assert stalled_download_spools(nginx, pickup) == []
    assert all(not any(folder.iterdir()) for folder in nginx.temp_dirs)


def test_nginx_streams_uploads_without_spooling_them_to_disk(nginx: Nginx) -> None:
    assert stalled_upload_spools(nginx) == []


def test_the_spool_checks_catch_a_buffering_proxy(
    start_nginx: Callable[..., Nginx], make_pickup: Callable[[str], Pickup]
) -> None:
    # The same sample with buffering switched back on (nginx's defaults): the checks above
    # must see its temp files, or they prove nothing.
    def buffering(text: str) -> str:
        text = text.replace("proxy_request_buffering off;", "proxy_request_buffering on;")
        text = text.replace("proxy_buffering off;", "proxy_buffering on;")
        return text.replace("proxy_max_temp_file_size 0;", "")

    leaky = start_nginx("buffering", buffering)
    pickup = make_pickup("pat-leaky@example.org")
    assert stalled_download_spools(leaky, pickup)
    assert stalled_upload_spools(leaky)


def stalled_download_spools(nginx: Nginx, pickup: Pickup) -> list[str]:
    """Sign in, start the download, stall as a slow phone would; return nginx's temp files."""
    patient = Patient(nginx)
    patient.sign_in(pickup)
    slow = Patient(nginx)
    slow.connection = nginx.connection(rcvbuf=SLOW_RCVBUF)
    slow.cookies = patient.cookies
    response = slow.request("GET", pickup.download_path)
    assert response.status == 200
    first = response.read(64 * 1024)
    time.sleep(STALL_SECONDS)
    spooled = nginx.open_temp_files()
    size, _ = read_all(response)
    assert len(first) + size == pickup.size
    return spooled


def stalled_upload_spools(nginx: Nginx) -> list[str]:
    """Send half of a 4 MiB form body, stall; return nginx's temp files, then hang up."""
    connection = nginx.connection()
    connection.putrequest("POST", "/signin")
    connection.putheader("Content-Type", "application/x-www-form-urlencoded")
    connection.putheader("Content-Length", str(4 * MIB))
    connection.endheaders()
    connection.send(b"padding=" + b"x" * (2 * MIB - 8))
    time.sleep(STALL_SECONDS)
    spooled = nginx.open_temp_files()
    connection.close()
    return spooled


def test_plain_http_only_redirects_to_the_https_origin(nginx: Nginx) -> None:
    connection = http.client.HTTPConnection(
        PROXY_ADDRESS, nginx.http_port, timeout=10, source_address=(CLIENT_ADDRESS, 0)
    )
    connection.request("GET", "/signin")
    response = connection.getresponse()
    assert response.status == 301
    assert response.headers["Location"] == f"https://{PROXY_ADDRESS}:{nginx.https_port}/signin"
    assert "csrf_token" not in response.read().decode()


def test_nginx_refuses_a_body_over_the_portals_limit_before_reading_it(nginx: Nginx) -> None:
    connection = nginx.connection()
    connection.putrequest("POST", "/signin")
    connection.putheader("Content-Length", str(200 * MIB))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    assert response.headers.get_all("Strict-Transport-Security") == [HSTS]


def test_the_body_limit_is_the_portals_default_upload_plus_its_form_allowance() -> None:
    default = next(s.default for s in SETTINGS if s.env == "PORTAL_MAX_UPLOAD")
    assert directive("client_max_body_size") == f"{(default + MIB) // MIB}m"


@pytest.mark.parametrize(
    "name", ["proxy_read_timeout", "proxy_send_timeout", "send_timeout", "client_body_timeout"]
)
def test_transfer_timeouts_allow_a_stalling_client(name: str) -> None:
    assert int(directive(name).removesuffix("s")) >= 300


def test_the_access_log_holds_no_urls(nginx: Nginx, make_pickup: Callable[[str], Pickup]) -> None:
    pickup = make_pickup("pat-log@example.org")
    patient = Patient(nginx)
    patient.request("GET", "/p/ThisTokenMustNotBeLogged0123456789abcdefgh").read()
    patient.sign_in(pickup)
    log = Path(nginx.access_log).read_text()
    assert log.count(CLIENT_ADDRESS) >= 5
    for secret in ("ThisTokenMustNotBeLogged", "/p/", "/signin", "pat-log", "?"):
        assert secret not in log
