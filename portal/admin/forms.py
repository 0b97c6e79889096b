"""Admin forms: accounts and care teams."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import BooleanField, EmailField, SelectField, StringField, TextAreaField
from wtforms.fields.choices import SelectChoice
from wtforms.validators import DataRequired, Length

from portal.models.teams import MAX_TEAM_DESCRIPTION, MAX_TEAM_NAME


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


class TeamForm(FlaskForm):
    """A care team's name, description and whether patients may write to it first."""

    name = StringField(
        "Team name",
        validators=[
            DataRequired("Enter the team's name."),
            Length(max=MAX_TEAM_NAME, message=f"Keep the name under {MAX_TEAM_NAME} characters."),
        ],
    )
    description = TextAreaField(
        "Description (optional)",
        validators=[
            Length(
                max=MAX_TEAM_DESCRIPTION,
                message=f"Keep the description under {MAX_TEAM_DESCRIPTION} characters.",
            )
        ],
    )
    open_to_patients = BooleanField("Patients may start conversations with this team")


class MemberForm(FlaskForm):
    """Add a member of staff to a team by their account's address."""

    email = EmailField(
        "Email",
        validators=[DataRequired("Enter the staff member's email address."), Length(max=254)],
    )
