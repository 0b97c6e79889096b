"""Versioned key-encryption keys (KEKs) kept in a 0600 JSON file.

File format (``format`` 1)::

    {"format": 1, "active": 2, "keys": {"1": "<base64, 32 bytes>", "2": "..."}, "root": "<b64>"}

``keys`` hold the KEKs that wrap per-message and per-user data keys (envelope
encryption, NIST SP 800-57 part 1 section 6.2). Rotation adds a version and makes
it active; services rewrap data keys under it, then remove the old version once
no data key uses it. Content is never re-encrypted.

``root`` is a separate 32-byte secret, created once with the file and never
rotated. It is used only through ``Keyring.derive`` for purposes that need a
stable key, such as blind indexes (a keyed hash of an email address to look a
row up): rotating it would orphan every index, so it is kept out of the KEK
rotation. It never encrypts data keys.

The file is written atomically (temporary file in the same directory, fsync,
``os.replace``, fsync of the directory) with mode 0600, under an exclusive
``flock`` on the directory so two processes rotating at once cannot lose a key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from portal.crypto.errors import ContentTampered, KeyUnavailable
from portal.crypto.fields import derive_key

FORMAT = 1
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
FILE_MODE = 0o600
_WRAP_LABEL = b"pickup-portal/kek-wrap/v1"

PathLike = str | os.PathLike[str]


class FileIdentity(NamedTuple):
    """Which file, in which state: device and inode (an atomic replace makes a new inode),
    modification and change times in nanoseconds, and size.

    Two equal identities mean the same bytes for any writer that replaces the file (as
    ``Keyring`` does) or rewrites it in place (the times move); a cheap ``stat`` tells
    whether a cached keyring is still the file on disk.
    """

    device: int
    inode: int
    mtime_ns: int
    ctime_ns: int
    size: int

    @classmethod
    def of(cls, status: os.stat_result) -> FileIdentity:
        """Return the identity in ``status`` (from ``os.stat`` or ``os.fstat``)."""
        return cls(
            status.st_dev, status.st_ino, status.st_mtime_ns, status.st_ctime_ns, status.st_size
        )


def file_identity(path: PathLike) -> FileIdentity | None:
    """Return the identity of the file at ``path`` now, or None when it cannot be stat-ed."""
    try:
        return FileIdentity.of(os.stat(path))
    except OSError:
        return None


class Keyring:
    """The KEKs of one keyring file, as loaded; mutations rewrite the file."""

    __slots__ = ("_active", "_identity", "_keys", "_path", "_root")

    def __init__(
        self,
        path: Path,
        active: int,
        keys: dict[int, bytes],
        root: bytes,
        identity: FileIdentity | None = None,
    ) -> None:
        """Build a keyring from parts; use ``load`` or ``load_or_create`` instead."""
        self._path = path
        self._active = active
        self._keys = dict(keys)
        self._root = root
        self._identity = identity

    def __repr__(self) -> str:
        return f"<Keyring {self._path} active={self._active} versions={self.versions()}>"

    @classmethod
    def load(cls, path: PathLike) -> Keyring:
        """Return the keyring read from ``path`` (re-read on every call).

        Its ``identity`` is that of the file the bytes came from (``fstat`` of the open
        descriptor), so a file replaced between a caller's ``stat`` and this read is never
        mistaken for the one read. Raises ``KeyUnavailable``, naming the path but no key
        material, when the file is missing, unreadable or malformed.
        """
        path = Path(path)
        try:
            with path.open("rb") as handle:
                identity = FileIdentity.of(os.fstat(handle.fileno()))
                raw = handle.read()
        except OSError as exc:
            raise KeyUnavailable(f"keyring {path} unreadable: {exc.strerror}") from None
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise KeyUnavailable(f"keyring {path} malformed: not JSON") from None
        return cls._from_json(path, data, identity)

    @classmethod
    def load_or_create(cls, path: PathLike) -> Keyring:
        """Return the keyring at ``path``, first creating it (version 1, mode 0600) if missing.

        The parent directory is created 0700 if needed. Raises
        ``KeyUnavailable`` when an existing file is unreadable or malformed.
        """
        path = Path(path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(path):
            if path.exists():
                return cls.load(path)
            keyring = cls(path, 1, {1: _random_key()}, _random_key())
            keyring._write()
            return keyring

    @property
    def path(self) -> Path:
        """The keyring file's path."""
        return self._path

    @property
    def identity(self) -> FileIdentity | None:
        """The identity of the file this keyring was read from (None: made, not read).

        A keyring whose own methods rewrote the file keeps the identity it was read
        with, so a cache comparing it with the file re-reads once: never stale.
        """
        return self._identity

    @property
    def active_version(self) -> int:
        """The version of the KEK that ``wrap`` uses."""
        return self._active

    def versions(self) -> list[int]:
        """Return the KEK versions present, ascending."""
        return sorted(self._keys)

    def wrap(self, dek: bytes, aad: bytes) -> tuple[int, bytes]:
        """Wrap data key ``dek`` under the active KEK, bound to ``aad`` and to the KEK version.

        Returns ``(kek_version, wrapped)``; ``wrapped`` is nonce || ciphertext ||
        tag (AES-256-GCM, fresh random nonce). Raises nothing of ours.
        """
        version = self._active
        nonce = secrets.token_bytes(NONCE_SIZE)
        wrapped = AESGCM(self._keys[version]).encrypt(nonce, dek, _wrap_aad(version, aad))
        return version, nonce + wrapped

    def unwrap(self, version: int, wrapped: bytes, aad: bytes) -> bytes:
        """Return the data key that ``wrap`` wrapped under KEK ``version`` with ``aad``.

        Raises ``KeyUnavailable`` if ``version`` is not in the keyring, and
        ``ContentTampered`` if ``wrapped`` is malformed or fails authentication
        (modified, wrong AAD, or recorded under the wrong version).
        """
        kek = self._keys.get(version)
        if kek is None:
            raise KeyUnavailable(f"KEK version {version} is not in keyring {self._path}")
        if len(wrapped) < NONCE_SIZE + TAG_SIZE:
            raise ContentTampered("wrapped data key malformed")
        try:
            return AESGCM(kek).decrypt(
                wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], _wrap_aad(version, aad)
            )
        except InvalidTag:
            raise ContentTampered("wrapped data key failed authentication") from None

    def rewrap(self, version: int, wrapped: bytes, aad: bytes) -> tuple[int, bytes]:
        """Return ``wrapped`` rewrapped under the active KEK, as ``(active_version, wrapped)``.

        Raises what ``unwrap`` raises.
        """
        return self.wrap(self.unwrap(version, wrapped, aad), aad)

    def add_version(self) -> int:
        """Add a new random KEK, make it active, rewrite the file; return its version.

        Re-reads the file under the lock first, so versions another process
        added are kept. Raises ``KeyUnavailable`` if the file became unreadable.
        """
        with _locked(self._path):
            self._reload()
            version = max(self._keys) + 1
            self._keys[version] = _random_key()
            self._active = version
            self._write()
        return version

    def remove_version(self, version: int) -> None:
        """Delete KEK ``version`` from the file (dangerous: data keys it wraps become unreadable).

        The caller must first check no data key is still wrapped by it.
        Does nothing if the version is absent. Raises ValueError for the
        active version and ``KeyUnavailable`` if the file became unreadable.
        """
        with _locked(self._path):
            self._reload()
            if version == self._active:
                raise ValueError(f"refusing to remove the active KEK version {version}")
            if self._keys.pop(version, None) is not None:
                self._write()

    @staticmethod
    def new_data_key() -> bytes:
        """Return a fresh random 32-byte data key (AES-256)."""
        return _random_key()

    def derive(self, purpose: str) -> bytes:
        """Return a stable 32-byte key for ``purpose`` (HKDF-SHA256 from the never-rotated root).

        For keyed lookups such as blind indexes; never for wrapping data keys.
        Raises ValueError for an empty purpose.
        """
        return derive_key(self._root, purpose)

    def _reload(self) -> None:
        fresh = Keyring.load(self._path)
        self._active, self._keys, self._root = fresh._active, fresh._keys, fresh._root
        self._identity = fresh._identity

    def _write(self) -> None:
        document = {
            "format": FORMAT,
            "active": self._active,
            "keys": {str(v): _b64(k) for v, k in sorted(self._keys.items())},
            "root": _b64(self._root),
        }
        _write_atomic(self._path, (json.dumps(document, indent=2) + "\n").encode())

    @classmethod
    def _from_json(cls, path: Path, data: Any, identity: FileIdentity | None = None) -> Keyring:
        def bad(what: str) -> KeyUnavailable:
            return KeyUnavailable(f"keyring {path} malformed: {what}")

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise bad(f"expected an object with format {FORMAT}")
        active, entries = data.get("active"), data.get("keys")
        if not isinstance(entries, dict) or not entries:
            raise bad("no keys")
        keys: dict[int, bytes] = {}
        for name, value in entries.items():
            if not (isinstance(name, str) and name.isdigit() and int(name) > 0):
                raise bad("key versions must be positive integers")
            keys[int(name)] = _decode_key(value, bad(f"key version {name} is not 32 bytes"))
        if type(active) is not int or active not in keys:
            raise bad("active version is not one of the keys")
        root = _decode_key(data.get("root"), bad("root secret is not 32 bytes"))
        return cls(path, active, keys, root, identity)


def _wrap_aad(version: int, aad: bytes) -> bytes:
    return _WRAP_LABEL + version.to_bytes(4, "big") + len(aad).to_bytes(4, "big") + aad


def _random_key() -> bytes:
    return secrets.token_bytes(KEY_SIZE)


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def _decode_key(value: Any, error: KeyUnavailable) -> bytes:
    if not isinstance(value, str):
        raise error
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise error from None
    if len(key) != KEY_SIZE:
        raise error
    return key


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on the keyring's directory (no stray lock file)."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_atomic(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` atomically with mode 0600 whatever the umask."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            # A umask can only narrow the creation mode; set it exactly anyway.
            os.fchmod(handle.fileno(), FILE_MODE)
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
