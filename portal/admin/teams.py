"""Admin pages for care teams: list and create them; a team's members, settings, archive.

A team's members see its messages, so changing who is in an existing team, archiving
or restoring it, and its settings need a password or code from the last five minutes,
as disabling an account does (creating one, like inviting someone, does not). Every
change is audited by ``services.teams``. Bad input re-shows the form with the reason
(400) and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from flask import abort, flash, redirect, render_template, url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user
from werkzeug.wrappers import Response

from portal.admin.forms import MemberForm, TeamForm
from portal.admin.views import bp
from portal.audit import actor_of
from portal.auth.forms import ContinueForm
from portal.auth.policy import fresh_auth, roles
from portal.extensions import db
from portal.models import CareTeam, Role
from portal.services import accounts, names, teams
from portal.services.errors import ServiceError
from portal.web.security import request_meta


def _team(public_id: str) -> CareTeam:
    team = teams.find_team(db.session, public_id)
    if team is None:
        abort(404)
    return team


@bp.get("/teams")
@roles(Role.ADMIN)
def teams_page() -> ResponseReturnValue:
    """Every care team with its number of members, and the form to create one."""
    return _teams_page(TeamForm(formdata=None))


def _teams_page(form: TeamForm, status: int = 200) -> ResponseReturnValue:
    return render_template("admin/teams.html", teams=teams.all_teams(db.session), form=form), status


@bp.post("/teams")
@roles(Role.ADMIN)
def create_team() -> ResponseReturnValue:
    """Create a team; its members are added on its own page."""
    form = TeamForm()
    if not form.validate_on_submit():
        return _teams_page(form, 400)
    try:
        team = teams.create_team(
            db.session,
            name=form.name.data or "",
            description=form.description.data or "",
            open_to_patients=bool(form.open_to_patients.data),
            actor=actor_of(current_user),
            meta=request_meta(),
        )
    except ServiceError as refused:
        db.session.rollback()
        form.name.errors = list(refused.messages)
        return _teams_page(form, 400)
    flash("Team created. Add its members below.", "success")
    return redirect(url_for("admin.team", public_id=team.public_id))


@bp.get("/teams/<public_id>")
@roles(Role.ADMIN)
def team(public_id: str) -> ResponseReturnValue:
    """A team's members (names and addresses: staff, not patients), settings and archive."""
    found = _team(public_id)
    return _team_page(found, _settings(found), MemberForm(formdata=None))


def _settings(team: CareTeam) -> TeamForm:
    form = TeamForm(formdata=None)
    form.name.data, form.description.data = team.name, team.description
    form.open_to_patients.data = team.open_to_patients
    return form


def _team_page(
    team: CareTeam, settings: TeamForm, member: MemberForm, status: int = 200
) -> ResponseReturnValue:
    members = teams.members_of(db.session, team, active_only=False)
    named = names.names_of(db.session, members)
    return render_template(
        "admin/team.html",
        team=team,
        members=[(user, named[user.id]) for user in members],
        settings=settings,
        member=member,
        form=ContinueForm(),
    ), status


@bp.post("/teams/<public_id>")
@roles(Role.ADMIN)
@fresh_auth
def update_team(public_id: str) -> ResponseReturnValue:
    """Rename, describe, open to or close to patients."""
    found = _team(public_id)
    form = TeamForm()
    if not form.validate_on_submit():
        return _team_page(found, form, MemberForm(formdata=None), 400)
    try:
        changed = teams.update_team(
            db.session,
            found,
            name=form.name.data or "",
            description=form.description.data or "",
            open_to_patients=bool(form.open_to_patients.data),
            actor=actor_of(current_user),
            meta=request_meta(),
        )
    except ServiceError as refused:
        db.session.rollback()
        form.name.errors = list(refused.messages)
        return _team_page(found, form, MemberForm(formdata=None), 400)
    flash("Team saved." if changed else "Nothing to change.", "success" if changed else "info")
    return _back_to(found)


@bp.post("/teams/<public_id>/members")
@roles(Role.ADMIN)
@fresh_auth
def add_member(public_id: str) -> ResponseReturnValue:
    """Add a member of staff by email: they see the team's messages from their next page."""
    found = _team(public_id)
    form = MemberForm()
    if not form.validate_on_submit():
        return _team_page(found, _settings(found), form, 400)
    try:
        teams.add_member(
            db.session,
            found,
            form.email.data or "",
            actor=actor_of(current_user),
            meta=request_meta(),
        )
    except ServiceError as refused:
        db.session.rollback()
        form.email.errors = list(refused.messages)
        return _team_page(found, _settings(found), form, 400)
    flash("Member added.", "success")
    return _back_to(found)


@bp.post("/teams/<public_id>/members/<user_id>/remove")
@roles(Role.ADMIN)
@fresh_auth
def remove_member(public_id: str, user_id: str) -> ResponseReturnValue:
    """Take someone out of the team: they lose access to its messages at once."""
    found = _team(public_id)
    user = accounts.find_by_public_id(db.session, user_id)
    if user is None:
        abort(404)
    return _act(
        found, lambda **kw: teams.remove_member(db.session, found, user, **kw), "Member removed."
    )


@bp.post("/teams/<public_id>/<any(archive, restore):change>")
@roles(Role.ADMIN)
@fresh_auth
def archive_team(public_id: str, change: str) -> ResponseReturnValue:
    """Archive a team (its members lose access to its messages) or restore it."""
    found = _team(public_id)
    action = teams.archive_team if change == "archive" else teams.restore_team
    return _act(found, lambda **kw: action(db.session, found, **kw), f"Team {change}d.")


def _act(team: CareTeam, change: Callable[..., object], done: str) -> ResponseReturnValue:
    if not ContinueForm().validate_on_submit():
        abort(400)
    try:
        change(actor=actor_of(current_user), meta=request_meta())
    except ServiceError as refused:
        db.session.rollback()
        flash(str(refused), "error")
    else:
        flash(done, "success")
    return _back_to(team)


def _back_to(team: CareTeam) -> Response:
    return redirect(url_for("admin.team", public_id=team.public_id))
