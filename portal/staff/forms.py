"""Staff forms."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import (
    BooleanField,
    DateField,
    EmailField,
    HiddenField,
    IntegerField,
    MultipleFileField,
    SelectField,
    StringField,
    TextAreaField,
)
from wtforms.fields.choices import SelectChoice
from wtforms.validators import DataRequired, Length, NumberRange, Optional


class FindPatientForm(FlaskForm):
    """Look a patient up by email address: a POST, so the address stays out of URLs (history,
    proxy and server logs). ``intent`` tells it apart from the registration form."""

    intent = HiddenField(default="find")
    email = EmailField(
        "Email", validators=[DataRequired("Enter the patient's email address."), Length(max=254)]
    )


class RegisterPatientForm(FlaskForm):
    """Register a patient so a message can be sent to them."""

    email = EmailField(
        "Email", validators=[DataRequired("Enter the patient's email address."), Length(max=254)]
    )
    name = StringField(
        "Full name", validators=[DataRequired("Enter the patient's full name."), Length(max=200)]
    )
    dob = DateField("Date of birth", validators=[Optional()])
    access_code = BooleanField("Issue an access code to hand over in person or by phone")


class ComposeForm(FlaskForm):
    """Write a message with any number of PDFs and photos, from one of the sender's teams."""

    # Choices are the sender's care teams (the view sets them); shown when they have several.
    team = SelectField("Care team", choices=[], default="")
    subject = StringField("Subject", validators=[DataRequired("Enter a subject."), Length(max=200)])
    body = TextAreaField(
        "Message", validators=[DataRequired("Write the message."), Length(max=100_000)]
    )
    body_format = SelectField(
        "Format", choices=[SelectChoice("text", "Plain text"), SelectChoice("markdown", "Markdown")]
    )
    attachments = MultipleFileField("Attachments (PDF or photos)")
    expires_days = IntegerField(
        "Link expires after (days)",
        default=7,
        validators=[NumberRange(1, 365, "Choose 1 to 365 days.")],
    )


class ActionForm(FlaskForm):
    """A button: revoke or resend."""


class AnswerForm(FlaskForm):
    """A member of staff's answer in a conversation: sent to the patient like any message."""

    body = TextAreaField(
        "Your answer", validators=[DataRequired("Write your answer."), Length(max=100_000)]
    )
    attachments = MultipleFileField("Attachments (PDF or photos)")


class AssignForm(FlaskForm):
    """Who on the team looks after a conversation. The choices are the team's members (the
    view sets them); the service checks the one posted, so any other answer is refused
    with its own message rather than WTForms' generic one."""

    assignee = SelectField("Assigned to", choices=[], validate_choice=False)
