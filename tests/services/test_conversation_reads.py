"""Read state per member (services.team_inbox.mark_read): one upsert, never backwards, and
safe to repeat (two tabs, two requests at once), on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from portal.database import utcnow
from portal.extensions import db
from portal.models import Conversation, ConversationRead, User
from portal.services import team_inbox
from tests.support.conversations import ADA, SAM, World


def test_read_state_moves_forward_only_and_is_per_member(world: World) -> None:
    with world.app.app_context():
        conversation = db.session.scalar(
            select(Conversation).where(Conversation.public_id == world.conversation)
        )
        sam = db.session.scalar(select(User).where(User.email == SAM))
        ada = db.session.scalar(select(User).where(User.email == ADA))
        assert conversation is not None
        assert sam is not None
        assert ada is not None
        later, earlier = utcnow(), utcnow() - timedelta(hours=1)
        team_inbox.mark_read(db.session, conversation, sam, later)
        team_inbox.mark_read(db.session, conversation, sam, earlier)  # an older tab: ignored
        team_inbox.mark_read(db.session, conversation, sam, later)  # the same twice: no error
        team_inbox.mark_read(db.session, conversation, ada, earlier)
        db.session.commit()
        rows = {
            row.user_id: row.read_at
            for row in db.session.scalars(
                select(ConversationRead).where(ConversationRead.conversation_id == conversation.id)
            )
        }
        assert rows == {sam.id: later, ada.id: earlier}
