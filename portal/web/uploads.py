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
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast

from flask import Flask, Request, Response, current_app, request
from flask_login import current_user
from werkzeug.exceptions import HTTPException
from werkzeug.formparser import FormDataParser, MultiPartParser

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


class _FormParser(FormDataParser):
    """Werkzeug's form parser, reading the body ``PARSE_CHUNK`` bytes at a time."""

    def _parse_multipart(
        self,
        stream: IO[bytes],
        mimetype: str,
        content_length: int | None,
        options: dict[str, str],
    ) -> tuple[IO[bytes], Any, Any]:
        parser = MultiPartParser(
            stream_factory=self.stream_factory,
            max_form_memory_size=self.max_form_memory_size,
            max_form_parts=self.max_form_parts,
            cls=self.cls,
            buffer_size=PARSE_CHUNK,
        )
        boundary = options.get("boundary", "").encode("ascii")
        if not boundary:
            raise ValueError("Missing boundary")
        form, files = parser.parse(stream, boundary, content_length)
        return stream, form, files


class StreamingRequest(Request):
    """Flask's request, with each file part streamed into the encrypted store (module doc)."""

    form_data_parser_class = _FormParser
    upload_staging: Staging | None = None
    # The status the view will answer this caller (Uploaders.refusal), once asked.
    upload_refusal: int | None = None
    dropped_files = 0  # file parts read and dropped because of upload_refusal
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
        if self._refused_uploads(gate):
            self.dropped_files += 1
            return cast(IO[bytes], _Dropped())
        if self.upload_staging is None:
            self.upload_staging = gate.policy.start(content.blob_store())
        return cast(IO[bytes], self.upload_staging.open(filename or "", content_type))

    def _refused_uploads(self, gate: _Gate | None) -> bool:
        """Ask the view's Uploaders once per request; True when this caller's files drop."""
        if gate is not None and not self._gate_asked:
            self._gate_asked = True
            self.upload_refusal = gate.uploaders.refusal(self.view_args or {})
        return self.upload_refusal is not None

    def make_form_data_parser(self) -> FormDataParser:
        """Werkzeug's parser, made to raise on a malformed body instead of parsing nothing."""
        parser = super().make_form_data_parser()
        parser.silent = False
        return parser

    def _load_form_data(self) -> None:
        if "form" in self.__dict__:
            return
        if self.mimetype == "multipart/form-data":
            self._refused_uploads(_gate_of(self.endpoint))  # before any part is parsed
        try:
            super()._load_form_data()
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
    """A file part of a caller the view refuses (Uploaders): stored, scanned, encrypted nowhere."""

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        return len(memoryview(data))

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return 0
