"""Reading delivery status notifications (RFC 3464, RFC 6533): what relays write, what they
get wrong, and mail that only looks like one. No database: the parser alone."""

from __future__ import annotations

import random
import re
from collections.abc import Callable

import pytest

from notifier import dsn
from notifier.smtp import make_message_id
from tests.support import bounces as mail

NOTICE_ID = "5f0c2a9e6b0d4c7e9a51d3b2c4e6f801"
NOTICE = make_message_id(NOTICE_ID, mail.DOMAIN)


@pytest.mark.parametrize(
    ("bounce", "severity"),
    [
        (dsn.HARD, dsn.Severity.HARD),
        (dsn.SOFT, dsn.Severity.SOFT),
        (dsn.DELAYED, dsn.Severity.DELAYED),
        (dsn.Bounce("delivered", "2.0.0", "250 OK"), dsn.Severity.NONE),
        (dsn.Bounce("failed", "4.4.7", "expired"), dsn.Severity.SOFT),  # gave up on a 4xx
    ],
)
@pytest.mark.parametrize("headers_only", [False, True], ids=["full", "headers"])
def test_a_report_as_relays_write_it_is_read(
    bounce: dsn.Bounce, severity: dsn.Severity, headers_only: bool
) -> None:
    raw = mail.report(NOTICE, bounce, headers_only=headers_only)

    assert dsn.parse(raw) == dsn.Report(severity, bounce.status, NOTICE_ID)


@pytest.mark.parametrize("make", mail.ODD_BUT_VALID.values(), ids=mail.ODD_BUT_VALID.keys())
def test_oddly_encoded_reports_are_read(make: Callable[[str], bytes]) -> None:
    assert dsn.parse(make(NOTICE)) == dsn.Report(dsn.Severity.HARD, "5.1.1", NOTICE_ID)


NOT_OURS = {"foreign-message-id": None, "no-returned-part": None, "unknown-notice": "other"}
UNUSABLE = {
    "no-status": "malformed",
    "auto-reply": "not-dsn",
    "huge": "too-large",
    "nested-mime": "too-complex",
    "many-parts": "too-complex",
    "bad-base64": "malformed",
    "binary": "not-dsn",
    "empty": "not-dsn",
}


@pytest.mark.parametrize("name", UNUSABLE)
def test_mail_that_is_no_usable_report_says_why_and_nothing_else(name: str) -> None:
    with pytest.raises(dsn.DsnError) as caught:
        dsn.parse(mail.SET_ASIDE[name](NOTICE))

    assert caught.value.reason == UNUSABLE[name]
    assert str(caught.value) == UNUSABLE[name]  # no text of the mail in the error
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__ or caught.value.__context__ is None


@pytest.mark.parametrize("name", ["huge", "nested-mime", "many-parts"])
def test_a_big_or_deeply_nested_mail_never_reaches_the_parser(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stdlib parser is quadratic in lines times depth (900 nested parts took 55 s):
    # such mail must be refused on its raw bytes, so the parser is never called at all.
    def parser_reached(*args: object, **kwargs: object) -> None:
        raise AssertionError("the parser was reached")

    raw = mail.SET_ASIDE[name](NOTICE)
    monkeypatch.setattr(dsn.BytesParser, "parsebytes", parser_reached)

    with pytest.raises(dsn.DsnError) as caught:
        dsn.parse(raw)
    assert caught.value.reason in ("too-large", "too-complex")


def test_a_real_report_is_well_within_the_limits() -> None:
    raw = mail.report(NOTICE, dsn.HARD)

    dsn.prescan(raw)
    assert len(raw) < dsn.MAX_BYTES // 4


@pytest.mark.parametrize("name", NOT_OURS)
def test_a_report_on_mail_that_is_not_a_notice_of_ours_names_no_notice(name: str) -> None:
    found = dsn.parse(mail.SET_ASIDE[name](NOTICE))

    assert found.severity is dsn.Severity.HARD
    assert found.notice_id != NOTICE_ID
    assert (found.notice_id is None) == (NOT_OURS[name] is None)


def test_the_most_severe_recipient_decides() -> None:
    blocks = (
        mail.recipient_block("delivered", "2.0.0", "a@example.org")
        + b"\r\n"
        + mail.recipient_block("delayed", "4.4.1", "b@example.org").split(b"\r\n\r\n", 1)[1]
        + b"\r\n"
        + mail.recipient_block("failed", "5.2.1", "c@example.org").split(b"\r\n\r\n", 1)[1]
    )
    raw = mail.handmade(
        mail.encoded("message/delivery-status", "7bit", blocks),
        mail.encoded("text/rfc822-headers", "7bit", mail.original(NOTICE)),
    )

    assert dsn.parse(raw) == dsn.Report(dsn.Severity.HARD, "5.2.1", NOTICE_ID)


def test_no_mangling_of_a_real_report_makes_the_parser_raise_anything_else() -> None:
    rng = random.Random(3464)
    valid = mail.report(NOTICE, dsn.SOFT)
    seen: set[str] = set()
    for _ in range(400):
        raw = bytearray(valid)
        for _ in range(rng.randint(1, 12)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        cut = bytes(raw[: rng.randrange(len(raw) + 1)]) if rng.random() < 0.3 else bytes(raw)
        try:
            found = dsn.parse(cut)
        except dsn.DsnError as err:
            seen.add(err.reason)
            continue
        seen.add("read")
        assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", found.status)
        assert found.notice_id is None or re.fullmatch(r"[A-Za-z0-9._-]+", found.notice_id)
    assert "read" in seen
    assert seen & {"malformed", "not-dsn"}


@pytest.mark.parametrize(
    ("message_id", "notice_id"),
    [
        (NOTICE, NOTICE_ID),
        (f"  {NOTICE}\r\n", NOTICE_ID),
        ("<notice-abc@portal.example.org> trailing", None),
        ("<notice-@portal.example.org>", None),
        ("<someone@portal.example.org>", None),
        ("<notice-ab c@portal.example.org>", None),
    ],
)
def test_only_our_message_ids_name_a_notice(message_id: str, notice_id: str | None) -> None:
    assert dsn.notice_id_of(message_id) == notice_id
