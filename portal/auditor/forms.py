"""Auditor forms: the trail's filters, the disclosure report and head verification."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import EmailField, HiddenField, SelectField, StringField
from wtforms.fields.choices import SelectChoice
from wtforms.validators import DataRequired, Length, Optional

from portal.audit import Action, Outcome
from portal.web.fields import DayField, DayRequired


class SearchForm(FlaskForm):
    """Filters. Emails are only ever posted (the app-wide CSRF check covers the POST); the
    results URL (GET, changes nothing, so no token here) names people by public id."""

    class Meta:
        csrf = False

    patient = EmailField("Patient email", validators=[Optional(), Length(max=254)])
    actor = EmailField("Actor email", validators=[Optional(), Length(max=254)])
    patient_id = HiddenField(validators=[Optional(), Length(max=32)])
    actor_id = HiddenField(validators=[Optional(), Length(max=32)])
    action = SelectField(
        "Action",
        choices=[SelectChoice("", "Any"), *(SelectChoice(a.value, a.value) for a in Action)],
        validators=[Optional()],
    )
    outcome = SelectField(
        "Outcome",
        choices=[
            SelectChoice("", "Any"),
            *(SelectChoice(o.value, o.value.capitalize()) for o in Outcome),
        ],
        validators=[Optional()],
    )
    message = StringField("Message id", validators=[Optional(), Length(max=32)])
    client_ip = StringField("Client address", validators=[Optional(), Length(max=45)])
    since = DayField("From (UTC)", validators=[Optional()])
    until = DayField("Until, exclusive (UTC)", validators=[Optional()])


class DisclosureForm(FlaskForm):
    """One patient and a period."""

    patient = EmailField(
        "Patient email", validators=[DataRequired("Enter the patient's email."), Length(max=254)]
    )
    since = DayField("From", validators=[DayRequired("Enter the first day.")])
    until = DayField("To (inclusive)", validators=[DayRequired("Enter the last day.")])


class HeadForm(FlaskForm):
    """A head hash noted earlier (printed, emailed to the compliance officer)."""

    class Meta:
        csrf = False

    head = StringField("Noted head hash", validators=[Optional(), Length(max=64)])
