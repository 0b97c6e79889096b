"""File uploads stream from the request body into the encrypted store: no plaintext spool.

Werkzeug's form parser writes each file part into whatever its request's
``_get_file_stream`` returns; by default a ``SpooledTemporaryFile``, which moves every
file over 500 KiB to an unlinked *plaintext* file in the temp folder (a copy of the
PHI on disk, readable by anyone who reaches the process's descriptors, and every
byte written twice). :class:`StreamingRequest`, the app's request class, returns a
``services.uploads.StagedUpload`` instead: each piece of the part is counted,
hashed, inspected and encrypted into a temporary blob as the parser reads it.

Only views marked :func:`accepts_uploads` take files, under the marked policy:

- a file sent anywhere else is refused (400) before a byte of it is kept;
- before a byte of any part is parsed, the view's :class:`Uploaders` say whether this
  caller may send files here: signed in, in one of its roles, within its rate limit
  (counted nothing), and past its own access check (a conversation of theirs, a team
  of theirs). Anyone else's file parts are parsed and dropped: no blob, no scan, no
  encryption, no verdict to audit. The view then answers as it always does (sign-in
  redirect, 403, 404, 429), its own checks unchanged and still the ones that decide;
  should it take the request after all, :func:`staged` refuses the dropped files (409)
  rather than send the message without them;
- a file part is staged only after the request's CSRF token has been read and found
  valid (Flask-WTF's ``validate_csrf``): the token travels in the body, and Flask-WTF
  checks it only once the whole body is parsed, so without this a cross-site page could
  make a signed-in member's browser have the portal encrypt, scan and audit its files.
  Every form of the portal sends ``csrf_token`` first (``{{ form.csrf_token }}`` opens
  each upload form, and browsers send fields in page order). A file part before a valid
  token is dropped, and the request fails CSRF with its 400 page even should a valid
  token follow (``FilesBeforeToken``), as it does for a missing or wrong one;
- a file past the policy's size, too many files, or a malformed multipart body
  answer 413 or 400 with nothing kept; a refusal by an inspector reaches the
  view as part of the staging (``Staging.accepted`` raises UploadRefused there).

Files not kept by the end of the request (``StagedUpload.keep``, inside
``messages.create``) are deleted when it ends, whatever happened.

Every scan verdict of the request's files (clean, infected, scanner unavailable) is
audited as ``upload.scanned`` by mechanism, after the view and before the request's
commit (``portal.web.transaction``): a view that refuses an upload rolls its own
work back and answers a page, and the refusal's event still lands with that
page's commit. A request whose view raised rolls everything back, events included.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast

from flask import Flask, Request, Response, current_app, request
from flask_login import current_user
from flask_wtf.csrf import CSRFError, validate_csrf
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.formparser import FormDataParser, MultiPartParser
from werkzeug.sansio.multipart import (
    Data,
    Epilogue,
    Field,
    File,
    MultipartDecoder,
    NeedData,
    State,
)
from werkzeug.wsgi import LimitedStream
from wtforms import ValidationError

from portal.audit import actor_of
from portal.extensions import db
from portal.models import Role
from portal.services import content, upload_scans
from portal.services.uploads import Staging, TooManyFiles, UploadPolicy, UploadTooLarge
from portal.web import transaction
from portal.web.errors import page
from portal.web.limits import SharedLimit
from portal.web.security import request_meta

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

F = TypeVar("F", bound=Callable[..., Any])
_GATE = "upload_gate"  # the attribute accepts_uploads sets on a view
MIB = 1024 * 1024
# Bytes the multipart parser reads from the body at a time (Werkzeug's default: 64 KiB).
# Under Werkzeug's 500 kB MAX_FORM_MEMORY_SIZE, which bounds its buffer per read too.
PARSE_CHUNK = 256 * 1024

MALFORMED = (
    "The form could not be read: its data arrived incomplete or malformed. "
    "Go back and send it again."
)
NOT_HERE = "This page does not take files."
NAMELESS = "A file was sent without a file name. Go back and choose it again."
DROPPED = (
    "Your files could not be taken just now, so nothing was sent. Go back and send them again."
)


class UploadError(HTTPException):
    """An upload refused before it reached a view; ``description`` is shown (no PHI)."""

    def __init__(self, description: str) -> None:
        super().__init__(description)


class MalformedUpload(UploadError):
    """A multipart body that cannot be parsed, a file where none is taken (400)."""

    code = 400


class UploadTooBig(UploadError):
    """A file past the policy's size, or more files than it allows (413)."""

    code = 413


class UploadDropped(UploadError):
    """A view took a request whose files the gate had dropped (409): sent again, they count."""

    code = 409


class FilesBeforeToken(CSRFError):
    """A file part came before any valid CSRF token (module doc): dropped, and the request
    refused as Flask-WTF refuses a bad token (its 400 page), whatever followed the file."""

    description = "No valid CSRF token came before the files."


@dataclass(frozen=True)
class Uploaders:
    """Who may send files to a view: asked once, before the first part of the body is parsed.

    ``roles`` as the view's role check; ``limit`` the rate limit the view counts (asked,
    not counted); ``access`` the view's own check of its URL's arguments (True: this
    caller's), which must read only, never audit (the view audits its refusal itself).
    """

    roles: frozenset[Role]
    limit: SharedLimit | None = None
    access: Callable[..., bool] | None = None

    def refusal(self, view_args: Mapping[str, Any]) -> int | None:
        """Return None when the caller may upload, else the kind of refusal the view's own
        checks will give (401, 403, 429, 404; the view decides the page and its status)."""
        if not current_user.is_authenticated:
            return 401
        if current_user.role not in self.roles:
            return 403
        if self.limit is not None and self.limit.spent():
            return 429
        if self.access is not None and not self.access(**view_args):
            return 404
        return None


@dataclass(frozen=True)
class _Gate:
    policy: UploadPolicy
    uploaders: Uploaders


def accepts_uploads(
    policy: UploadPolicy,
    *,
    roles: Collection[Role],
    limit: SharedLimit | None = None,
    access: Callable[..., bool] | None = None,
) -> Callable[[F], F]:
    """Mark a view as taking files under ``policy`` from the :class:`Uploaders` described by
    ``roles``, ``limit`` and ``access``; returns the view itself, marked.

    Put it above the route's other decorators (it is read from the registered view); they
    stay, and decide: these only spare the portal the files of a request they will refuse.
    """
    gate = _Gate(policy, Uploaders(frozenset(roles), limit, access))

    def mark(view: F) -> F:
        setattr(view, _GATE, gate)
        return view

    return mark


class _MultiPartParser(MultiPartParser):
    """Werkzeug's multipart parser that hands each form field to ``on_field`` as soon as the
    field ends, before the next part begins (so a field can decide the fate of a file after
    it: the CSRF token, module doc).

    ``parse`` is Werkzeug's own (3.1), event for event and limit for limit, with that one
    call added: Werkzeug keeps the fields read so far in a local of its ``parse``; and one
    shortcut, which changes no byte of what it makes (:func:`_write_through`): most of a
    file part goes to its stream straight from the body's reads, uncopied, rather than
    through Werkzeug's decoder, which copies each byte about four times on its way (into
    its buffer, slices of it, ``bytes`` of those).
    """

    def __init__(self, on_field: Callable[[str, str], None], **options: Any) -> None:
        super().__init__(**options)
        self.on_field = on_field

    def parse(
        self, stream: IO[bytes], boundary: bytes, content_length: int | None
    ) -> tuple[MultiDict[str, str], MultiDict[str, FileStorage]]:
        decoder = MultipartDecoder(
            boundary, max_form_memory_size=self.max_form_memory_size, max_parts=self.max_form_parts
        )
        fields: list[tuple[str, str]] = []
        files: list[tuple[str, FileStorage]] = []
        part: Field | File | None = None
        text: list[bytes] = []  # the current field's bytes
        size = 0
        sink: IO[bytes] | None = None  # the current file's stream; None in a field
        delimiter = b"--" + boundary
        # Whether this Werkzeug's decoder is the one _write_through was written for (a
        # test pins it); should it change, every byte goes through the decoder.
        shortcut = isinstance(getattr(decoder, "buffer", None), bytearray) and isinstance(
            getattr(decoder, "state", None), State
        )
        for data in _chunks(stream, self.buffer_size):
            if (
                shortcut
                and sink is not None
                and data is not None
                and decoder.state is State.DATA
                and _write_through(decoder, sink, data, delimiter, self.max_form_memory_size)
            ):
                continue
            decoder.receive_data(data)
            event = decoder.next_event()
            while not isinstance(event, Epilogue | NeedData):
                if isinstance(event, Field):
                    part, text, size, sink = event, [], 0, None
                elif isinstance(event, File):
                    part, sink = event, self.start_file_streaming(event, content_length)
                elif isinstance(event, Data) and part is not None:
                    if sink is not None:
                        sink.write(event.data)
                    else:
                        size += len(event.data)
                        most = self.max_form_memory_size
                        if most is not None and size > most:
                            raise RequestEntityTooLarge()
                        text.append(event.data)
                    if not event.more_data:
                        if sink is None:
                            charset = self.get_part_charset(part.headers)
                            value = b"".join(text).decode(charset, "replace")
                            fields.append((part.name, value))
                            self.on_field(part.name, value)
                        else:
                            sink.seek(0)
                            name, filename = part.name, cast(File, part).filename
                            files.append(
                                (name, FileStorage(sink, filename, name, headers=part.headers))
                            )
                event = decoder.next_event()
        return self.cls(fields), self.cls(files)


def _ignore_field(_name: str, _value: str) -> None:
    return None


def _write_through(
    decoder: MultipartDecoder,
    sink: IO[bytes],
    data: bytes,
    delimiter: bytes,
    most: int | None,
) -> bool:
    """Write the next read of a file part's body, ``data``, past the decoder to the part's
    ``sink`` when that is sure to give the very bytes the decoder would; return True when
    done, False to leave ``data`` to the decoder.

    Called in the decoder's ``State.DATA`` only (inside a part, its headers read), where
    ``decoder.buffer`` holds what the decoder held back of the part so far: the bytes
    from the last line break that might begin a delimiter, at most ``hold`` bytes (below);
    everything before them it has handed on.

    Why the bytes are the decoder's: a delimiter is a line break (CRLF, LF or CR), ``--``
    and the boundary (``delimiter`` here), then what ends it. The decoder matches one
    only where ``delimiter`` occurs in its buffer, and a delimiter that begins at some
    byte has its ``delimiter`` whole within ``hold = len(b"\r\n" + delimiter)`` bytes of
    it. When ``delimiter`` occurs neither in ``data`` nor across the junction of the held
    bytes and ``data`` (the only place an occurrence could straddle them), no delimiter
    begins in the held bytes, nor in ``data`` before its last ``hold`` bytes: one that did
    would have its ``delimiter`` whole inside ``held + data``. Those bytes are the part's,
    whatever follows; the decoder would hand each on as Data, in order. They go to
    ``sink``: the held bytes (a few, copied: the decoder's buffer is mutable), then
    ``data`` but what the decoder would itself hold back of it, as a memoryview (not
    copied). That tail (from the earliest of the last CR and the last LF within the last
    ``hold`` bytes, or nothing: Werkzeug's own rule) becomes the decoder's buffer, parsed
    with what follows as if it had held it back itself, so its buffer, and its
    max_form_memory_size check of buffer plus next read, are what they would have been;
    no match the decoder then finds or misses (its quirks included) differs from its own,
    and what it hands on, in all, is what it would have: the part's bytes are Werkzeug's,
    byte for byte, whatever the read sizes (the parity tests of test_upload_gate.py).

    Any other read goes through the decoder, as does one that its ``max_form_memory_size``
    check (``most``, made of its buffer plus each read) would refuse, so that it still does.
    """
    hold = len(b"\r\n") + len(delimiter)
    held = decoder.buffer
    if len(data) <= hold or (most is not None and len(held) + len(data) > most):
        return False
    if data.find(delimiter) != -1:
        return False
    if held and (held + data[: len(delimiter) - 1]).find(delimiter) != -1:
        return False
    # Held back: what the decoder itself would hold of this read (from the earliest of the
    # last CR and the last LF within its last ``hold`` bytes, or nothing), so that its
    # buffer, and its max_form_memory_size check of buffer plus next read, are Werkzeug's.
    tail = data[-hold:]
    keep = (
        len(data)
        - hold
        + min(
            (found for found in (tail.rfind(b"\n"), tail.rfind(b"\r")) if found != -1),
            default=hold,
        )
    )
    view = memoryview(data)
    if held:
        sink.write(bytes(held))
    sink.write(view[:keep])
    held[:] = view[keep:]
    return True


def _chunks(stream: IO[bytes], size: int) -> Iterator[bytes | None]:
    """The body ``size`` bytes at a time until it ends, then None (the decoder's end)."""
    while data := stream.read(size):
        yield data
    yield None


class _FormParser(FormDataParser):
    """Werkzeug's form parser, reading the body ``PARSE_CHUNK`` bytes at a time and telling
    ``on_field`` of each multipart field as it ends (:class:`_MultiPartParser`)."""

    on_field: Callable[[str, str], None] | None = None  # set by StreamingRequest

    def _parse_multipart(
        self,
        stream: IO[bytes],
        mimetype: str,
        content_length: int | None,
        options: dict[str, str],
    ) -> tuple[IO[bytes], Any, Any]:
        parser = _MultiPartParser(
            self.on_field or _ignore_field,
            stream_factory=self.stream_factory,
            max_form_memory_size=self.max_form_memory_size,
            max_form_parts=self.max_form_parts,
            cls=self.cls,
            buffer_size=PARSE_CHUNK,
        )
        boundary = options.get("boundary", "").encode("ascii")
        if not boundary:
            raise ValueError("Missing boundary")
        stream = _uncopied(stream)
        form, files = parser.parse(stream, boundary, content_length)
        return stream, form, files


class _UncopiedBody(LimitedStream):
    """Werkzeug's LimitedStream (the request's ``stream``), whose ``read`` hands on the bytes
    the server's stream returns, limits and errors the same.

    LimitedStream reads through ``io.RawIOBase.read``: a fresh zeroed bytearray per read,
    the server's bytes copied into it (``readinto``), then copied again to ``bytes``; for
    a 100 MiB upload in 256 KiB reads that cost about 0.16 CPU-s here, about what
    gunicorn's own reading of the body costs. Its state (``_stream``, ``_pos``, and
    ``_limit_is_max``, read by :func:`_uncopied`) is Werkzeug's own; a test pins it.
    """

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return super().read(-1)  # the whole rest: LimitedStream's readall
        remaining = self.limit - self._pos
        if remaining <= 0:  # as LimitedStream.readinto: 413 past a maximum, else nothing
            self.on_exhausted()
            return b""
        try:  # (a read of 0 bytes, like a hang-up, is a disconnect, as in LimitedStream)
            data = self._stream.read(min(size, remaining))
        except (OSError, ValueError) as error:
            self.on_disconnect(error=error)  # ClientDisconnected (400)
            return b""
        if not data:
            self.on_disconnect()
            return b""
        self._pos += len(data)
        return data


def _uncopied(stream: IO[bytes]) -> IO[bytes]:
    """``stream`` read through :class:`_UncopiedBody` when it is Werkzeug's LimitedStream,
    as it is for every request with a body (else, or should LimitedStream's state change,
    ``stream`` itself)."""
    given: object = stream  # typeshed's IO cannot say it is a LimitedStream
    if type(given) is not LimitedStream or not all(
        hasattr(given, name) for name in ("_stream", "_pos", "_limit_is_max")
    ):
        return stream
    body = _UncopiedBody(given._stream, given.limit, is_max=given._limit_is_max)
    body._pos = given._pos
    return cast(IO[bytes], body)


class StreamingRequest(Request):
    """Flask's request, with each file part streamed into the encrypted store (module doc)."""

    form_data_parser_class = _FormParser
    upload_staging: Staging | None = None
    # The status the view will answer this caller (Uploaders.refusal), once asked.
    upload_refusal: int | None = None
    dropped_files = 0  # file parts read and dropped: upload_refusal, or no valid token first
    # Whether the body's CSRF token has been read and is valid (None: not read yet).
    csrf_valid: bool | None = None
    _csrf_dropped = False  # a file part dropped because no valid token came before it
    _gate_asked = False

    def _get_file_stream(
        self,
        total_content_length: int | None,
        content_type: str | None,
        filename: str | None = None,
        content_length: int | None = None,
    ) -> IO[bytes]:
        gate = _gate_of(self.endpoint)
        if gate is None:
            raise MalformedUpload(NOT_HERE)
        # Werkzeug needs only write() and seek(0) of what it returns, as typeshed's IO cannot say.
        refused = self._refused_uploads(gate)
        unchecked = _csrf_checked() and not self.csrf_valid
        if refused or unchecked:
            self._csrf_dropped = self._csrf_dropped or unchecked
            return cast(IO[bytes], _Dropped(self._count_dropped, counted=bool(filename)))
        if self.upload_staging is None:
            self.upload_staging = gate.policy.start(content.blob_store())
        return cast(IO[bytes], self.upload_staging.open(filename or "", content_type))

    def _count_dropped(self) -> None:
        """A dropped file part was a file: named, or with bytes (not a browser's "no file
        chosen", which :func:`staged` must not answer with "your files could not be taken")."""
        self.dropped_files += 1

    def _refused_uploads(self, gate: _Gate | None) -> bool:
        """Ask the view's Uploaders once per request; True when this caller's files drop.

        Asked again should the question fail (the limiter's store or the database down):
        until it has answered, no answer stands in for it."""
        if gate is not None and not self._gate_asked:
            self.upload_refusal = gate.uploaders.refusal(self.view_args or {})
            self._gate_asked = True
        return self.upload_refusal is not None

    def make_form_data_parser(self) -> FormDataParser:
        """Werkzeug's parser, made to raise on a malformed body instead of parsing nothing."""
        parser = super().make_form_data_parser()
        parser.silent = False
        if isinstance(parser, _FormParser):
            parser.on_field = self._read_field
        return parser

    def _read_field(self, name: str, value: str) -> None:
        """Check the body's first CSRF token as soon as it is read, as Flask-WTF will once the
        whole body is (its field, or a prefixed form's ``<prefix>-csrf_token``)."""
        field = current_app.config.get("WTF_CSRF_FIELD_NAME", "csrf_token")
        if self.csrf_valid is not None or not value or not name.endswith(field):
            return
        if not _csrf_checked():
            return
        try:
            validate_csrf(value)
        except ValidationError:
            self.csrf_valid = False
        else:
            self.csrf_valid = True

    def _load_form_data(self) -> None:
        if "form" in self.__dict__:
            return
        if self.mimetype == "multipart/form-data":
            self._refused_uploads(_gate_of(self.endpoint))  # before any part is parsed
        try:
            super()._load_form_data()
            if self._csrf_dropped:
                raise FilesBeforeToken()  # also when a valid token came after the files
            if self.upload_staging is not None:
                self.upload_staging.seal()  # the last file part ends with the body
        except BaseException as error:
            staging = self.upload_staging
            self._forget_form()
            refusal = _refusal_for(error, staging.max_bytes if staging else None)
            if refusal is None:
                raise  # a disconnect (400), Werkzeug's own limits (413), a full disk (507)
            raise refusal from None

    def _forget_form(self) -> None:
        """After a failed parse: nothing kept, and no second parse of a consumed body."""
        if self.upload_staging is not None:
            self.upload_staging.discard()
        self.__dict__.update(
            form=self.parameter_storage_class(), files=self.parameter_storage_class()
        )


def _refusal_for(error: BaseException, limit: int | None) -> UploadError | None:
    """Our answer to ``error`` met while parsing (``limit``: the policy's bytes per file),
    or None to let it through as it is."""
    if isinstance(error, UploadTooLarge):
        most = f" (at most {limit // MIB} MiB)" if limit else ""
        return UploadTooBig(f"A file is larger than this portal accepts{most}.")
    if isinstance(error, TooManyFiles):
        return UploadTooBig(str(error))
    if isinstance(error, ValueError):  # Werkzeug's word for a malformed body (decoding too)
        return MalformedUpload(MALFORMED)
    return None


def staged(field: str) -> Staging | None:
    """Return the files of this request, all sent in the form field ``field``, or None.

    Raises MalformedUpload (400) for a file sent in another field, and for a file
    without a name: a part of ``field`` that is not a file, or a file part whose
    name is empty but not its content (a browser sends that only for no file chosen).
    Raises UploadDropped (409) when the request's files were dropped by its view's
    :class:`Uploaders` (module doc) and the view took it nonetheless.
    """
    if getattr(request, "dropped_files", 0):
        raise UploadDropped(DROPPED)
    if request.form.getlist(field):
        raise MalformedUpload(NAMELESS)
    if any(name != field for name in request.files):
        raise MalformedUpload(NOT_HERE)
    staging = request.upload_staging if isinstance(request, StreamingRequest) else None
    if staging and any(u.chosen and not u.filename.strip() for u in staging.uploads):
        raise MalformedUpload(NAMELESS)
    return staging


def init_app(app: Flask) -> None:
    """Install the streaming request class, its error page and the end-of-request clean-up."""
    app.request_class = StreamingRequest
    app.register_error_handler(UploadError, _refused)
    # After-request hooks run last-registered first: this one is installed after
    # transaction.init_app (portal.web.init_app), so its events join the request's commit.
    app.after_request(_audit_scans)
    app.teardown_request(_discard)


def _csrf_checked() -> bool:
    """Whether Flask-WTF's CSRFProtect checks this request (so its files wait for the token).

    Every view that takes files is left to CSRFProtect (none is exempt): one exempted would
    have its files dropped without a valid token first, never taken unchecked.
    """
    config = current_app.config
    return bool(
        config.get("WTF_CSRF_ENABLED", True)
        and config.get("WTF_CSRF_CHECK_DEFAULT", True)
        and request.method in config.get("WTF_CSRF_METHODS", {"POST", "PUT", "PATCH", "DELETE"})
    )


def _gate_of(endpoint: str | None) -> _Gate | None:
    view = current_app.view_functions.get(endpoint) if endpoint else None
    gate = getattr(view, _GATE, None)
    return gate if isinstance(gate, _Gate) else None


def _refused(error: UploadError) -> tuple[str, int]:
    return page(error.code or 400, error.description)


def _audit_scans(response: Response) -> Response:
    """Audit the scan verdict of each of this request's files (module doc); the response as is."""
    staging = getattr(request, "upload_staging", None)
    if (
        isinstance(staging, Staging)
        and current_user.is_authenticated
        and not transaction.rolls_back()
    ):
        upload_scans.record_staging(
            db.session, staging, actor=actor_of(current_user), meta=request_meta()
        )
    return response


def _discard(_error: BaseException | None) -> None:
    staging = getattr(request, "upload_staging", None)
    if isinstance(staging, Staging):
        staging.discard()


class _Dropped(io.RawIOBase):
    """A file part of a caller the view refuses (Uploaders): stored, scanned, encrypted nowhere.

    ``count`` is called once, when the part proves to be a file: at once when ``counted``
    (it has a name), else at its first byte."""

    def __init__(self, count: Callable[[], None], *, counted: bool) -> None:
        super().__init__()
        self._count = count
        self._counted = counted
        if counted:
            count()

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        size = len(memoryview(data))
        if size and not self._counted:
            self._counted = True
            self._count()
        return size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return 0
