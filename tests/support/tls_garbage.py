"""A one-connection SMTP relay that, once TLS is up and MAIL is sent, writes a corrupt TLS
record: the client's next read fails with an SSLError that is not an end of file (what a
middlebox or a broken relay does mid-transaction)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import tempfile
import threading
from pathlib import Path

from notifier.tlscert import generate_self_signed


class CorruptingRelay:
    """Listens on 127.0.0.1:``port``; ``ca_file`` trusts its certificate."""

    def __init__(self, folder: Path) -> None:
        cert_pem, key_pem = generate_self_signed(["localhost", "127.0.0.1"])
        self.ca_file = folder / "corrupting-ca.pem"
        self.ca_file.write_bytes(cert_pem)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".pem", delete=False) as key:
            key.write(key_pem)
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(self.ca_file, key.name)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._listener.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        with self._listener.accept()[0] as conn:
            conn.settimeout(5)
            reader = conn.makefile("rb")
            conn.sendall(b"220 localhost ESMTP\r\n")
            reader.readline()  # EHLO
            conn.sendall(b"250-localhost\r\n250 STARTTLS\r\n")
            reader.readline()  # STARTTLS
            conn.sendall(b"220 go ahead\r\n")
            tls = self._context.wrap_socket(conn, server_side=True)
            tls_reader = tls.makefile("rb")
            tls_reader.readline()  # EHLO again
            tls.sendall(b"250 localhost\r\n")
            tls_reader.readline()  # MAIL FROM
            # A record that claims to be application data but is no valid ciphertext.
            conn_raw = socket.socket(fileno=tls.fileno())
            conn_raw.sendall(b"\x17\x03\x03\x00\x20" + bytes(32))
            conn_raw.detach()
            with contextlib.suppress(OSError):  # the client's alert, or it hung up
                tls_reader.readline()
