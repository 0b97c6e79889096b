"""SmtpTransport against the real mail sink over TLS: no mock of smtplib."""

from __future__ import annotations

import base64
import email.policy
import logging
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from notifier.sink import MailSink
from notifier.smtp import (
    DeliveryError,
    DkimKey,
    PermanentDeliveryError,
    RelayUnavailable,
    SmtpSettings,
    SmtpTransport,
    TransientDeliveryError,
    TransportConfigError,
    TransportFault,
    dkim_sign,
    make_message_id,
    tls_context,
)
from tests.support.tls_garbage import CorruptingRelay

PATIENT = "pat.example@patients.example.org"  # as in conftest.make_notice

SinkFactory = Callable[..., MailSink]
SettingsFor = Callable[..., SmtpSettings]
Delivered = Callable[[MailSink | Path], list[EmailMessage]]
Notice = Callable[..., EmailMessage]


def assert_phi_free(err: DeliveryError) -> None:
    """The error carries no address and no trace of smtplib's (address-bearing) error."""
    for text in (str(err), repr(err), err.reason):
        assert "@" not in text
        assert "patients.example.org" not in text
    assert err.__cause__ is None
    assert err.__context__ is None or err.__suppress_context__


def test_delivers_over_starttls_with_headers(
    sink: MailSink,
    make_notice: Notice,
    delivered: Delivered,
    smtp_settings: SettingsFor,
) -> None:
    with SmtpTransport(smtp_settings(sink)) as transport:
        reply = transport.send(make_notice(7))

    assert reply.startswith("250 ")
    [msg] = delivered(sink)
    assert msg["To"] == PATIENT
    assert msg["From"] == "Pickup Portal <no-reply@portal.example.org>"
    assert msg["Subject"] == "You have a secure message"
    assert msg["Message-ID"] == "<notice-n7@portal.example.org>"
    assert msg["Delivered-To"] == PATIENT
    assert msg["Return-Path"] == "<no-reply@portal.example.org>"
    assert "Notice 7." in msg.get_content()


def test_reuses_one_connection_for_a_batch(
    sink: MailSink,
    make_notice: Notice,
    delivered: Delivered,
    smtp_settings: SettingsFor,
) -> None:
    with SmtpTransport(smtp_settings(sink)) as transport:
        for n in range(20):
            transport.send(make_notice(n))
        assert transport.connections_opened == 1

    assert sink.connection_count == 1
    ids = {msg["Message-ID"] for msg in delivered(sink)}
    assert ids == {f"<notice-n{n}@portal.example.org>" for n in range(20)}


def test_reconnects_once_when_the_server_dropped_an_idle_connection(
    sink_factory: SinkFactory,
    make_notice: Notice,
    delivered: Delivered,
    smtp_settings: SettingsFor,
) -> None:
    sink = sink_factory(idle_timeout=0.3)
    with SmtpTransport(smtp_settings(sink)) as transport:
        transport.send(make_notice(1))
        time.sleep(0.8)  # the sink closes the idle connection
        transport.send(make_notice(2))
        assert transport.connections_opened == 2

    assert len(delivered(sink)) == 2


def test_implicit_tls(
    sink_factory: SinkFactory, make_notice: Notice, delivered: Delivered, smtp_settings: SettingsFor
) -> None:
    sink = sink_factory("smtps", starttls=False, implicit_tls=True)
    settings = smtp_settings(sink)
    assert settings.tls == "implicit"

    with SmtpTransport(settings) as transport:
        transport.send(make_notice(1))
        transport.send(make_notice(2))

    assert len(delivered(sink)) == 2
    assert sink.connection_count == 1


def test_server_down_is_transient_connect_failed(free_port: int, make_notice: Notice) -> None:
    settings = SmtpSettings("127.0.0.1", free_port, "starttls", None, None, None, timeout=2)
    with SmtpTransport(settings) as transport, pytest.raises(TransientDeliveryError) as caught:
        transport.send(make_notice())

    assert caught.value.reason == "connect-failed"
    assert_phi_free(caught.value)


def test_refuses_a_server_without_starttls(
    plain_sink: MailSink,
    other_ca_file: str,
    make_notice: Notice,
    delivered: Delivered,
    smtp_settings: SettingsFor,
) -> None:
    settings = smtp_settings(plain_sink, ca_file=other_ca_file)
    with SmtpTransport(settings) as transport, pytest.raises(PermanentDeliveryError) as caught:
        transport.send(make_notice())

    assert caught.value.reason == "starttls-unavailable"
    assert delivered(plain_sink) == []
    assert plain_sink.handler.stored == 0


def test_refuses_an_untrusted_certificate(
    sink: MailSink,
    other_ca_file: str,
    make_notice: Notice,
    delivered: Delivered,
    smtp_settings: SettingsFor,
) -> None:
    settings = smtp_settings(sink, ca_file=other_ca_file)
    with SmtpTransport(settings) as transport, pytest.raises(PermanentDeliveryError) as caught:
        transport.send(make_notice())

    assert caught.value.reason == "tls-verify-failed"
    assert_phi_free(caught.value)
    assert delivered(sink) == []


def test_refuses_an_untrusted_certificate_with_implicit_tls(
    sink_factory: SinkFactory,
    other_ca_file: str,
    make_notice: Notice,
    smtp_settings: SettingsFor,
) -> None:
    sink = sink_factory("smtps", starttls=False, implicit_tls=True)
    settings = smtp_settings(sink, ca_file=other_ca_file)
    with SmtpTransport(settings) as transport, pytest.raises(PermanentDeliveryError) as caught:
        transport.send(make_notice())

    assert caught.value.reason == "tls-verify-failed"
    assert sink.handler.stored == 0


def test_refuses_a_certificate_for_another_host(
    sink_factory: SinkFactory,
    make_notice: Notice,
    smtp_settings: SettingsFor,
) -> None:
    sink = sink_factory("elsewhere", hostnames=["mail.elsewhere.example"])
    transport = SmtpTransport(smtp_settings(sink))
    with transport, pytest.raises(PermanentDeliveryError) as e:
        transport.send(make_notice())

    assert e.value.reason == "tls-verify-failed"
    assert sink.handler.stored == 0


def test_system_trust_store_does_not_trust_the_sink(
    sink: MailSink, make_notice: Notice, smtp_settings: SettingsFor
) -> None:
    settings = smtp_settings(sink, ca_file=None)
    with SmtpTransport(settings) as transport, pytest.raises(PermanentDeliveryError) as caught:
        transport.send(make_notice())

    assert caught.value.reason == "tls-verify-failed"


def test_client_context_always_verifies(other_ca_file: str) -> None:
    context = tls_context(other_ca_file)

    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize(
    ("rcpt_reply", "data_reply", "error", "reason"),
    [
        (
            "451 4.3.0 <pat.example@patients.example.org> try later",
            None,
            TransientDeliveryError,
            "smtp-4xx:451",
        ),
        (
            "550 5.1.1 <pat.example@patients.example.org> unknown",
            None,
            PermanentDeliveryError,
            "smtp-5xx:550",
        ),
        (None, "451 4.3.0 queue full", TransientDeliveryError, "smtp-4xx:451"),
        (None, "554 5.7.1 rejected as spam", PermanentDeliveryError, "smtp-5xx:554"),
    ],
)
def test_maps_refusals_by_reply_code(
    refusing_sink: Callable[..., MailSink],
    make_notice: Notice,
    rcpt_reply: str | None,
    data_reply: str | None,
    error: type[DeliveryError],
    reason: str,
    smtp_settings: SettingsFor,
) -> None:
    sink = refusing_sink(rcpt_reply=rcpt_reply, data_reply=data_reply)
    with SmtpTransport(smtp_settings(sink)) as transport, pytest.raises(error) as caught:
        transport.send(make_notice())

    assert caught.value.reason == reason
    assert caught.value.smtp_code == int(reason[-3:])
    assert_phi_free(caught.value)
    assert sink.handler.stored == 0


def test_connection_stays_usable_after_a_refusal(
    refusing_sink: Callable[..., MailSink],
    make_notice: Notice,
    smtp_settings: SettingsFor,
) -> None:
    sink = refusing_sink(data_reply="550 5.7.1 no")
    with SmtpTransport(smtp_settings(sink)) as transport:
        for _ in range(3):
            with pytest.raises(PermanentDeliveryError):
                transport.send(make_notice())
        assert transport.connections_opened == 1


REFUSED = "refused.person@patients.example.org"
REFUSALS = [
    ("data-command", "554 5.7.1 <refused.person@patients.example.org> no", PermanentDeliveryError),
    ("data-command", "451 4.3.0 try later", TransientDeliveryError),
    ("data", "554 5.7.1 rejected", PermanentDeliveryError),
    ("data", "451 4.3.0 queue full", TransientDeliveryError),
    ("rcpt", "550 5.1.1 <refused.person@patients.example.org> unknown", PermanentDeliveryError),
    ("rcpt", "451 4.3.0 greylisted", TransientDeliveryError),
]


@pytest.mark.parametrize(("stage", "reply", "error"), REFUSALS)
def test_the_next_notice_on_the_connection_is_delivered_after_a_refusal(
    picky_sink: Callable[..., MailSink],
    make_notice: Notice,
    delivered: Delivered,
    smtp_settings: SettingsFor,
    stage: str,
    reply: str,
    error: type[DeliveryError],
) -> None:
    sink = picky_sink(REFUSED, stage, reply)
    with SmtpTransport(smtp_settings(sink)) as transport:
        with pytest.raises(error) as caught:
            transport.send(make_notice(1, to=REFUSED))
        transport.send(make_notice(2))  # before the fix: 503 nested MAIL, failed for good
        assert transport.connections_opened == 1

    assert caught.value.reason.endswith(reply[:3])
    assert_phi_free(caught.value)
    [msg] = delivered(sink)
    assert (msg["Message-ID"], msg["Delivered-To"]) == ("<notice-n2@portal.example.org>", PATIENT)


def test_a_failed_rset_drops_the_connection_and_the_next_notice_reconnects(
    picky_sink: Callable[..., MailSink],
    make_notice: Notice,
    delivered: Delivered,
    smtp_settings: SettingsFor,
) -> None:
    sink = picky_sink(REFUSED, "data-command", "554 5.7.1 no")
    sink.handler.rset_reply = "502 5.5.1 not now"  # type: ignore[attr-defined]
    with SmtpTransport(smtp_settings(sink)) as transport:
        with pytest.raises(PermanentDeliveryError):
            transport.send(make_notice(1, to=REFUSED))
        transport.send(make_notice(2))
        assert transport.connections_opened == 2

    assert [m["Message-ID"] for m in delivered(sink)] == ["<notice-n2@portal.example.org>"]


def test_auth_with_the_right_password(
    sink_factory: SinkFactory,
    make_notice: Notice,
    delivered: Delivered,
    smtp_settings: SettingsFor,
) -> None:
    sink = sink_factory("auth", auth=("notifier", "s3cret-pass"))
    settings = smtp_settings(sink, username="notifier", password="s3cret-pass")
    with SmtpTransport(settings) as transport:
        transport.send(make_notice())

    assert len(delivered(sink)) == 1


def test_auth_with_implicit_tls(
    sink_factory: SinkFactory, make_notice: Notice, smtp_settings: SettingsFor
) -> None:
    sink = sink_factory("auth-smtps", starttls=False, implicit_tls=True, auth=("n", "pw"))
    with SmtpTransport(smtp_settings(sink, username="n", password="pw")) as transport:
        transport.send(make_notice())

    assert sink.handler.stored == 1


def test_auth_with_a_wrong_password_is_permanent(
    sink_factory: SinkFactory,
    make_notice: Notice,
    smtp_settings: SettingsFor,
) -> None:
    sink = sink_factory("auth", auth=("notifier", "s3cret-pass"))
    settings = smtp_settings(sink, username="notifier", password="wrong")
    with SmtpTransport(settings) as transport, pytest.raises(PermanentDeliveryError) as caught:
        transport.send(make_notice())

    assert caught.value.reason == "auth-failed"
    assert "wrong" not in repr(caught.value)
    assert sink.handler.stored == 0


def test_sink_requiring_auth_refuses_anonymous_mail_as_a_configuration_error(
    sink_factory: SinkFactory,
    make_notice: Notice,
    smtp_settings: SettingsFor,
) -> None:
    sink = sink_factory("auth", auth=("notifier", "s3cret-pass"))
    transport = SmtpTransport(smtp_settings(sink))
    with transport, pytest.raises(TransportConfigError) as e:
        transport.send(make_notice())

    assert (e.value.reason, e.value.smtp_code) == ("auth-required", 530)
    assert e.value.setting == "PORTAL_SMTP_USERNAME / PORTAL_SMTP_PASSWORD"
    assert sink.handler.stored == 0


def test_password_is_not_in_settings_repr() -> None:
    settings = SmtpSettings("h", 25, "starttls", None, "user", "hunter2")

    assert "hunter2" not in repr(settings)


def test_message_without_recipient_is_invalid(
    sink: MailSink, make_notice: Notice, smtp_settings: SettingsFor
) -> None:
    msg = make_notice()
    del msg["To"]
    transport = SmtpTransport(smtp_settings(sink))
    with transport, pytest.raises(PermanentDeliveryError) as e:
        transport.send(msg)

    assert e.value.reason == "invalid-message"
    assert sink.connection_count == 0


def test_bcc_is_delivered_but_not_shown(
    sink: MailSink,
    make_notice: Notice,
    delivered: Delivered,
    smtp_settings: SettingsFor,
) -> None:
    msg = make_notice()
    msg["Bcc"] = "archive@portal.example.org"
    with SmtpTransport(smtp_settings(sink)) as transport:
        transport.send(msg)

    [stored] = delivered(sink)
    assert stored["Bcc"] is None
    assert stored.get_all("Delivered-To") == [PATIENT, "archive@portal.example.org"]
    assert msg["Bcc"] == "archive@portal.example.org"  # the caller's message is untouched


def test_logs_ids_never_addresses(
    sink: MailSink,
    make_notice: Notice,
    caplog: pytest.LogCaptureFixture,
    smtp_settings: SettingsFor,
) -> None:
    caplog.set_level(logging.DEBUG, logger="notifier")
    with SmtpTransport(smtp_settings(sink)) as transport:
        transport.send(make_notice(3))

    ours = [r.getMessage() for r in caplog.records if r.name.startswith("notifier")]
    assert any("<notice-n3@portal.example.org>" in line for line in ours)
    assert not any(PATIENT in line or "no-reply@" in line for line in ours)


def test_message_id_is_stable_per_notice() -> None:
    assert make_message_id("42", "portal.example.org") == "<notice-42@portal.example.org>"
    assert make_message_id("42", "example.org") == make_message_id("42", "example.org")
    with pytest.raises(ValueError, match="Message-ID"):
        make_message_id("4>2", "portal.example.org")


@pytest.fixture(scope="module")
def dkim_keypair() -> tuple[bytes, bytes]:
    """(private key PEM, DNS TXT record) for selector ``s1`` of ``portal.example.org``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public_der)


def _dnsfunc(record: bytes) -> Callable[..., bytes | None]:
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == b"s1._domainkey.portal.example.org." else None

    return lookup


def test_dkim_sign_and_verify(dkim_keypair: tuple[bytes, bytes], make_notice: Notice) -> None:
    private_pem, record = dkim_keypair
    raw = make_notice().as_bytes(policy=email.policy.SMTP)

    signed = dkim_sign(raw, "s1", "portal.example.org", private_pem)

    assert signed.startswith(b"DKIM-Signature:")
    assert dkim.verify(signed, dnsfunc=_dnsfunc(record))
    tampered = signed.replace(b"secure message", b"secure massage")
    assert not dkim.verify(tampered, dnsfunc=_dnsfunc(record))


def test_dkim_signature_survives_delivery(
    sink: MailSink,
    dkim_keypair: tuple[bytes, bytes],
    make_notice: Notice,
    smtp_settings: SettingsFor,
) -> None:
    private_pem, record = dkim_keypair
    key = DkimKey("s1", "portal.example.org", private_pem)
    with SmtpTransport(smtp_settings(sink), dkim_key=key) as transport:
        transport.send(make_notice())

    [stored_key] = sink.handler.mailbox.keys()
    stored = sink.handler.mailbox.get_bytes(stored_key)
    signature_header = stored[stored.index(b"DKIM-Signature:") :]
    assert dkim.verify(signature_header, dnsfunc=_dnsfunc(record))


def test_dkim_with_a_bad_key_fails_permanently(
    sink: MailSink, make_notice: Notice, smtp_settings: SettingsFor
) -> None:
    key = DkimKey("s1", "portal.example.org", b"not a key")
    transport = SmtpTransport(smtp_settings(sink), dkim_key=key)
    with transport, pytest.raises(PermanentDeliveryError) as caught:
        transport.send(make_notice())

    assert caught.value.reason == "dkim-failed"


def test_missing_ca_file_is_a_permanent_configuration_error(
    sink: MailSink, tmp_path: Path, make_notice: Notice, smtp_settings: SettingsFor
) -> None:
    settings = smtp_settings(sink, ca_file=str(tmp_path / "missing.pem"))
    with SmtpTransport(settings) as transport, pytest.raises(PermanentDeliveryError) as caught:
        transport.send(make_notice())

    assert caught.value.reason == "ca-file-unusable"
    assert sink.connection_count == 0


def test_there_is_no_plaintext_mode() -> None:
    with pytest.raises(ValueError, match="starttls"):
        SmtpSettings("h", 25, "none", None, None, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("case", "kind", "reason", "setting"),
    [
        ("untrusted-ca", TransportConfigError, "tls-verify-failed", "PORTAL_SMTP_CA_FILE"),
        ("missing-ca", TransportConfigError, "ca-file-unusable", "PORTAL_SMTP_CA_FILE"),
        ("no-starttls", TransportConfigError, "starttls-unavailable", "PORTAL_SMTP_TLS"),
        ("implicit-on-starttls", TransportConfigError, "tls-failed", "PORTAL_SMTP_TLS"),
        (
            "wrong-password",
            TransportConfigError,
            "auth-failed",
            "PORTAL_SMTP_USERNAME / PORTAL_SMTP_PASSWORD",
        ),
        (
            "nobody-listening",
            RelayUnavailable,
            "connect-failed",
            "PORTAL_SMTP_HOST / PORTAL_SMTP_PORT",
        ),
    ],
)
def test_what_fails_while_connecting_is_a_transport_fault_naming_the_setting(
    sink_factory: SinkFactory,
    plain_sink: MailSink,
    other_ca_file: str,
    free_port: int,
    tmp_path: Path,
    make_notice: Notice,
    smtp_settings: SettingsFor,
    case: str,
    kind: type[TransportFault],
    reason: str,
    setting: str,
) -> None:
    """No notice is at fault when the relay cannot be used: the worker keeps them queued."""
    sink = sink_factory("auth", auth=("notifier", "s3cret-pass"))
    settings = {
        "untrusted-ca": smtp_settings(sink, ca_file=other_ca_file),
        "missing-ca": smtp_settings(sink, ca_file=str(tmp_path / "missing.pem")),
        "no-starttls": smtp_settings(plain_sink, ca_file=other_ca_file),
        "implicit-on-starttls": smtp_settings(sink, tls="implicit"),
        "wrong-password": smtp_settings(sink, username="notifier", password="wrong"),
        "nobody-listening": smtp_settings(sink, port=free_port),
    }[case]
    with SmtpTransport(settings) as transport, pytest.raises(kind) as caught:
        transport.send(make_notice())

    assert (caught.value.reason, caught.value.setting) == (reason, setting)
    assert caught.value.advice
    assert_phi_free(caught.value)
    assert sink.handler.stored == plain_sink.handler.stored == 0


def test_refusals_of_one_message_are_not_transport_faults(
    refusing_sink: Callable[..., MailSink], make_notice: Notice, smtp_settings: SettingsFor
) -> None:
    sink = refusing_sink(rcpt_reply="550 5.1.1 <pat.example@patients.example.org> unknown")
    with SmtpTransport(smtp_settings(sink)) as transport, pytest.raises(DeliveryError) as caught:
        transport.send(make_notice())

    assert not isinstance(caught.value, TransportFault)
    assert caught.value.reason == "smtp-5xx:550"


def test_a_send_on_a_stalled_relay_ends_at_its_deadline(
    slow_sink: Callable[[float], MailSink], make_notice: Notice, smtp_settings: SettingsFor
) -> None:
    sink = slow_sink(3.0)  # answers the end of DATA after 3 s; the timeout is 10 s
    with SmtpTransport(smtp_settings(sink, timeout=10.0)) as transport:
        transport.open()
        transport.deadline = time.monotonic() + 0.3
        with pytest.raises(RelayUnavailable) as caught:
            transport.send(make_notice())  # without the deadline it would be accepted

        assert caught.value.reason == "timeout"  # not "connection-lost": smtplib's disguise
        transport.deadline = None
        sink.handler.delay = 0  # type: ignore[attr-defined]
        transport.send(make_notice(2))  # a new connection, no deadline

    assert sink.connection_count == 2


def test_a_send_whose_deadline_has_passed_does_not_reach_the_relay(
    sink: MailSink, make_notice: Notice, smtp_settings: SettingsFor
) -> None:
    transport = SmtpTransport(smtp_settings(sink))
    transport.deadline = time.monotonic() - 1
    with transport, pytest.raises(RelayUnavailable) as caught:
        transport.send(make_notice())

    assert caught.value.reason == "connect-failed"
    assert sink.connection_count == 0


# -- refusals of relaying itself, and the relay going away mid-transaction ---------------


@pytest.mark.parametrize(
    ("replies", "reason"),
    [
        (
            {"rcpt_reply": "554 5.7.1 <pat.example@patients.example.org>: Relay access denied"},
            "relay-denied:5.7.1",
        ),  # Postfix
        (
            {"rcpt_reply": "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"},
            "relay-denied:5.7.54",
        ),  # Exchange
        (
            {"mail_reply": "550 5.7.57 Client not authenticated to send mail"},
            "relay-denied:5.7.57",
        ),  # Office 365
        ({"data_reply": "550 5.7.54 Unable to relay"}, "relay-denied:5.7.54"),
    ],
)
def test_a_relay_refusing_to_relay_is_a_configuration_fault_naming_the_login(
    refusing_sink: Callable[..., MailSink],
    make_notice: Notice,
    smtp_settings: SettingsFor,
    replies: dict[str, str],
    reason: str,
) -> None:
    sink = refusing_sink(**replies)
    with SmtpTransport(smtp_settings(sink)) as transport, pytest.raises(TransportFault) as caught:
        transport.send(make_notice())

    assert isinstance(caught.value, TransportConfigError)
    assert caught.value.reason == reason  # the enhanced code's digits, no reply text
    assert "PORTAL_SMTP_USERNAME" in caught.value.setting
    assert_phi_free(caught.value)
    assert sink.handler.stored == 0


@pytest.mark.parametrize(
    "replies",
    [
        {"mail_reply": "451 4.3.0 Temporary sender lookup failure"},
        {"mail_reply": "421 4.3.2 Service shutting down"},
        {"rcpt_reply": "421 4.3.2 Service shutting down"},
        {"data_reply": "421 4.3.2 Service shutting down"},
    ],
    ids=["mail-451", "mail-421", "rcpt-421", "data-421"],
)
def test_a_deferred_sender_or_a_closing_relay_is_the_relay_unavailable(
    refusing_sink: Callable[..., MailSink],
    make_notice: Notice,
    smtp_settings: SettingsFor,
    replies: dict[str, str],
) -> None:
    sink = refusing_sink(**replies)
    with SmtpTransport(smtp_settings(sink)) as transport, pytest.raises(TransportFault) as caught:
        transport.send(make_notice())

    assert isinstance(caught.value, RelayUnavailable)
    assert caught.value.reason.startswith("smtp-4xx:4")


def test_a_size_refusal_to_mail_from_fails_that_message_only(
    refusing_sink: Callable[..., MailSink], make_notice: Notice, smtp_settings: SettingsFor
) -> None:
    sink = refusing_sink(mail_reply="552 5.3.4 Message size exceeds fixed limit")
    with SmtpTransport(smtp_settings(sink)) as transport, pytest.raises(DeliveryError) as caught:
        transport.send(make_notice())

    assert isinstance(caught.value, PermanentDeliveryError)
    assert not isinstance(caught.value, TransportFault)
    assert caught.value.reason == "smtp-5xx:552"


def test_a_tls_error_after_the_handshake_is_a_lost_connection_not_a_tls_setting(
    make_notice: Notice, tmp_path: Path
) -> None:
    relay = CorruptingRelay(tmp_path)
    settings = SmtpSettings(
        "localhost", relay.port, "starttls", str(relay.ca_file), None, None, timeout=5.0
    )
    try:
        with SmtpTransport(settings) as transport, pytest.raises(TransportFault) as caught:
            transport.send(make_notice())
    finally:
        relay.close()

    assert isinstance(caught.value, RelayUnavailable)  # before: permanent "tls-failed"
    assert caught.value.reason == "connection-lost"


def test_the_transport_does_not_import_dkim_until_it_signs() -> None:
    # dkimpy (and what it pulls in) is start-up time for every `notifier run`; only a
    # worker with PORTAL_DKIM_KEY set needs it, when it signs its first notice.
    code = "import sys, notifier.smtp, notifier.worker; print('dkim' in sys.modules)"
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert found.stdout.strip() == "False"
