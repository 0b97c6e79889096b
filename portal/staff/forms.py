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

from portal.services.messaging import COVER_REASONS


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
    """Write a message with any number of PDF attachments."""

    subject = StringField("Subject", validators=[DataRequired("Enter a subject."), Length(max=200)])
    body = TextAreaField(
        "Message", validators=[DataRequired("Write the message."), Length(max=100_000)]
    )
    body_format = SelectField(
        "Format", choices=[SelectChoice("text", "Plain text"), SelectChoice("markdown", "Markdown")]
    )
    attachments = MultipleFileField("Attachments (PDF)")
    expires_days = IntegerField(
        "Link expires after (days)",
        default=7,
        validators=[NumberRange(1, 365, "Choose 1 to 365 days.")],
    )


class ActionForm(FlaskForm):
    """A button: revoke or resend."""


class CoverForm(FlaskForm):
    """Covering for a colleague: a reason from a fixed list (free text could carry PHI)."""

    reason = SelectField(
        "Why are you acting on a colleague's message?",
        choices=[
            SelectChoice("", "Choose a reason"),
            *(SelectChoice(key, label) for key, label in COVER_REASONS.items()),
        ],
        validators=[DataRequired("Choose why you are covering for the sender.")],
    )
