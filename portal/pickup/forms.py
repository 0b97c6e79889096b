"""Pickup forms. The labels ("Date of birth", "Access code", ...) are a contract users and
scripts rely on: keep them."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import (
    HiddenField,
    MultipleFileField,
    PasswordField,
    SelectField,
    StringField,
    TextAreaField,
)
from wtforms.validators import DataRequired, Length, ValidationError
from wtforms.widgets import DateInput

from portal.auth import forms as auth_forms
from portal.services.messages import MAX_SUBJECT
from portal.services.pickup import MAX_REPLY, parse_dob
from portal.web.fields import DayField, DayRequired

# The password step reuses the sign-in forms: one policy hint, one pair of fields.
CHOICE_HINT = auth_forms.CHOICE_HINT
PasswordForm = auth_forms.NewPasswordForm


class ContinueForm(FlaskForm):
    """A button only: GETs never act, the POST does (scanner-safe links)."""


class LinkSignInForm(FlaskForm):
    """A returning recipient's password, typed on the link's own page."""

    password = PasswordField(
        "Password", validators=[DataRequired("Enter your password."), Length(max=1024)]
    )


class RenewForm(FlaskForm):
    """ "Send me a new link": posted to the link's own URL, so every invalid page is identical."""

    intent = HiddenField(default="renew")


def _dob(_form: FlaskForm, field: StringField) -> None:
    if parse_dob(field.data or "") is None:
        raise ValidationError("Enter your date of birth, for example 23/07/1961.")


class DobForm(FlaskForm):
    """Identity check by date of birth (a date picker; typed DD/MM/YYYY works too)."""

    answer = StringField(
        "Date of birth",
        widget=DateInput(),
        validators=[DataRequired("Enter your date of birth."), Length(max=20), _dob],
    )


class AccessCodeForm(FlaskForm):
    """Identity check by the access code the practice gave the patient."""

    answer = StringField(
        "Access code",
        validators=[DataRequired("Enter the access code the practice gave you."), Length(max=40)],
    )


class ReplyForm(FlaskForm):
    """The patient's answer to a message."""

    body = TextAreaField(
        "Your reply",
        validators=[
            DataRequired("Write your reply."),
            Length(max=MAX_REPLY, message=f"Keep your reply under {MAX_REPLY:,} characters."),
        ],
    )


class DisclosureRangeForm(FlaskForm):
    """The period of the patient's own accounting of disclosures."""

    since = DayField("From", validators=[DayRequired("Enter the first day.")])
    until = DayField("To (inclusive)", validators=[DayRequired("Enter the last day.")])


class StartConversationForm(FlaskForm):
    """A patient writing first to a care team the organisation opened to patients. The
    teams are the view's choices; the service checks the one posted (and audits a team
    that does not take patients' messages)."""

    team = SelectField("Care team", choices=[], validate_choice=False)
    subject = StringField(
        "Subject",
        validators=[DataRequired("Enter a subject."), Length(max=MAX_SUBJECT)],
    )
    body = TextAreaField(
        "Your message",
        validators=[
            DataRequired("Write your message."),
            Length(max=MAX_REPLY, message=f"Keep your message under {MAX_REPLY:,} characters."),
        ],
    )
    attachments = MultipleFileField("Attachments (optional)")


class WriteForm(FlaskForm):
    """The patient's next message in one of their conversations."""

    body = TextAreaField(
        "Your message",
        validators=[
            DataRequired("Write your message."),
            Length(max=MAX_REPLY, message=f"Keep your message under {MAX_REPLY:,} characters."),
        ],
    )
    attachments = MultipleFileField("Attachments (optional)")
