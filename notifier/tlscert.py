"""Self-signed certificates for the local mail sink.

The certificate is its own trust anchor (basicConstraints CA=True), so the file
the sink writes can be handed to a client directly as ``cafile``
(``PORTAL_SMTP_CA_FILE``) and the client still verifies the chain and the host
name. It is for local demos and tests only, never for a public server.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from portal.files import open_output

DEFAULT_HOSTNAMES: tuple[str, ...] = ("localhost", "127.0.0.1")
DEFAULT_VALIDITY_DAYS = 30
CLOCK_SKEW = dt.timedelta(minutes=5)  # tolerate a client clock slightly behind ours
KEY_FILE_MODE = 0o600
CERT_FILE_MODE = 0o644  # a certificate is public; only its key is private


def _general_name(hostname: str) -> x509.GeneralName:
    """An IP address SAN for literal addresses, a DNS name SAN otherwise."""
    try:
        return x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        return x509.DNSName(hostname)


def _extensions(
    builder: x509.CertificateBuilder, key: ec.EllipticCurvePrivateKey, hostnames: Sequence[str]
) -> x509.CertificateBuilder:
    """Add the extensions a strict verifier (OpenSSL X509_STRICT, Python 3.13+) expects."""
    public_key = key.public_key()
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([_general_name(h) for h in hostnames]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
    )


def generate_self_signed(
    hostnames: Sequence[str] = DEFAULT_HOSTNAMES, *, days: int = DEFAULT_VALIDITY_DAYS
) -> tuple[bytes, bytes]:
    """Generate an ECDSA P-256 self-signed certificate for ``hostnames``.

    Returns ``(cert_pem, key_pem)``; the key is unencrypted PKCS#8. Every host
    name becomes a SubjectAlternativeName (IP or DNS), the first one is also the
    subject CN. Raises ``ValueError`` when ``hostnames`` is empty.
    """
    if not hostnames:
        raise ValueError("at least one host name is required")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Pickup Portal local mail sink"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
    )
    cert = _extensions(builder, key, hostnames).sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_private_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` as a new file readable by the owner only (mode 0600).

    A file already there is replaced (a link too, not what it points to); a FIFO
    or device is written as it is, its mode untouched (portal.files).
    """
    with open_output(path, replace=True, mode=KEY_FILE_MODE) as handle:
        handle.write(data)


def write_cert_files(
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    hostnames: Sequence[str] = DEFAULT_HOSTNAMES,
) -> bytes:
    """Generate a certificate, write it to ``cert_path`` and its key (mode 0600) to ``key_path``.

    Returns the certificate PEM. Parent directories are created.
    """
    cert_pem, key_pem = generate_self_signed(hostnames)
    for path in (cert_path, key_path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_private_file(key_path, key_pem)
    write_public_file(cert_path, cert_pem)
    return cert_pem


def write_public_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` (a certificate) to ``path`` as a new mode-0644 file, as a whole.

    Replaces a file or link already there without following it; readers never
    see a half-written certificate.
    """
    with open_output(path, replace=True, mode=CERT_FILE_MODE) as handle:
        handle.write(data)
