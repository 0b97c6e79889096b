"""Replies to a message and follow-ups in a conversation are limited per patient, together:
30 an hour, whatever address each comes from (issue 14 review, defect 3)."""

from __future__ import annotations

from flask import Flask
from sqlalchemy import func, select
from werkzeug.test import TestResponse

from portal.extensions import db
from portal.models import Message
from portal.pickup.conversations import TOO_MANY
from tests.browser_client import Browser
from tests.support.conversations import OTHER_PATIENT, World, conversation_of, send_from

NAT = "203.0.113.7"  # a hospital's one public address


def messages(app: Flask) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(Message)) or 0


class Writer:
    """A signed-in patient posting replies and follow-ups from a chosen address."""

    def __init__(self, browser: Browser, message_id: str, conversation: str) -> None:
        self.browser, self.message_id, self.conversation = browser, message_id, conversation
        self.token = browser.token(f"/messages/{message_id}")

    def reply(self, address: str, body: str = "Thank you, the swelling is down.") -> TestResponse:
        return self._post(f"/messages/{self.message_id}/reply", address, body)

    def follow_up(self, address: str) -> TestResponse:
        return self._post(f"/conversations/{self.conversation}/write", address, "One more thing.")

    def _post(self, url: str, address: str, body: str) -> TestResponse:
        return self.browser.client.post(
            url,
            data={"csrf_token": self.token, "body": body},
            environ_base={"REMOTE_ADDR": address},
        )


def patient(world: World) -> Writer:
    return Writer(world.patient, world.sent.public_id, world.conversation)


def other_patient(world: World) -> Writer:
    sent = send_from(world.app, to=OTHER_PATIENT)
    return Writer(world.other_patient, sent.public_id, conversation_of(world.app, sent.public_id))


def test_one_patient_on_many_addresses_has_one_allowance_for_replies_and_follow_ups(
    world: World,
) -> None:
    writer = patient(world)
    for n in range(15):
        assert writer.reply(f"198.51.100.{n}").status_code == 302
        assert writer.follow_up(f"192.0.2.{n}").status_code == 302
    before = messages(world.app)
    refused = writer.reply("198.51.100.200", "The Xylophonoma is back.")
    assert refused.status_code == 429
    html = refused.get_data(as_text=True)
    assert TOO_MANY in html
    assert "Xylophonoma" not in html
    assert messages(world.app) == before  # nothing stored
    assert writer.follow_up("192.0.2.200").status_code == 429  # the follow-up shares it
    assert messages(world.app) == before


def test_patients_behind_one_address_each_have_their_own_allowance(world: World) -> None:
    first, second = patient(world), other_patient(world)
    for _ in range(30):
        assert first.reply(NAT).status_code == 302
    assert first.reply(NAT).status_code == 429
    before = messages(world.app)
    assert second.reply(NAT).status_code == 302  # not held back by the first patient
    assert messages(world.app) == before + 1
