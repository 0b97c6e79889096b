"""Shredding a message audits who shredded it and the patient it is about, whoever it was
addressed to: a patient's reply and a patient-started message go to a member of staff
(issue 14 review, defect 4)."""

from __future__ import annotations

from flask import Flask
from sqlalchemy import select

from portal.audit import NO_REQUEST, SYSTEM, actor_of
from portal.extensions import db
from portal.models import AuditEvent, Conversation, Message, Role, User
from portal.services import accounts, content, conversations, patient_conversations, pickup, teams
from tests.factories import SUBJECT
from tests.support.conversations import ADA, OPEN_TEAM, PATIENT, REPLY_TEXT, SAM, World

STARTED = "A Xylophonoma question for the front desk"


def build_thread(app: Flask, world: World) -> dict[str, int]:
    """Sam's message, the patient's reply, a patient-started message and sam's answer to it:
    message ids by kind."""
    with app.app_context():
        patient, sam = (
            accounts.find_by_email(db.session, PATIENT),
            accounts.find_by_email(db.session, SAM),
        )
        assert patient is not None
        assert sam is not None
        original = db.session.scalar(
            select(Message).where(Message.public_id == world.sent.public_id)
        )
        assert original is not None
        reply = pickup.reply(db.session, original, patient, REPLY_TEXT, NO_REQUEST)
        team = teams.find_by_name(db.session, OPEN_TEAM)
        assert team is not None
        started = patient_conversations.start(
            db.session,
            patient=patient,
            team=team,
            subject=STARTED,
            body=REPLY_TEXT,
            meta=NO_REQUEST,
        )
        first = db.session.scalar(select(Message).where(Message.conversation_id == started.id))
        assert first is not None
        answer = conversations.answer(
            db.session, started, sender=sam, body="Please call us.", meta=NO_REQUEST
        )
        db.session.commit()
        return {
            "staff-message": original.id,
            "patient-reply": reply.id,
            "patient-started": first.id,
            "staff-answer": answer.message.id,
        }


def test_shredding_records_the_patient_and_the_actor_of_every_kind_of_message(
    world: World,
) -> None:
    ids = build_thread(world.app, world)
    patient_id = world_user_id(world.app, PATIENT)
    with world.app.app_context():
        ada = accounts.find_by_email(db.session, ADA)
        assert ada is not None
        for kind, message_id in ids.items():
            message = db.session.get(Message, message_id)
            assert message is not None
            actor = SYSTEM if kind == "staff-message" else actor_of(ada)
            content.shred(db.session, message, actor=actor, meta=NO_REQUEST)
            db.session.commit()
            event = db.session.scalars(
                select(AuditEvent)
                .where(AuditEvent.action == "message.shred")
                .where(AuditEvent.message_id == message_id)
            ).one()
            assert event.patient_id == patient_id, kind
            assert (event.actor_id, event.actor_role) == (actor.id, actor.role), kind
            assert (event.target_type, event.target_id) == ("message", message.public_id)
            assert event.details in (None, "", "{}")  # no free text that could carry PHI
            for phi in (SUBJECT, STARTED, REPLY_TEXT, PATIENT):
                assert phi not in repr(vars(event))


def test_a_reply_is_not_filed_under_its_staff_recipient(world: World) -> None:
    """The member of staff a patient wrote to is no patient: the event must not name them so."""
    ids = build_thread(world.app, world)
    with world.app.app_context():
        reply = db.session.get(Message, ids["patient-reply"])
        assert reply is not None
        recipient = db.session.get(User, reply.recipient_id)
        assert recipient is not None
        assert recipient.role == Role.STAFF  # the premise: a reply is addressed to staff
        content.shred(db.session, reply, actor=SYSTEM, meta=NO_REQUEST)
        db.session.commit()
        (named,) = db.session.scalars(
            select(AuditEvent.patient_id).where(AuditEvent.action == "message.shred")
        ).all()
        conversation = db.session.get(Conversation, reply.conversation_id)
        assert conversation is not None
        assert named == conversation.patient_id != recipient.id


def world_user_id(app: Flask, email: str) -> int:
    with app.app_context():
        user = accounts.find_by_email(db.session, email)
        assert user is not None
        return user.id
