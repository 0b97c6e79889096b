"""Fixtures for pickup: a member of staff, patients, messages sent through the real service.

The helpers the tests import (send, signed_in, events...) are in tests/support/pickup.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask

from portal.database import travel
from portal.extensions import db, limiter
from portal.models import User
from tests.browser_client import enrolled_user
from tests.factories import make_patient
from tests.support.lists import add_people
from tests.support.pickup import PATIENT_EMAIL, STAFF_EMAIL


@pytest.fixture(autouse=True)
def clean_clock_and_limits(app: Flask) -> Iterator[None]:
    """Real time and empty rate-limit counters for every test."""
    with app.app_context():
        limiter.reset()
    yield
    travel(None)


@pytest.fixture
def staff(app: Flask) -> tuple[User, str, list[str]]:
    """An enrolled member of staff (sam@example.org)."""
    return enrolled_user(app, role="staff", email=STAFF_EMAIL)


@pytest.fixture
def patient(app: Flask) -> User:
    """A first-time patient with the recognisable PHI and a date of birth on file."""
    with app.app_context():
        user = make_patient(db.session, email=PATIENT_EMAIL)
        db.session.commit()
        return user


@pytest.fixture
def senders(app: Flask, staff: tuple[User, str, list[str]]) -> list[str]:
    """Three members of staff who send: sam (the enrolled one), ada and bo (not enrolled)."""
    return [STAFF_EMAIL, *add_people(app, "staff", ["ada@example.org", "bo@example.org"])]
