"""Auditor forms: the trail's filters, the disclosure report and head verification."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import DateField, EmailField, SelectField, StringField
from wtforms.fields.choices import SelectChoice
from wtforms.validators import DataRequired, Length, Optional

from portal.audit import Action, Outcome


class SearchForm(FlaskForm):
    """Filters (GET: a search changes nothing, so no CSRF token)."""

    class Meta:
        csrf = False

    patient = EmailField("Patient email", validators=[Optional(), Length(max=254)])
    actor = EmailField("Actor email", validators=[Optional(), Length(max=254)])
    action = SelectField("Action", choices=[SelectChoice("", "Any"), *(
        SelectChoice(a.value, a.value) for a in Action)], validators=[Optional()])
    outcome = SelectField("Outcome", choices=[SelectChoice("", "Any"), *(
        SelectChoice(o.value, o.value.capitalize()) for o in Outcome)], validators=[Optional()])
    message = StringField("Message id", validators=[Optional(), Length(max=32)])
    client_ip = StringField("Client address", validators=[Optional(), Length(max=45)])
    since = DateField("From (UTC)", validators=[Optional()])
    until = DateField("Until, exclusive (UTC)", validators=[Optional()])


class DisclosureForm(FlaskForm):
    """One patient and a period."""

    patient = EmailField("Patient email", validators=[DataRequired("Enter the patient's email."),
                                                      Length(max=254)])
    since = DateField("From", validators=[DataRequired("Enter the first day.")])
    until = DateField("To (inclusive)", validators=[DataRequired("Enter the last day.")])


class HeadForm(FlaskForm):
    """A head hash noted earlier (printed, emailed to the compliance officer)."""

    class Meta:
        csrf = False

    head = StringField("Noted head hash", validators=[Optional(), Length(max=64)])
