"""Settings: embedded defaults, then ``PORTAL_*`` environment variables, then overrides.

A wrong setting stops start-up with one :class:`ConfigError` line that names the
setting (and never echoes a secret's value).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from flask import Flask, current_app
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from portal.files import OutputExists, open_output

if TYPE_CHECKING:  # imported where used: argon2 and zxcvbn are not needed to read settings
    from portal.security import passwords
from portal.security.scan import ClamdAddress

SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MIB = 1024 * 1024
MAX_PROXY_HOPS = 10
DEFAULT_LEASE, MIN_LEASE, MAX_LEASE = 120, 2, 3600  # seconds a notifier worker holds a claim
DEFAULT_RELAY_BACKOFF, MAX_RELAY_BACKOFF = 15, 300  # seconds: the notifier's first wait after
# a transport fault (it doubles, to at most 20 times this and never over 5 min)
# Serving (portal serve; README "Serving: workers, threads and download slots"): threads per
# worker, of which some may stream downloads; the others are kept for pages and health checks.
MAX_WEB_WORKERS = 64
MAX_WEB_THREADS = 256
DEFAULT_WEB_THREADS = 16
DEFAULT_RESERVED_THREADS = 4
MIN_RESERVED_THREADS = 2
ProxyNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
SmtpTls = Literal["starttls", "implicit"]
ScanMode = Literal["required", "off"]


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the setting."""


def parse_duration(name: str, raw: str) -> int:
    """Return ``raw`` ("90s", "15m", "12h", "7d" or plain seconds) in seconds.

    Raises ConfigError naming ``name`` when it is not a positive duration.
    """
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", raw)
    if not match or int(match.group(1)) <= 0:
        raise ConfigError(f"{name}: expected a positive duration such as 90s, 15m, 12h or 7d")
    return int(match.group(1)) * SECONDS[match.group(2) or "s"]


def parse_size(name: str, raw: str) -> int:
    """Return ``raw`` ("100M", "2G", "512K" or bytes) in bytes; ConfigError if malformed."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", raw, re.IGNORECASE)
    if not match or int(match.group(1)) <= 0:
        raise ConfigError(f"{name}: expected a size such as 100M or 2G")
    power = {"": 0, "K": 1, "M": 2, "G": 3}[match.group(2).upper()]
    return int(match.group(1)) * 1024**power


def _parse_int(name: str, raw: str, low: int, high: int) -> int:
    if not raw.strip().isdigit() or not low <= int(raw) <= high:
        raise ConfigError(f"{name}: expected a whole number from {low} to {high}")
    return int(raw)


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{name}: expected true or false")


def _parse_base_url(name: str, raw: str) -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in {"http", "https"} or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"{name}: expected an http(s) URL such as https://portal.example.org")
    return raw.strip().rstrip("/")


def _parse_database_url(name: str, raw: str) -> str:
    try:
        url = make_url(raw)
    except ArgumentError:
        raise ConfigError(
            f"{name}: not a database URL (sqlite:///path or postgresql://...)"
        ) from None
    if url.get_backend_name() not in {"sqlite", "postgresql"}:
        raise ConfigError(f"{name}: only sqlite and postgresql are supported")
    if url.get_backend_name() == "postgresql" and url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return url.render_as_string(hide_password=False)


def _parse_redis_url(name: str, raw: str) -> str:
    if urlsplit(raw).scheme not in {"redis", "rediss", "unix"}:
        raise ConfigError(f"{name}: expected a redis:// or rediss:// URL")
    return raw


def _readable_file(name: str, raw: str) -> str:
    path = Path(raw).expanduser()
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ConfigError(f"{name}: file {path} does not exist or is not readable")
    return str(path)


def _smtp_tls(name: str, raw: str) -> SmtpTls:
    if raw == "starttls":
        return "starttls"
    if raw == "implicit":
        return "implicit"
    raise ConfigError(f"{name}: expected starttls or implicit")


def _email(name: str, raw: str) -> str:
    if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", raw):
        raise ConfigError(f"{name}: expected an email address")
    return raw


def _text(_name: str, raw: str) -> str:
    return raw


def _secret_key(name: str, raw: str) -> str:
    # An empty or blank secret would sign sessions with nothing (ASVS 3.5.2, 6.4.1).
    if not raw.strip():
        raise ConfigError(
            f"{name}: is empty; set a long random value, or unset it to use "
            "the generated instance/secret_key"
        )
    return raw


def _trusted_proxies(name: str, raw: str) -> int | tuple[ProxyNetwork, ...]:
    """Return a hop count (``"2"``) or the proxies' networks (``"10.0.0.1, 10.1.0.0/16"``)."""
    value = raw.strip()
    message = (
        f"{name}: expected a number of proxy hops (0 to {MAX_PROXY_HOPS}) or proxy "
        "addresses and networks separated by commas, such as 10.0.0.1, 10.1.0.0/16"
    )
    if value.isascii() and value.isdigit():
        if int(value) > MAX_PROXY_HOPS:
            raise ConfigError(message)
        return int(value)
    try:
        networks = tuple(ipaddress.ip_network(part) for part in re.split(r"[,\s]+", value) if part)
    except ValueError:
        raise ConfigError(message) from None
    if not networks or any(network.prefixlen == 0 for network in networks):
        raise ConfigError(message)  # trusting every address would let anyone spoof theirs
    return networks


@dataclass(frozen=True)
class Setting:
    """One ``PORTAL_*`` environment variable and the Flask config key it fills (README.md's
    settings list says what each means)."""

    env: str
    key: str
    parse: Any
    default: Any
    empty_is_unset: bool = True


def _port(name: str, raw: str) -> int:
    return _parse_int(name, raw, 1, 65535)


def _drift(name: str, raw: str) -> int:
    return _parse_int(name, raw, 0, 2)


def _bool(name: str, raw: str) -> bool:
    return _parse_bool(name, raw)


def _clamd_address(name: str, raw: str) -> str:
    try:
        ClamdAddress.parse(raw)
    except ValueError as error:
        raise ConfigError(f"{name}: {error}") from None
    return raw.strip()


def _scan_mode(name: str, raw: str) -> ScanMode:
    value = raw.strip().lower()
    if value == "required":
        return "required"
    if value == "off":
        return "off"
    raise ConfigError(f"{name}: expected required or off")


def _lease(name: str, raw: str) -> int:
    # Shorter than a send plus its commit would let another worker take a row being sent;
    # longer than an hour leaves a crashed worker's notices waiting that long.
    seconds = parse_duration(name, raw)
    if not MIN_LEASE <= seconds <= MAX_LEASE:
        raise ConfigError(f"{name}: expected a duration from {MIN_LEASE}s to 1h, such as 2m")
    return seconds


def _relay_backoff(name: str, raw: str) -> int:
    seconds = parse_duration(name, raw)
    if not 1 <= seconds <= MAX_RELAY_BACKOFF:
        raise ConfigError(f"{name}: expected a duration from 1s to 5m, such as 15s")
    return seconds


def parse_worker_id(name: str, raw: str) -> str:
    """Return ``raw``, a notifier worker's name in ``claimed_by``: 1 to 64 printable ASCII
    characters, no spaces. Raises ConfigError naming ``name`` otherwise."""
    if not re.fullmatch(r"[!-~]{1,64}", raw):
        raise ConfigError(f"{name}: expected 1 to 64 printable characters without spaces")
    return raw


def _web_workers(name: str, raw: str) -> int:
    return _parse_int(name, raw, 1, MAX_WEB_WORKERS)


def _web_threads(name: str, raw: str) -> int:
    return _parse_int(name, raw, MIN_RESERVED_THREADS + 1, MAX_WEB_THREADS)


def _download_slots(name: str, raw: str) -> int:
    return _parse_int(name, raw, 1, MAX_WEB_THREADS - MIN_RESERVED_THREADS)


def download_slots(
    threads: int,
    slots: int | None,
    *,
    threads_name: str = "PORTAL_WEB_THREADS",
    slots_name: str = "PORTAL_DOWNLOAD_SLOTS",
) -> int:
    """Return how many of a worker's ``threads`` may stream a download at once: ``slots``,
    or, when None, all but DEFAULT_RESERVED_THREADS of them (at least one).

    The rest stay free for pages and health checks whatever slow clients do. Raises
    ConfigError (naming both settings) when ``slots`` leaves fewer than
    MIN_RESERVED_THREADS.
    """
    if slots is None:
        return max(1, threads - DEFAULT_RESERVED_THREADS)
    most = threads - MIN_RESERVED_THREADS
    if slots > most:
        raise ConfigError(
            f"{slots_name}: {slots} leaves fewer than {MIN_RESERVED_THREADS} of the {threads} "
            f"threads ({threads_name}) for pages and health checks; at most {most}"
        )
    return slots


SETTINGS: tuple[Setting, ...] = (
    Setting("PORTAL_DATABASE_URL", "DATABASE_URL", _parse_database_url, None),
    Setting("PORTAL_SECRET_KEY", "SECRET_KEY", _secret_key, None, empty_is_unset=False),
    Setting("PORTAL_KEYRING", "KEYRING_PATH", _readable_file, None),
    Setting("PORTAL_BLOB_DIR", "BLOB_DIR", _text, None),
    Setting("PORTAL_BASE_URL", "BASE_URL", _parse_base_url, "http://127.0.0.1:5000"),
    Setting("PORTAL_SMTP_HOST", "SMTP_HOST", _text, "127.0.0.1"),
    Setting("PORTAL_SMTP_PORT", "SMTP_PORT", _port, 8025),
    Setting("PORTAL_SMTP_USERNAME", "SMTP_USERNAME", _text, None),
    Setting("PORTAL_SMTP_PASSWORD", "SMTP_PASSWORD", _text, None),
    Setting("PORTAL_SMTP_TLS", "SMTP_TLS", _smtp_tls, "starttls"),
    Setting("PORTAL_SMTP_CA_FILE", "SMTP_CA_FILE", _readable_file, None),
    Setting("PORTAL_MAIL_FROM", "MAIL_FROM", _email, "no-reply@pickup.invalid"),
    Setting("PORTAL_ORG_NAME", "ORG_NAME", _text, "Pickup Portal Demo Clinic"),
    Setting("PORTAL_ORG_ADDRESS", "ORG_ADDRESS", _text, "1 Example Street, Exampletown"),
    Setting("PORTAL_SUPPORT_CONTACT", "SUPPORT_CONTACT", _text, "the practice's front desk"),
    Setting("PORTAL_REDIS_URL", "REDIS_URL", _parse_redis_url, None),
    Setting("PORTAL_TRUSTED_PROXIES", "TRUSTED_PROXIES", _trusted_proxies, 0),
    Setting("PORTAL_LINK_TTL", "LINK_TTL", parse_duration, 7 * 86400),
    Setting("PORTAL_LINK_MAX_TTL", "LINK_MAX_TTL", parse_duration, 30 * 86400),
    Setting("PORTAL_MAX_UPLOAD", "MAX_UPLOAD", parse_size, 100 * MIB),
    Setting("PORTAL_CLAMD_SOCKET", "CLAMD_SOCKET", _clamd_address, None),
    Setting("PORTAL_SCAN_UPLOADS", "SCAN_UPLOADS", _scan_mode, None),  # see _settle_scanning
    Setting("PORTAL_REMINDER_AFTER", "REMINDER_AFTER", parse_duration, 3 * 86400),
    Setting("PORTAL_NOTIFIER_LEASE", "NOTIFIER_LEASE", _lease, DEFAULT_LEASE),
    Setting(
        "PORTAL_NOTIFIER_RELAY_BACKOFF",
        "NOTIFIER_RELAY_BACKOFF",
        _relay_backoff,
        DEFAULT_RELAY_BACKOFF,
    ),
    Setting("PORTAL_NOTIFIER_WORKER_ID", "NOTIFIER_WORKER_ID", parse_worker_id, None),
    Setting("PORTAL_SESSION_IDLE", "SESSION_IDLE", parse_duration, 15 * 60),
    Setting("PORTAL_SESSION_LIFETIME", "SESSION_LIFETIME", parse_duration, 12 * 3600),
    Setting("PORTAL_TOTP_DRIFT", "TOTP_DRIFT", _drift, 1),
    Setting("PORTAL_PASSWORD_BLOCKLIST", "PASSWORD_BLOCKLIST", _readable_file, None),
    Setting("PORTAL_DKIM_KEY", "DKIM_KEY", _readable_file, None),
    Setting("PORTAL_DKIM_SELECTOR", "DKIM_SELECTOR", _text, "pickup"),
    Setting("PORTAL_DEMO", "DEMO", _bool, False),
    Setting("PORTAL_DEMO_MAILDIR", "DEMO_MAILDIR", _text, None),
    Setting("PORTAL_BOUNCE_MAILDIR", "BOUNCE_MAILDIR", _text, None),
    Setting("PORTAL_LOG_LEVEL", "LOG_LEVEL", _text, "INFO"),
    Setting("PORTAL_WEB_WORKERS", "WEB_WORKERS", _web_workers, None),
    Setting("PORTAL_WEB_THREADS", "WEB_THREADS", _web_threads, DEFAULT_WEB_THREADS),
    Setting("PORTAL_DOWNLOAD_SLOTS", "DOWNLOAD_SLOTS", _download_slots, None),
)


def instance_dir(environ: Mapping[str, str]) -> Path:
    """Return the instance folder (``PORTAL_INSTANCE_DIR``, default ``instance``), made 0700.

    Raises ConfigError when it cannot be made (a read-only root, another owner).
    """
    path = Path(environ.get("PORTAL_INSTANCE_DIR") or "instance").resolve()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"PORTAL_INSTANCE_DIR: cannot create {path}: {error.strerror}") from None
    return path


def secret_file(path: Path, nbytes: int = 32) -> str:
    """Return the secret stored in ``path``, creating it once with mode 0600.

    A new secret is written whole to a private temporary file, then hard-linked
    into place; the link fails if another process got there first. So processes
    starting together all read one complete secret, never an empty or half-written
    file. Raises ConfigError when the file is unreadable or empty.
    """
    if not path.exists():
        try:
            _publish_secret(path, secrets.token_urlsafe(nbytes))
        except OSError as error:
            raise ConfigError(f"PORTAL_SECRET_KEY: cannot write {path}: {error.strerror}") from None
    try:
        value = path.read_text().strip()
    except OSError as error:
        raise ConfigError(f"PORTAL_SECRET_KEY: cannot read {path}: {error.strerror}") from None
    if not value:
        raise ConfigError(
            f"PORTAL_SECRET_KEY: {path} is empty; delete it to generate a new "
            "secret (signs everyone out) or set PORTAL_SECRET_KEY"
        )
    return value


def _publish_secret(path: Path, value: str) -> None:
    # portal.files writes a private temporary file whole, then links it into place; the
    # link fails if another process got there first, and its secret is the one kept.
    with contextlib.suppress(OutputExists), open_output(path, encoding="utf-8") as handle:
        handle.write(value + "\n")


@dataclass(frozen=True)
class Settings:
    """The typed settings services and the notifier read, built once per app from its config.

    Services get it from :func:`current_settings` (views call them with no settings
    argument); the notifier's worker passes it down explicitly. Durations are seconds,
    sizes bytes.
    """

    base_url: str
    org_name: str
    org_address: str
    support_contact: str
    mail_from: str
    link_ttl: int
    link_max_ttl: int
    max_upload: int
    clamd_socket: str | None  # clamd's Unix socket path or host:port (portal.security.scan)
    scan_uploads: ScanMode
    reminder_after: int
    notifier_lease: int
    notifier_relay_backoff: int  # seconds: first wait after a transport fault
    notifier_worker_id: str | None
    totp_drift: int
    keyring_path: str
    blob_dir: str
    password_blocklist: str | None
    smtp_host: str
    smtp_port: int
    smtp_tls: SmtpTls
    smtp_ca_file: str | None
    smtp_username: str | None
    smtp_password: str | None = field(repr=False)  # never in a log line or traceback
    dkim_key: str | None
    dkim_selector: str
    bounce_maildir: str | None  # where delivery status notifications arrive (notifier.bounces)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        """Return the settings in ``config`` (a Flask config filled by :func:`load`).

        Whole-number settings are coerced with ``int`` (a test override may pass "8025").
        """
        values: dict[str, Any] = {f.name: config.get(f.name.upper()) for f in fields(cls)}
        for f in fields(cls):
            if f.type == "int":
                values[f.name] = int(values[f.name])
        return cls(**values)


def settings_of(app: Flask) -> Settings:
    """Return ``app``'s :class:`Settings`, built from ``app.config`` on first use."""
    found = app.extensions.get("settings")
    if not isinstance(found, Settings):
        found = app.extensions["settings"] = Settings.from_config(app.config)
    return found


def current_settings() -> Settings:
    """Return the current app's :class:`Settings`; RuntimeError outside an app context."""
    return settings_of(current_app)


def load(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Return the Flask config: defaults, then environment, then ``overrides``.

    Raises ConfigError naming the first malformed setting.
    """
    environ = os.environ if environ is None else environ
    folder = instance_dir(environ)
    config: dict[str, Any] = {"INSTANCE_DIR": str(folder)}
    for setting in SETTINGS:
        raw = environ.get(setting.env)
        unset = raw is None or (raw == "" and setting.empty_is_unset)
        config[setting.key] = setting.default if unset else setting.parse(setting.env, raw)
    config.update(overrides or {})
    _fill_embedded_defaults(config, folder)
    _settle_scanning(config)
    config["WEB_THREADS"] = int(config["WEB_THREADS"])  # a test override may pass "8"
    slots = config["DOWNLOAD_SLOTS"]
    config["DOWNLOAD_SLOTS"] = download_slots(
        config["WEB_THREADS"], None if slots is None else int(slots)
    )
    secret = config["SECRET_KEY"]
    if not isinstance(secret, str | bytes) or not secret.strip():
        raise ConfigError("SECRET_KEY: is empty; the portal will not sign sessions without one")
    return config


def password_hasher(config: Mapping[str, Any]) -> passwords.PasswordHasher:
    """Return the app's argon2id hasher: the production parameters, or in tests the cheap
    ``PASSWORD_HASH_PARAMS`` (a dict of time_cost, memory_cost, parallelism).

    Raises ConfigError when PASSWORD_HASH_PARAMS is set without TESTING: an app that
    serves real users never hashes below the OWASP floor. The key has no environment
    variable; only create_app's overrides can set it.
    """
    from portal.security import passwords

    params = config.get("PASSWORD_HASH_PARAMS")
    if params is None:
        return passwords.default_hasher()
    if not config.get("TESTING"):
        raise ConfigError("PASSWORD_HASH_PARAMS: is a test-only setting and needs TESTING")
    return passwords.insecure_hasher_for_tests(**params)


def _fill_embedded_defaults(config: dict[str, Any], folder: Path) -> None:
    if not config.get("DATABASE_URL"):
        config["DATABASE_URL"] = f"sqlite:///{folder / 'portal.db'}"
    if not config.get("SECRET_KEY"):
        config["SECRET_KEY"] = secret_file(folder / "secret_key")
    config.setdefault("KEYRING_PATH", None)
    if not config.get("KEYRING_PATH"):
        config["KEYRING_PATH"] = str(folder / "keyring.json")
    if not config.get("BLOB_DIR"):
        config["BLOB_DIR"] = str(folder / "blobs")
    if not config.get("DEMO_MAILDIR"):
        config["DEMO_MAILDIR"] = str(folder / "maildir")


def _settle_scanning(config: dict[str, Any]) -> None:
    """Scan uploads when clamd is configured, unless told off; never "required" without one.

    Unset PORTAL_SCAN_UPLOADS means required when PORTAL_CLAMD_SOCKET is set, off
    otherwise (the demo, a development machine). Raises ConfigError for required
    without a socket: the portal would otherwise refuse every upload.
    """
    config.setdefault("CLAMD_SOCKET", None)
    if config.get("SCAN_UPLOADS") is None:
        config["SCAN_UPLOADS"] = "required" if config["CLAMD_SOCKET"] else "off"
    if config["SCAN_UPLOADS"] == "required" and not config["CLAMD_SOCKET"]:
        raise ConfigError(
            "PORTAL_SCAN_UPLOADS: required needs PORTAL_CLAMD_SOCKET (clamd's socket path "
            "or host:port); set it, or set PORTAL_SCAN_UPLOADS=off"
        )
