"""The shape every upload inspector has: fed the plaintext as it streams, then asked to finish.

The upload path hands each chunk of a file to every inspector (the malware
scanner, the content check) on its way into the encrypting blob writer, so no
inspector needs the plaintext on disk. Any inspector may refuse, at any chunk or
at the end, by raising :class:`UploadRejected`; the upload path then stops
reading, discards what it wrote and shows ``message`` to the uploader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

T_co = TypeVar("T_co", covariant=True)


class UploadRejected(ValueError):
    """An inspector refused the file; ``message`` is fit to show the uploader.

    It names no file and quotes none of its content (the uploader knows which
    file they sent; the message may reach a log). ``reason`` is a short code
    for the audit trail and logs.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


class Inspector(Protocol[T_co]):
    """Sees one file's plaintext in order, once; ``finish`` returns what it found.

    ``feed`` and ``finish`` raise :class:`UploadRejected` (or a subclass) to
    refuse the file. ``close`` releases what the inspector holds (a socket, a
    buffer) and is safe to call at any point, also after a refusal or twice. A ``chunk``
    is bytes or a byte view of bytes (a slice of an upload parser's read, uncopied):
    either may be kept, as nothing changes it.
    """

    def feed(self, chunk: bytes | memoryview) -> None:
        """Inspect the next ``chunk`` of the file; raise UploadRejected to refuse it."""
        ...

    def finish(self) -> T_co:
        """Inspect the end of the file and return the finding; raise UploadRejected to refuse."""
        ...

    def close(self) -> None:
        """Release any resource; never raises."""
        ...


@dataclass(frozen=True)
class Replacement:
    """The bytes to store instead of the file as uploaded (an image re-encoded), and their type."""

    data: bytes
    media_type: str


@runtime_checkable
class Typed(Protocol):
    """A finding that tells what the file is, and (optionally) what to store in its place.

    The upload path (``portal.services.uploads``) records ``media_type`` with the file
    (the replacement's, when set) and, when ``replacement`` is set, stores its bytes
    instead of the original's, then keeps :meth:`without_replacement` in its findings.
    """

    @property
    def media_type(self) -> str:
        """The media type of the file as uploaded (a replacement carries its own)."""
        ...

    @property
    def replacement(self) -> Replacement | None:
        """What to store instead of the uploaded bytes, or None to keep them."""
        ...

    def without_replacement(self) -> Typed:
        """This finding without its replacement's bytes, for the upload path to keep once
        it has stored them (so that no plaintext copy lives on with the upload)."""
        ...
