"""Certificate files: a new 0600 key; nothing a path already names is chmodded or followed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography import x509

from notifier.tlscert import write_cert_files, write_private_file


def test_key_written_to_a_device_leaves_its_mode_alone(tmp_path: Path) -> None:
    device = tmp_path / "null"
    os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a private /dev/null twin
    device.chmod(0o666)
    write_cert_files(tmp_path / "cert.pem", device)
    assert stat.S_ISCHR(os.stat(device).st_mode)
    assert stat.S_IMODE(os.stat(device).st_mode) == 0o666
    x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes())


def test_links_are_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    victim.chmod(0o644)
    key_link, cert_link = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_link.symlink_to(victim)
    cert_link.symlink_to(victim)
    write_cert_files(cert_link, key_link)
    assert victim.read_bytes() == b"keep"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert not key_link.is_symlink()
    assert stat.S_IMODE(key_link.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key_link.read_bytes()
    x509.load_pem_x509_certificate(cert_link.read_bytes())


def test_private_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        write_private_file(tmp_path / "key.pem", b"secret")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["key.pem"]
