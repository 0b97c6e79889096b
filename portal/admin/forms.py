"""Admin forms."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import EmailField, SelectField, StringField
from wtforms.fields.choices import SelectChoice
from wtforms.validators import DataRequired, Length


class NewAccountForm(FlaskForm):
    """Invite a member of staff, an auditor or another admin."""

    role = SelectField(
        "Role",
        choices=[
            SelectChoice("staff", "Staff"),
            SelectChoice("auditor", "Auditor"),
            SelectChoice("admin", "Admin"),
        ],
    )
    email = EmailField(
        "Email", validators=[DataRequired("Enter the email address."), Length(max=254)]
    )
    name = StringField(
        "Full name", validators=[DataRequired("Enter the person's name."), Length(max=200)]
    )
