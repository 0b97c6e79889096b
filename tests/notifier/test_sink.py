"""The local TLS mail sink, its certificate helper and its command line."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import smtplib
import ssl
import stat
import subprocess
import sys
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import pytest
from cryptography import x509

from notifier.sink import MailSink, default_cert_path, main
from notifier.smtp import SmtpSettings, SmtpTransport
from notifier.tlscert import generate_self_signed, write_cert_files

REPO_ROOT = Path(__file__).resolve().parents[2]
SinkFactory = Callable[..., MailSink]
SettingsFor = Callable[..., SmtpSettings]
Delivered = Callable[[MailSink | Path], list[EmailMessage]]
Notice = Callable[..., EmailMessage]


def test_certificate_is_its_own_ca_for_localhost() -> None:
    cert_pem, key_pem = generate_self_signed()
    cert = x509.load_pem_x509_certificate(cert_pem)

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 30 <= lifetime.days <= 31
    assert b"PRIVATE KEY" in key_pem


def test_certificate_passes_strict_verification(sink: MailSink) -> None:
    # Python 3.13 turns on VERIFY_X509_STRICT by default: the sink's cert must pass it.
    context = ssl.create_default_context(cafile=str(sink.cert_file))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    with smtplib.SMTP(sink.host, sink.port, local_hostname="localhost", timeout=5) as client:
        client.starttls(context=context)
        assert client.ehlo()[0] == 250


def test_write_cert_files_keeps_the_key_private(tmp_path: Path) -> None:
    cert_path, key_path = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    key_path.parent.mkdir()
    key_path.write_bytes(b"old")
    key_path.chmod(0o644)

    write_cert_files(cert_path, key_path)

    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key_path.read_bytes()
    x509.load_pem_x509_certificate(cert_path.read_bytes())


def test_sink_picks_a_free_port_and_writes_its_certificate(sink: MailSink) -> None:
    assert sink.port > 0
    assert sink.cert_file is not None
    assert sink.cert_file.read_bytes() == sink.cert_pem
    assert (sink.maildir / "new").is_dir()


def test_sink_refuses_mail_before_starttls(sink: MailSink) -> None:
    with smtplib.SMTP(sink.host, sink.port, local_hostname="localhost", timeout=5) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        code, _ = client.mail("no-reply@portal.example.org")

    assert code == 530
    assert sink.handler.stored == 0


def test_sink_offers_auth_only_after_tls(sink_factory: SinkFactory) -> None:
    sink = sink_factory("auth", auth=("user", "pw"))
    context = ssl.create_default_context(cafile=str(sink.cert_file))
    with smtplib.SMTP(sink.host, sink.port, local_hostname="localhost", timeout=5) as client:
        client.ehlo()
        assert not client.has_extn("auth")
        client.starttls(context=context)
        client.ehlo()
        assert "PLAIN" in client.esmtp_features["auth"]


def test_sink_without_starttls_does_not_offer_it(plain_sink: MailSink) -> None:
    with smtplib.SMTP(plain_sink.host, plain_sink.port, local_hostname="x", timeout=5) as client:
        client.ehlo()
        assert not client.has_extn("starttls")


def test_sink_stops_and_frees_its_port(
    tmp_path: Path, make_notice: Notice, smtp_settings: SettingsFor
) -> None:
    with MailSink(tmp_path / "Maildir", cert_file=tmp_path / "cert.pem") as sink:
        settings = smtp_settings(sink)
        with SmtpTransport(settings) as transport:
            transport.send(make_notice())
    sink.stop()  # idempotent

    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP(settings.host, settings.port, local_hostname="x", timeout=2)


def test_sink_restarts_with_a_new_certificate(
    tmp_path: Path, make_notice: Notice, smtp_settings: SettingsFor
) -> None:
    sink = MailSink(tmp_path / "Maildir", cert_file=tmp_path / "cert.pem")
    with sink:
        first = sink.cert_pem
    with sink:
        assert sink.cert_pem != first
        with SmtpTransport(smtp_settings(sink)) as transport:
            transport.send(make_notice())
    assert sink.handler.stored == 1


def test_default_cert_path_is_beside_the_maildir() -> None:
    assert default_cert_path(Path("/srv/mail/Maildir")) == Path("/srv/mail/Maildir.cert.pem")


def test_cli_usage_error_without_maildir(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--port", "0"])

    assert exited.value.code == 2
    assert "--maildir" in capsys.readouterr().err


def test_cli_runs_until_sigterm(
    tmp_path: Path, make_notice: Notice, delivered: Delivered, smtp_settings: SettingsFor
) -> None:
    maildir, cert = tmp_path / "Maildir", tmp_path / "sink-cert.pem"
    argv = ["--port", "0", "--maildir", str(maildir), "--cert", str(cert)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "notifier.sink", *argv],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(
            r"mail sink listening on 127\.0\.0\.1:(\d+), STARTTLS with certificate (.+), "
            r"Maildir (.+)\n",
            line,
        )
        assert match, line
        assert (match[2], match[3]) == (str(cert), str(maildir))
        settings = SmtpSettings(
            "127.0.0.1", int(match[1]), "starttls", str(cert), None, None, timeout=5
        )
        with SmtpTransport(settings) as transport:
            transport.send(make_notice(5))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)

    assert proc.returncode == 0, err
    assert "mail sink stopped" in out
    [msg] = delivered(maildir)
    assert msg["Message-ID"] == "<notice-n5@portal.example.org>"
