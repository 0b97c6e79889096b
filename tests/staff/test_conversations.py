"""Threads (issue 14 item 2): the team inbox, read state per member, assignment, done, and
staff answering in the thread. Over HTTP, on SQLite and PostgreSQL; a reply reaches its
team and nobody else."""

from __future__ import annotations

import json
import re
import threading
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask

from portal.audit import Action
from portal.database import travel
from portal.models import AuditEvent
from portal.models.notifications import NoticeKind
from portal.services import conversations
from tests.browser_client import Browser, current_code
from tests.factories import BODY, PATIENT_NAME, SUBJECT
from tests.support.conversations import (
    ADA,
    OLIVE,
    PATIENT,
    REPLY_TEXT,
    SAM,
    World,
    act,
    conversation_of,
    conversation_row,
    events_of,
    inbox_ids,
    messages_in,
    notices_of,
    public_id_of,
    reply,
    send_from,
    thread_url,
    user_id,
)
from tests.support.lists import without_sessions
from tests.support.pickup import PASSWORD
from tests.support.statements import counting

NEXT_STEP = timedelta(seconds=31)  # a new TOTP time step (RFC 6238: 30 s)
ANSWER = "Please keep the Phiseedwell cream on the elbow; we will call you tomorrow."
# Every route of one conversation, as an outsider would try them.
ROUTES = [
    ("GET", ""),
    ("POST", "/answer"),
    ("POST", "/assign"),
    ("POST", "/done"),
    ("POST", "/reopen"),
    ("GET", "/messages/{message}/attachments/{attachment}"),
]


@pytest.fixture(autouse=True)
def real_clock() -> object:
    yield
    travel(None)


def details(event: AuditEvent) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(event.details or "{}")
    return found


def page_of(browser: Browser, url: str) -> str:
    response = browser.get(url)
    assert response.status_code == 200, response.status_code
    return response.get_data(as_text=True)


def test_a_reply_reaches_the_team_inbox_and_nobody_else(world: World) -> None:
    assert reply(world).status_code == 302

    for member in (world.sam, world.ada):
        assert inbox_ids(member) == [world.conversation]
        html = page_of(member, "/staff/inbox")
        assert "Unread reply" in html
        assert PATIENT_NAME in html
        assert SUBJECT in html
    assert inbox_ids(world.olive) == []
    assert world.olive.get(thread_url(world.conversation)).status_code == 404
    assert world.other_patient.get(f"/conversations/{world.conversation}").status_code == 404
    denied = events_of(world.app, Action.ACCESS_DENIED)
    assert [(e.actor_id, details(e)["reason"]) for e in denied] == [
        (user_id(world.app, OLIVE), "not_in_team"),
        (user_id(world.app, "other@example.org"), "not_patient"),
    ]
    assert all(e.target_id == world.conversation for e in denied)


def test_the_reply_notice_links_to_the_conversation_after_sign_in(world: World) -> None:
    reply(world)
    (address, url), *others = notices_of(world.app, NoticeKind.REPLY)
    assert others == []
    assert address == SAM  # the sender, who is in the team and nobody is assigned
    assert url == world.app.config["BASE_URL"] + thread_url(world.conversation)
    assert url.split("/")[-1] == world.conversation  # the public id is all the URL carries

    fresh = Browser(world.app)
    path = thread_url(world.conversation)
    bounce = fresh.get(path)
    assert bounce.status_code == 302
    assert "/signin?next=" in bounce.location
    travel(NEXT_STEP)  # sam signed in this step already: a new code, not a replay
    done = fresh.sign_in(SAM, PASSWORD, code=current_code(world.secrets[SAM]), next_url=path)
    assert done.status_code == 302
    assert done.location.endswith(path)
    assert REPLY_TEXT in page_of(fresh, path)


def test_the_conversation_page_path_is_the_one_notices_carry(app: Flask) -> None:
    with app.test_request_context():
        from flask import url_for

        assert url_for("staff.conversation", public_id="x" * 32) == (
            conversations.CONVERSATION_PATH.format(public_id="x" * 32)
        )


def test_reading_a_thread_is_audited_per_patient_message_and_marks_it_read(world: World) -> None:
    reply(world)
    reply(world, "Second note about the Quasirandomitis")
    html = page_of(world.sam, thread_url(world.conversation))

    assert REPLY_TEXT in html
    assert BODY in html  # sam's own message, in the same thread
    assert html.count("badge-new") == 2
    read = events_of(world.app, Action.CONVERSATION_READ)
    assert [(e.target_id, details(e)["new"]) for e in read] == [(world.conversation, 2)]
    replies = [m for m in messages_in(world.app, world.conversation) if m.in_reply_to_id]
    shown = events_of(world.app, Action.REPLY_READ)
    assert sorted(e.message_id for e in shown) == sorted(m.id for m in replies)
    assert {e.actor_id for e in shown} == {user_id(world.app, SAM)}
    assert {e.patient_id for e in shown} == {user_id(world.app, PATIENT)}
    # Read for sam now, still unread for ada; a second look shows nothing new to sam.
    assert "Unread reply" not in page_of(world.sam, "/staff/inbox")
    assert "Unread reply" in page_of(world.ada, "/staff/inbox")
    assert "badge-new" not in page_of(world.sam, thread_url(world.conversation))


def test_unread_conversations_come_first_then_the_latest(world: World) -> None:
    c0 = world.conversation
    c1, c2 = (conversation_of(world.app, send_from(world.app).public_id) for _ in range(2))
    assert inbox_ids(world.sam) == [c2, c1, c0]

    reply(world)  # on the oldest: now unread and the latest, for both members
    assert inbox_ids(world.sam) == inbox_ids(world.ada) == [c0, c2, c1]
    page_of(world.sam, thread_url(c0))  # read by sam only
    c3 = conversation_of(world.app, send_from(world.app).public_id)
    assert inbox_ids(world.sam) == [c3, c0, c2, c1]  # nothing unread: by latest activity
    assert inbox_ids(world.ada) == [c0, c3, c2, c1]  # unread for ada: above the newer one


def test_a_new_patient_message_is_unread_again_for_a_member_who_read_the_last(
    world: World,
) -> None:
    reply(world)
    page_of(world.sam, thread_url(world.conversation))
    assert "Unread reply" not in page_of(world.sam, "/staff/inbox")
    reply(world, "And now the Phiseed itch too")
    assert "Unread reply" in page_of(world.sam, "/staff/inbox")


def test_the_inbox_pages_through_many_conversations_without_gaps(world: World) -> None:
    from portal.services.paging import PAGE_SIZE

    made = {world.conversation}
    made |= {conversation_of(world.app, send_from(world.app).public_id) for _ in range(PAGE_SIZE)}
    reply(world)  # the oldest is unread: first on the first page
    first = world.sam.get("/staff/inbox").get_data(as_text=True)
    seen = inbox_ids(world.sam)
    assert seen[0] == world.conversation
    assert len(seen) == PAGE_SIZE
    after = re.search(r'href="/staff/inbox\?([^"]*after=[0-9a-f]{32}[^"]*)"', first)
    assert after is not None
    seen += inbox_ids(world.sam, "?" + after.group(1).replace("&amp;", "&"))
    assert len(seen) == len(made) == PAGE_SIZE + 1
    assert set(seen) == made


def test_assignment_goes_to_team_members_only(world: World) -> None:
    app, conversation = world.app, world.conversation
    done = act(world.sam, conversation, "assign", {"assignee": public_id_of(app, ADA)})
    assert done.status_code == 302
    assert conversation_row(app, conversation).assigned_to_id == user_id(app, ADA)
    assert "Ada Second" in page_of(world.sam, "/staff/inbox")

    for bad in (public_id_of(app, OLIVE), public_id_of(app, PATIENT), "f" * 32, "not-an-id"):
        refused = act(world.sam, conversation, "assign", {"assignee": bad})
        assert refused.status_code == 400
        assert "Choose a member of this care team." in refused.get_data(as_text=True)
        assert "Traceback" not in refused.get_data(as_text=True)
        assert conversation_row(app, conversation).assigned_to_id == user_id(app, ADA)

    assert act(world.ada, conversation, "assign", {"assignee": ""}).status_code == 302
    assert conversation_row(app, conversation).assigned_to_id is None
    assigned = events_of(app, Action.CONVERSATION_ASSIGN)
    assert [details(e)["assigned_to"] for e in assigned] == [user_id(app, ADA), None]
    assert [e.actor_id for e in assigned] == [user_id(app, SAM), user_id(app, ADA)]


def test_a_reply_to_an_assigned_conversation_tells_the_assignee_only(world: World) -> None:
    act(world.sam, world.conversation, "assign", {"assignee": public_id_of(world.app, ADA)})
    reply(world)
    assert [address for address, _ in notices_of(world.app, NoticeKind.REPLY)] == [ADA]


def test_done_reopen_and_a_new_patient_message_reopens(world: World) -> None:
    app, conversation = world.app, world.conversation
    assert act(world.sam, conversation, "done").status_code == 302
    assert conversation_row(app, conversation).state == "done"
    assert inbox_ids(world.sam) == []
    assert inbox_ids(world.sam, "?show=done") == [conversation]
    again = act(world.ada, conversation, "done")  # a colleague presses it too
    assert "already marked done" in world.ada.get(again.location).get_data(as_text=True)

    assert act(world.ada, conversation, "reopen").status_code == 302
    assert inbox_ids(world.sam) == [conversation]
    act(world.sam, conversation, "done")
    reply(world)
    assert conversation_row(app, conversation).state == "open"
    assert inbox_ids(world.sam) == [conversation]
    assert [e.action for e in events_of(app, Action.CONVERSATION_DONE)] == ["conversation.done"] * 2
    assert len(events_of(app, Action.CONVERSATION_REOPEN)) == 1


def test_a_staff_answer_is_sent_like_any_message(world: World) -> None:
    reply(world)
    sent = act(world.ada, world.conversation, "answer", {"body": ANSWER})
    assert sent.status_code == 302
    assert sent.location.endswith(thread_url(world.conversation) + "#latest")

    answer = messages_in(world.app, world.conversation)[-1]
    assert answer.sender_id == user_id(world.app, ADA)
    assert answer.recipient_id == user_id(world.app, PATIENT)
    pickup = notices_of(world.app, NoticeKind.PICKUP)
    assert len(pickup) == 2  # the first message's, then the answer's
    address, url = pickup[-1]
    assert address == PATIENT
    assert url is not None
    assert "/p/" in url
    assert ANSWER in page_of(world.sam, thread_url(world.conversation))
    assert ANSWER in page_of(world.patient, f"/conversations/{world.conversation}")


def test_an_answer_without_a_csrf_token_is_refused_and_stores_nothing(world: World) -> None:
    before = len(messages_in(world.app, world.conversation))
    for action, data in (("answer", {"body": ANSWER}), ("done", {}), ("assign", {"assignee": ""})):
        refused = world.sam.client.post(f"{thread_url(world.conversation)}/{action}", data=data)
        assert refused.status_code == 400
    assert len(messages_in(world.app, world.conversation)) == before
    assert conversation_row(world.app, world.conversation).state == "open"
    assert events_of(world.app, Action.CONVERSATION_ASSIGN) == []


def test_an_empty_answer_is_a_clear_error(world: World) -> None:
    refused = act(world.sam, world.conversation, "answer", {"body": "   "})
    assert refused.status_code == 400
    assert "Write your answer." in refused.get_data(as_text=True)
    assert len(messages_in(world.app, world.conversation)) == 1


def test_two_members_answering_at_once_both_reach_the_patient(world: World) -> None:
    url = thread_url(world.conversation)
    tokens = {who: world.browser(who).token(url) for who in ("sam", "ada")}
    start = threading.Barrier(2)
    results: dict[str, int] = {}

    def answer(who: str) -> None:
        start.wait()
        response = world.browser(who).client.post(
            f"{url}/answer", data={"csrf_token": tokens[who], "body": f"{who}: {ANSWER}"}
        )
        results[who] = response.status_code

    workers = [threading.Thread(target=answer, args=(who,)) for who in tokens]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert results == {"sam": 302, "ada": 302}
    answers = messages_in(world.app, world.conversation)[1:]
    assert sorted(m.sender_id for m in answers) == sorted(
        [user_id(world.app, SAM), user_id(world.app, ADA)]
    )
    assert len(notices_of(world.app, NoticeKind.PICKUP)) == 3
    html = page_of(world.patient, f"/conversations/{world.conversation}")
    assert f"sam: {ANSWER}" in html
    assert f"ada: {ANSWER}" in html


@pytest.mark.parametrize(("method", "route"), ROUTES)
def test_staff_of_another_team_get_404_and_access_denied_on_every_route(
    world: World, method: str, route: str
) -> None:
    first = messages_in(world.app, world.conversation)[0]
    attachment = _attachment_id(world.app, first.id)
    url = thread_url(world.conversation) + route.format(
        message=first.public_id, attachment=attachment
    )
    if method == "GET":
        refused = world.olive.get(url)
    else:
        refused = world.olive.submit(
            url, {"body": ANSWER, "assignee": ""}, form_page="/staff/inbox"
        )
    assert refused.status_code == 404
    html = refused.get_data(as_text=True)
    assert PATIENT_NAME not in html
    assert SUBJECT not in html
    denied = events_of(world.app, Action.ACCESS_DENIED)
    assert [(e.actor_id, e.target_id, details(e)["reason"]) for e in denied] == [
        (user_id(world.app, OLIVE), world.conversation, "not_in_team")
    ]
    assert len(messages_in(world.app, world.conversation)) == 1
    row = conversation_row(world.app, world.conversation)
    assert (row.state, row.assigned_to_id) == ("open", None)
    assert events_of(world.app, Action.ATTACHMENT_DOWNLOAD) == []


def _attachment_id(app: Flask, message_id: int) -> str:
    from sqlalchemy import select

    from portal.extensions import db
    from portal.models import Attachment

    with app.app_context():
        found = db.session.scalar(
            select(Attachment.public_id).where(Attachment.message_id == message_id)
        )
        assert found is not None
        return found


def test_a_member_downloads_a_thread_file_audited_with_the_patient(world: World) -> None:
    from tests.factories import MINIMAL_PDF

    first = messages_in(world.app, world.conversation)[0]
    url = f"{thread_url(world.conversation)}/messages/{first.public_id}/attachments/"
    got = world.ada.get(url + _attachment_id(world.app, first.id))
    assert got.status_code == 200
    assert got.data == MINIMAL_PDF
    assert got.headers["Content-Disposition"].startswith("attachment;")
    assert got.headers["Cache-Control"] == "no-store"
    (event,) = events_of(world.app, Action.ATTACHMENT_DOWNLOAD)
    assert (event.actor_id, event.patient_id) == (
        user_id(world.app, ADA),
        user_id(world.app, PATIENT),
    )
    assert world.ada.get(url + "0" * 32).status_code == 404


def test_unknown_and_malformed_conversations_are_404(world: World) -> None:
    for bad in ("0" * 32, "nope", "x" * 200):
        assert world.sam.get(thread_url(bad)).status_code == 404
    assert events_of(world.app, Action.ACCESS_DENIED) == []


def test_bad_inbox_filters_are_clear_errors(world: World) -> None:
    from tests.support.conversations import OTHER_TEAM, team_public_id

    assert world.sam.get("/staff/inbox?show=everything").status_code == 400
    assert (
        world.sam.get("/staff/inbox?after=" + world.conversation + "&before=x").status_code == 400
    )
    other = world.sam.get("/staff/inbox?team=" + team_public_id(world.app, OTHER_TEAM))
    assert other.status_code == 404
    (denied,) = events_of(world.app, Action.ACCESS_DENIED)
    assert denied.target_type == "team"
    assert world.olive.get("/staff/inbox?after=" + world.conversation).status_code == 400


def test_the_inbox_narrows_to_one_team(world: World) -> None:
    from tests.support.conversations import OPEN_TEAM, team_public_id

    mine = inbox_ids(world.sam, "?team=" + team_public_id(world.app, OPEN_TEAM))
    assert mine == []
    assert inbox_ids(world.sam, "?show=all") == [world.conversation]


def test_the_inbox_read_is_audited(world: World) -> None:
    page_of(world.sam, "/staff/inbox")
    listed = [
        e for e in events_of(world.app, Action.MESSAGE_LIST) if details(e)["page"] == "team_inbox"
    ]
    assert [(e.actor_id, details(e)["count"]) for e in listed] == [(user_id(world.app, SAM), 1)]


def test_the_status_page_links_to_its_conversation(world: World) -> None:
    html = page_of(world.sam, f"/staff/messages/{world.sent.public_id}")
    assert f'href="{thread_url(world.conversation)}"' in html


def measured(world: World, browser: Browser, url: str) -> list[str]:
    """The statements of one GET of ``url`` (after a warm-up), without the session row's."""
    assert browser.get(url).status_code == 200
    with counting(world.app) as seen:
        assert browser.get(url).status_code == 200
    return without_sessions(seen)


def test_the_inbox_runs_the_same_statements_for_few_and_many_conversations(
    world: World,
) -> None:
    reply(world)
    few = measured(world, world.sam, "/staff/inbox")
    for n in range(30):
        send_from(world.app, sender=SAM if n % 2 else ADA)
    reply(world)
    many = measured(world, world.sam, "/staff/inbox")
    assert len(inbox_ids(world.sam)) == 31
    assert len(many) == len(few), "\n".join(many)
    # The user, the reader's teams, the page, its subjects (with keys), its people (with
    # keys), then the audit event (head, event, head).
    assert len(few) <= 8, "\n".join(few)


def test_a_thread_runs_the_same_statements_for_short_and_long_threads(world: World) -> None:
    reply(world)
    url = thread_url(world.conversation)
    short = measured(world, world.sam, url)
    for n in range(8):
        reply(world, f"Note {n} about the Xylophonoma")
    long = measured(world, world.sam, url)
    # Reads are bounded whatever the thread's length; only the audit trail grows, one
    # reply.read event per patient message shown.
    reads = [s for s in long if "audit" not in s]
    assert len(reads) == len([s for s in short if "audit" not in s]), "\n".join(long)


def test_an_answer_with_a_file_reaches_the_patient_who_downloads_it(world: World) -> None:
    import io

    from tests.factories import MINIMAL_PDF

    url = thread_url(world.conversation)
    fields = {
        "csrf_token": world.ada.token(url),
        "body": ANSWER,
        "attachments": (io.BytesIO(MINIMAL_PDF), "Quagmire_care_plan.pdf"),
    }
    sent = world.ada.client.post(f"{url}/answer", data=fields, content_type="multipart/form-data")
    assert sent.status_code == 302
    answer = messages_in(world.app, world.conversation)[-1]
    page = page_of(world.patient, f"/conversations/{world.conversation}")
    assert "Quagmire_care_plan.pdf" in page
    link = re.search(
        rf'href="(/messages/{answer.public_id}/attachments/[0-9a-f]{{32}}/download)"', page
    )
    assert link is not None
    got = world.patient.get(link.group(1))
    assert got.status_code == 200
    assert got.data == MINIMAL_PDF


def test_a_refused_file_in_an_answer_stores_nothing(world: World) -> None:
    import io

    url = thread_url(world.conversation)
    fields = {
        "csrf_token": world.ada.token(url),
        "body": ANSWER,
        "attachments": (io.BytesIO(b"GIF89a not a pdf at all"), "care_plan.pdf"),
    }
    refused = world.ada.client.post(
        f"{url}/answer", data=fields, content_type="multipart/form-data"
    )
    assert refused.status_code == 400
    assert "Traceback" not in refused.get_data(as_text=True)
    assert len(messages_in(world.app, world.conversation)) == 1
    assert len(notices_of(world.app, NoticeKind.PICKUP)) == 1
