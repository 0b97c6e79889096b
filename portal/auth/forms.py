"""Forms for signing in. The labels ("Email", "Password", ...) are a contract users and scripts
rely on: keep them."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import EmailField, HiddenField, PasswordField, StringField
from wtforms.validators import DataRequired, EqualTo, Length

CHOICE_HINT = (
    "At least 12 characters. A few unrelated words make a strong, memorable "
    "password. Spaces and any characters are fine."
)


class SignInForm(FlaskForm):
    """Email and password: the first factor."""

    email = EmailField(
        "Email", validators=[DataRequired("Enter your email address."), Length(max=254)]
    )
    password = PasswordField(
        "Password", validators=[DataRequired("Enter your password."), Length(max=1024)]
    )


class CodeForm(FlaskForm):
    """The second factor: a TOTP code, or a recovery code."""

    code = StringField(
        "Authentication code",
        validators=[
            DataRequired("Enter the 6-digit code from your authenticator app."),
            Length(max=40),
        ],
    )


class ContinueForm(FlaskForm):
    """A button only: GETs never act, the POST does (scanner-safe links)."""


class NewPasswordForm(FlaskForm):
    """Choose a password (invite, reset, change)."""

    password = PasswordField(
        "New password", validators=[DataRequired("Enter a new password."), Length(max=1024)]
    )
    confirm = PasswordField(
        "Confirm new password",
        validators=[
            DataRequired("Enter the new password again."),
            EqualTo("password", "The two passwords do not match."),
        ],
    )


class ChangePasswordForm(NewPasswordForm):
    """Change a password: the current one first (ASVS 2.1.6), so a left-open session is not
    enough to take the account."""

    current_password = PasswordField(
        "Current password",
        validators=[DataRequired("Enter your current password."), Length(max=1024)],
    )


class ResetForm(NewPasswordForm):
    """A reset needs the second factor too, so an emailed link alone cannot take an account."""

    code = StringField(
        "Authentication code",
        validators=[
            DataRequired("Enter a code from your authenticator app, or a recovery code."),
            Length(max=40),
        ],
    )


class ResetRequestForm(FlaskForm):
    """Ask for a reset link."""

    email = EmailField(
        "Email", validators=[DataRequired("Enter your email address."), Length(max=254)]
    )


class ReauthForm(CodeForm):
    """Prove a factor again before a sensitive action."""

    back = HiddenField()
