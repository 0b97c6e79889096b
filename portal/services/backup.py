"""Backup and restore: a consistent snapshot of the database and the blobs; the keyring apart.

A backup folder (created 0700, every file 0600 with O_EXCL, so no existing
path is ever reused or re-moded)::

    manifest.json          format, kind, created_at (UTC), database kind, schema
                           revision, KEK versions the data keys need, and the
                           SHA-256 and size of every other file
    database.sqlite3       (SQLite: the online backup API)  or
    database.pgdump        (PostgreSQL: pg_dump --format=custom of the schema)
    blobs/ab/ab...         the ciphertext of every live attachment

Blobs are copied *after* the database snapshot. A blob is written before the
transaction that names it commits, so every blob the snapshot names exists
already; only blobs the snapshot names are copied (orphans stay behind). A
named blob that vanished in between (its message shredded meanwhile) fails the
backup loudly, and the partial folder is removed.

The keyring is deliberately not in the backup: blobs and sealed columns are
ciphertext, useless without it. Keep the keyring's own backup apart, so that
one stolen backup never holds both (NIST SP 800-57 part 1, 6.2.2: keys are
backed up separately from the data they protect).

The manifest's hashes detect a corrupt or altered file. They do not stop
someone who can rewrite both a file and the manifest: protect the backup
store itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from portal.crypto.errors import KeyUnavailable
from portal.crypto.keyring import Keyring
from portal.database import utcnow
from portal.migrate import alembic_config, schema_state
from portal.services import backup_db as dbs
from portal.services.errors import ServiceError
from portal.storage import BlobNotFound, FilesystemBlobStore

MANIFEST = "manifest.json"
FORMAT = 1
KIND = "pickup-portal-backup"
DIR_MODE = 0o700
COPY_CHUNK = 1024 * 1024  # bytes read and hashed at a time
_BLOB_PATH = re.compile(r"blobs/([0-9a-f]{2})/(\1[0-9a-f]{30})")
_DB_FILES = {"sqlite": dbs.SQLITE_FILE, "postgresql": dbs.PG_FILE}


@dataclass(frozen=True)
class Instance:
    """One portal's storage, handed over by the CLI: database URL and engine, blob store."""

    database_url: str
    engine: Engine
    blobs: FilesystemBlobStore

    @property
    def kind(self) -> str:
        """Return "sqlite" or "postgresql"."""
        return self.engine.dialect.name


@dataclass(frozen=True)
class Summary:
    """What a backup wrote or a restore loaded."""

    revision: str
    blobs: int
    kek_versions: list[int]


def backup(source: Instance, folder: Path) -> Summary:
    """Write a consistent snapshot of ``source`` to the new folder ``folder``; return what it holds.

    Raises ServiceError when ``folder`` exists or its parent does not, when the
    database is not at this release's schema, when pg_dump fails, or when a
    blob the snapshot names is missing; the partial folder is then removed.
    """
    current, head = schema_state(source.engine)
    if current != head:
        raise ServiceError(
            f"the database is at revision {current}, this release at {head}: "
            "run `portal db upgrade` first"
        )
    _make_dir(folder)
    created: list[Path] = [folder, folder / _DB_FILES[source.kind]]
    try:
        snap = (
            dbs.snapshot_sqlite(source.database_url, folder)
            if source.kind == "sqlite"
            else dbs.snapshot_postgresql(source.engine, source.database_url, folder)
        )
        files = {snap.file: _digest(folder / snap.file)}
        files.update(_copy_blobs(source.blobs, snap.blob_ids, folder, created))
        created.append(folder / MANIFEST)
        _write_manifest(folder, _manifest(source.kind, snap, files))
    except BaseException:
        _remove(created)
        raise
    return Summary(str(snap.revision), len(snap.blob_ids), snap.kek_versions)


def _make_dir(folder: Path) -> None:
    try:
        folder.mkdir(mode=DIR_MODE)
    except FileExistsError:
        raise ServiceError(f"{folder} exists: give the backup a new folder") from None
    except FileNotFoundError:
        raise ServiceError(f"the parent of {folder} does not exist") from None


def _copy_blobs(
    store: FilesystemBlobStore, blob_ids: Iterable[str], folder: Path, created: list[Path]
) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for blob_id in blob_ids:
        try:
            handle = store.open(blob_id)
        except BlobNotFound:
            raise ServiceError(
                f"blob {blob_id}, named by the database snapshot, vanished during "
                "the backup (a message shredded meanwhile?): run it again"
            ) from None
        relative = f"blobs/{blob_id[:2]}/{blob_id}"
        for directory in (folder / "blobs", folder / "blobs" / blob_id[:2]):
            if not directory.exists():
                directory.mkdir(mode=DIR_MODE)
                created.append(directory)
        with handle:
            created.append(folder / relative)
            entries[relative] = _copy_into(handle, dbs.create_private(folder / relative))
    return entries


def _copy_into(src: BinaryIO, fd: int) -> dict[str, Any]:
    """Copy ``src`` into the descriptor ``fd`` (closed after fsync); return its sha256 and size."""
    hasher, size = hashlib.sha256(), 0
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(COPY_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return {"sha256": hasher.hexdigest(), "size": size}


def _digest(path: Path) -> dict[str, Any]:
    hasher, size = hashlib.sha256(), 0
    with path.open("rb") as handle:
        while chunk := handle.read(COPY_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return {"sha256": hasher.hexdigest(), "size": size}


def _manifest(kind: str, snap: dbs.Snapshot, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "kind": KIND,
        "created_at": utcnow().isoformat(),
        "database": kind,
        "schema_revision": snap.revision,
        "pg_schema": snap.pg_schema,
        "kek_versions": snap.kek_versions,
        "keyring_included": False,
        "files": files,
    }


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    # Written last: a folder without a manifest is an unfinished backup, never restorable.
    with os.fdopen(dbs.create_private(folder / MANIFEST), "w", encoding="utf-8") as out:
        json.dump(manifest, out, indent=2, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(created: list[Path]) -> None:
    """Remove the paths this backup created (files, then their folders), nothing else."""
    for path in reversed(created):
        try:
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        except (FileNotFoundError, OSError):
            continue


def restore(target: Instance, folder: Path) -> Summary:
    """Load the backup in ``folder`` into the empty instance ``target``; return what it held.

    Every check comes before anything is written: the manifest, the database
    kind, the schema revision (a newer release's backup is refused), an empty
    target (no tables, no blob files) and every file's size and SHA-256.
    Raises ServiceError naming the first problem. The schema is left at the
    backup's revision: the caller upgrades it.
    """
    manifest = read_manifest(folder)
    _check_compatible(target, manifest)
    _check_empty(target, manifest)
    files = _verify_files(folder, manifest)
    written: list[str] = []
    try:
        _restore_blobs(target.blobs, folder, files, written)
        _restore_database(target, folder, manifest)
    except BaseException:
        for blob_id in written:
            target.blobs.delete(blob_id)
        raise
    return Summary(manifest["schema_revision"], len(written), list(manifest["kek_versions"]))


def _restore_blobs(
    store: FilesystemBlobStore, folder: Path, files: list[str], written: list[str]
) -> None:
    for relative in files:
        if (match := _BLOB_PATH.fullmatch(relative)) is not None:
            with (folder / relative).open("rb") as handle:
                store.put_at(match.group(2), iter(partial(handle.read, COPY_CHUNK), b""))
            written.append(match.group(2))


def read_manifest(folder: Path) -> dict[str, Any]:
    """Return the manifest of the backup in ``folder``; ServiceError if missing or malformed."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ServiceError(
            f"{folder} holds no {MANIFEST}: not a backup, or an unfinished one"
        ) from None
    except (OSError, ValueError):
        raise ServiceError(f"{MANIFEST} in {folder} is unreadable or not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise ServiceError(f"{MANIFEST} in {folder} is not a Pickup Portal backup manifest")
    if manifest.get("format") != FORMAT:
        raise ServiceError(
            f"backup format {manifest.get('format')!r} is not one this release reads ({FORMAT})"
        )
    if not isinstance(manifest.get("files"), dict) or not isinstance(
        manifest.get("kek_versions"), list
    ):
        raise ServiceError(f"{MANIFEST} in {folder} lacks its file list")
    return manifest


def _check_compatible(target: Instance, manifest: dict[str, Any]) -> None:
    if manifest.get("database") != target.kind:
        raise ServiceError(
            f"this is a backup of a {manifest.get('database')} database; "
            f"the target is {target.kind}"
        )
    script = ScriptDirectory.from_config(alembic_config(target.engine))
    known = {revision.revision for revision in script.walk_revisions()}
    if manifest.get("schema_revision") not in known:
        raise ServiceError(
            f"the backup's schema revision {manifest.get('schema_revision')!r} "
            "is unknown to this release (a newer one made it): upgrade the "
            "portal first"
        )


def _check_empty(target: Instance, manifest: dict[str, Any]) -> None:
    if target.kind == "sqlite":
        if not dbs.sqlite_is_empty(target.database_url):
            raise ServiceError("the target database is not empty: restore only into a new instance")
    else:
        schema, relations = dbs.pg_target_schema(target.engine)
        if schema is None:
            raise ServiceError("the target's search_path names no existing schema: create it")
        if relations:
            raise ServiceError(
                f"the target schema {schema} is not empty: restore only into a new instance"
            )
        if schema != manifest.get("pg_schema"):
            raise ServiceError(
                f"this backup holds schema {manifest.get('pg_schema')}, the target "
                f"uses {schema}: restore into a database whose schema is "
                f"{manifest.get('pg_schema')}"
            )
    if any(path.is_file() or path.is_symlink() for path in target.blobs.root.rglob("*")):
        raise ServiceError(
            f"the blob folder {target.blobs.root} is not empty: restore only into a new instance"
        )


def _verify_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Return the manifest's file names, blobs first, after checking each one's size and hash."""
    database = _DB_FILES[manifest["database"]]
    names = list(manifest["files"])
    if database not in names:
        raise ServiceError(f"the manifest lists no {database}")
    for relative in names:
        # Names come from a file we did not write: only our own layout, no path escapes.
        if relative != database and not _BLOB_PATH.fullmatch(relative):
            raise ServiceError("the manifest names a file outside the backup layout")
        _verify_one(folder, relative, manifest["files"][relative])
    return sorted(names, key=lambda name: name == database)


def _verify_one(folder: Path, relative: str, expected: Any) -> None:
    path = folder / relative
    if not path.is_file() or path.is_symlink():
        raise ServiceError(f"backup file {relative} is missing: nothing restored")
    if not isinstance(expected, dict) or _digest(path) != {
        "sha256": expected.get("sha256"),
        "size": expected.get("size"),
    }:
        raise ServiceError(
            f"backup file {relative} does not match the manifest (corrupt or "
            "altered): nothing restored"
        )


def _restore_database(target: Instance, folder: Path, manifest: dict[str, Any]) -> None:
    if target.kind == "sqlite":
        dbs.restore_sqlite(target.database_url, folder / dbs.SQLITE_FILE)
    else:
        dbs.restore_postgresql(target.database_url, folder / dbs.PG_FILE, manifest["pg_schema"])


def keyring_problem(path: str, needed: Iterable[int]) -> str | None:
    """Return why the keyring at ``path`` cannot open a backup needing KEKs ``needed``, or None.

    Only reads: a missing keyring is reported, never created.
    """
    if not Path(path).is_file():
        return (
            f"no keyring at {path}: restore it from its own backup before starting the "
            "portal (without it the restored content cannot be read)"
        )
    try:
        versions = set(Keyring.load(path).versions())
    except KeyUnavailable as error:
        return str(error)
    missing = sorted(set(needed) - versions)
    if missing:
        return (
            f"the keyring at {path} lacks KEK version(s) {', '.join(map(str, missing))} "
            "that this backup's data keys need: restore the keyring that belongs to it"
        )
    return None
