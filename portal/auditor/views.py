"""Auditor pages. Auditors see metadata and patient names, never message content."""

from __future__ import annotations

from typing import Any

from flask import (
    Blueprint,
    Response,
    redirect,
    render_template,
    request,
    stream_with_context,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_login import current_user

from portal.audit import actor_of
from portal.auditor import forms
from portal.auth.policy import fresh_auth, roles
from portal.database import utcnow
from portal.extensions import db
from portal.models import Role
from portal.services import accounts, audit_export, audit_query, disclosures, messaging
from portal.services.errors import ServiceError
from portal.web.security import request_meta
from portal.web.transaction import commit_now

bp = Blueprint("auditor", __name__, url_prefix="/audit")
EXPORT_TYPES = {
    "csv": ("text/csv", "csv"),
    "json": ("application/x-ndjson", "jsonl"),
    "fhir": ("application/fhir+json", "json"),
}


# Filters a results URL may carry: opaque public ids, never an email address (ASVS V8.3.1:
# no sensitive data in query strings, which browser history and proxy logs keep).
URL_FILTERS = (
    "patient_id",
    "actor_id",
    "action",
    "outcome",
    "message",
    "client_ip",
    "since",
    "until",
)
EMAIL_FILTERS = {"patient": "patient_id", "actor": "actor_id"}
NO_EMAIL_IN_URL = "Search by email with the form: addresses are never accepted in a link."


def _user_id(public_id: str | None, label: str) -> int | None:
    if not public_id:
        return None
    found = accounts.find_by_public_id(db.session, public_id)
    if found is None:
        raise ServiceError(f"No account has that {label} id.")
    return found.id


def _public_id(email: str, label: str) -> str:
    user = accounts.find_by_email(db.session, email)
    if user is None:
        raise ServiceError(f"No account has that {label} email address.")
    return user.public_id


def _refuse_emails_in_url() -> None:
    """Raise ServiceError when a URL carries an email filter (an old bookmark, a hand-made link)."""
    if any(request.args.get(name) for name in EMAIL_FILTERS):
        raise ServiceError(NO_EMAIL_IN_URL)


def _message_id(public_id: str | None) -> int | None:
    if not public_id:
        return None
    found = messaging.find_by_public_id(db.session, public_id)
    if found is None:
        raise ServiceError("No message has that id.")
    return found.id


def build_filter(form: forms.SearchForm) -> audit_query.AuditFilter:
    """Return the filter the form describes; ServiceError naming what does not parse.

    The form is validated first: a filter that does not parse must refuse the
    search or export, never drop out of it (an export of the whole trail).
    """
    if not form.validate():
        raise ServiceError(*[e for field in form.errors.values() for e in field])
    return audit_query.from_args(
        patient_id=_user_id(form.patient_id.data, "patient"),
        actor_id=_user_id(form.actor_id.data, "actor"),
        action=form.action.data,
        outcome=form.outcome.data,
        message_id=_message_id(form.message.data),
        client_ip=form.client_ip.data,
        since=form.since.data.isoformat() if form.since.data else None,
        until=form.until.data.isoformat() if form.until.data else None,
    )


@bp.get("/")
@roles(Role.AUDITOR)
def search() -> ResponseReturnValue:
    """Filter the trail; newest first, keyset pages. Each search is itself audited."""
    form = forms.SearchForm(request.args)
    page, errors = None, []
    try:
        _refuse_emails_in_url()
        flt = build_filter(form)
        _show_people(form)
        before = audit_query.parse_seq(request.args.get("before"), "Older than event")
        page = audit_query.search(db.session, flt, before_seq=before)
        audit_query.record_search(db.session, flt, actor_of(current_user), request_meta())
    except ServiceError as refused:
        db.session.rollback()
        errors = refused.messages
    return render_template(
        "auditor/search.html", form=form, page=page, errors=errors, args=_args_without("before")
    ), 400 if errors else 200


def _args_without(name: str) -> dict[str, Any]:
    return {k: v for k, v in request.args.items() if k != name and k in URL_FILTERS and v}


def _show_people(form: forms.SearchForm) -> None:
    """Fill the email boxes from the URL's public ids (in the page body, never in a link)."""
    for email_field, id_field in EMAIL_FILTERS.items():
        public_id = form[id_field].data
        user = accounts.find_by_public_id(db.session, public_id) if public_id else None
        form[email_field].data = user.email if user is not None else None


@bp.post("/")
@roles(Role.AUDITOR)
def search_post() -> ResponseReturnValue:
    """The search form: resolve email filters to public ids, then redirect to the results
    (POST-redirect-GET), so keyset and export links carry no email address."""
    form = forms.SearchForm(request.form)
    try:
        if not form.validate():
            raise ServiceError(*[e for field in form.errors.values() for e in field])
        args: dict[str, Any] = {
            name: request.form[name] for name in URL_FILTERS if request.form.get(name)
        }
        for email_field, id_field in EMAIL_FILTERS.items():
            if form[email_field].data:
                args[id_field] = _public_id(form[email_field].data, email_field)
    except ServiceError as refused:
        return render_template(
            "auditor/search.html", form=form, page=None, errors=refused.messages, args={}
        ), 400
    return redirect(url_for("auditor.search", **args), code=303)


@bp.get("/export/<any(csv, json, fhir):fmt>")
@roles(Role.AUDITOR)
@fresh_auth
def export(fmt: str) -> ResponseReturnValue:
    """Stream the filtered trail (re-authentication required; audited before it streams)."""
    form = forms.SearchForm(request.args)
    try:
        _refuse_emails_in_url()
        flt = build_filter(form)
    except ServiceError as refused:
        return render_template(
            "auditor/search.html", form=form, page=None, errors=refused.messages, args={}
        ), 400
    audit_export.record_export(db.session, flt, fmt, actor_of(current_user), request_meta())
    commit_now()  # streamed: recorded first, and the trail's head is released before it starts
    mime, ext = EXPORT_TYPES[fmt]
    name = f"audit-{utcnow():%Y%m%dT%H%M%SZ}.{ext}"
    return Response(
        stream_with_context(audit_export.export(db.session, flt, fmt)),
        mimetype=mime,
        headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "Cache-Control": "no-store",
        },
    )


@bp.route("/disclosures", methods=["GET", "POST"])
@roles(Role.AUDITOR)
def disclosures_report() -> ResponseReturnValue:
    """Accounting of disclosures for one patient and a period, as a PDF."""
    form = forms.DisclosureForm()
    if form.validate_on_submit():
        patient = accounts.find_by_email(db.session, form.patient.data or "")
        if patient is None or patient.role != Role.PATIENT:
            form.patient.errors = ["No patient has that email address."]
        # mypy: DayField data is a date once validate() passed (checked above); WTForms types it
        #   Any | None.
        elif form.until.data < form.since.data:  # type: ignore[operator]
            form.until.errors = ["The last day is before the first."]
        else:
            # mypy: DayField data is a date once validate() passed (checked above); WTForms
            #   types it Any | None.
            body = disclosures.report_pdf(
                db.session,
                patient,
                form.since.data,  # type: ignore[arg-type]
                form.until.data,  # type: ignore[arg-type]
                actor=actor_of(current_user),
                meta=request_meta(),
            )
            return pdf_response(body, "accounting-of-disclosures.pdf")
    return render_template("auditor/disclosures.html", form=form), 400 if form.errors else 200


def pdf_response(body: bytes, name: str) -> Response:
    """Return ``body`` as a PDF download that no cache keeps."""
    return Response(
        body,
        mimetype="application/pdf",
        headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "Cache-Control": "no-store",
        },
    )


@bp.get("/verify")
@roles(Role.AUDITOR)
def verify() -> ResponseReturnValue:
    """Whether the chain is intact (count, head hash, time) or its first broken event."""
    form = forms.HeadForm(request.args)
    error, result = None, None
    try:
        result = audit_query.verify_and_record(
            db.session, form.head.data, actor_of(current_user), request_meta()
        )
    except ServiceError as refused:
        error = str(refused)
    return render_template(
        "auditor/verify.html", form=form, result=result, error=error, anchored=bool(form.head.data)
    ), 400 if error else 200
