"""States are StrEnums: the stored values are pinned, columns fit them, and no bare literal
of a state is compared or assigned anywhere in portal/, notifier/ or the templates."""

from __future__ import annotations

import ast
import re
from enum import StrEnum
from pathlib import Path

import pytest
from sqlalchemy import String
from sqlalchemy.orm import InstrumentedAttribute

from notifier.worker import RowOutcome, RunStats
from portal.audit import MAX_DETAIL_TEXT, Outcome
from portal.models import AuditEvent, Notification, Role, User
from portal.models.messages import LinkState, MessageState
from portal.models.notifications import NoticeKind, NoticeStatus

ROOT = Path(__file__).resolve().parent.parent.parent

# The values are in the database (columns, audit details, the hash chain) and in old
# exports: changing one needs a migration, so the test spells them out.
STORED = {
    NoticeStatus: {"queued", "sending", "sent", "failed", "cancelled", "bounced"},
    MessageState: {"available", "revoked", "expired", "deleted"},
    LinkState: {"usable", "revoked", "expired", "unknown", "unavailable"},
    Outcome: {"success", "failure", "denied"},
}
COLUMNS: list[tuple[InstrumentedAttribute[str], type[StrEnum]]] = [
    (Notification.status, NoticeStatus),
    (Notification.kind, NoticeKind),
    (AuditEvent.outcome, Outcome),
    (User.role, Role),
]
# What a name is about (its last word: row.status, link_state(), _FHIR_OUTCOME) -> the
# states such a name holds. Other literals ("ok", "connection-lost") are not states.
STATES_OF: dict[str, frozenset[str]] = {
    "status": frozenset(NoticeStatus),
    "state": frozenset(MessageState) | frozenset(LinkState),
    "outcome": frozenset(Outcome) | frozenset(RowOutcome),
    "reason": frozenset(MessageState),  # pickup.Unavailable.reason
}


@pytest.mark.parametrize("enum", list(STORED), ids=lambda e: e.__name__)
def test_stored_state_values_are_pinned(enum: type[StrEnum]) -> None:
    assert {member.value for member in enum} == STORED[enum]


@pytest.mark.parametrize(("column", "enum"), COLUMNS, ids=lambda c: getattr(c, "key", ""))
def test_state_columns_fit_their_longest_member(
    column: InstrumentedAttribute[str], enum: type[StrEnum]
) -> None:
    kind = column.property.columns[0].type
    assert isinstance(kind, String)
    assert kind.length is not None
    assert max(len(member) for member in enum) <= kind.length


def test_states_in_audit_details_fit() -> None:
    assert max(len(m) for m in [*MessageState, *LinkState]) <= MAX_DETAIL_TEXT


def test_every_worker_outcome_has_a_counter() -> None:
    stats = RunStats()
    for outcome in RowOutcome:
        stats.add(outcome)
    assert stats.processed == len(RowOutcome)
    assert all(getattr(stats, outcome) == 1 for outcome in RowOutcome)


def _topic(node: ast.AST) -> str | None:
    """Return "status", "state", "outcome" or "reason" when ``node`` names one, else None."""
    if isinstance(node, ast.Call):
        node = node.func
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)
    if not isinstance(name, str):
        return None
    word = name.lower().rpartition("_")[2]
    return word if word in STATES_OF else None


def _literals(node: ast.AST) -> set[str]:
    return {
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def _pairs(tree: ast.AST) -> list[tuple[int, str | None, ast.AST]]:
    """Return (line, topic, value) for comparisons, keywords, assignments and returns."""
    found: list[tuple[int, str | None, ast.AST]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            topics = [t for t in map(_topic, operands) if t]
            found += [(node.lineno, topic, op) for topic in topics for op in operands]
        elif isinstance(node, ast.FunctionDef):  # def message_state(...): return "expired"
            found += [
                (r.lineno, _topic(ast.Name(node.name)), r.value)
                for r in ast.walk(node)
                if isinstance(r, ast.Return) and r.value is not None
            ]
        elif isinstance(node, ast.keyword) and node.arg:
            found.append((node.value.lineno, _topic(ast.Name(node.arg)), node.value))
        elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                found += _assigned(node.lineno, target, node.value)
    return found


def _assigned(line: int, target: ast.AST, value: ast.AST) -> list[tuple[int, str | None, ast.AST]]:
    """Pair ``a.status = v`` and, element by element, ``state, x = v, w``."""
    if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
        return [(line, _topic(t), v) for t, v in zip(target.elts, value.elts, strict=False)]
    return [(line, _topic(target), value)]


def bare_states(source: str) -> list[str]:
    """Return "line: literal" for each state written as a bare string in ``source``."""
    hits = []
    for line, topic, value in _pairs(ast.parse(source)):
        if topic is not None:
            hits += [f"{line}: {text!r}" for text in _literals(value) & STATES_OF[topic]]
    return hits


def test_the_check_finds_bare_states() -> None:
    source = (
        'if notice.status == "sent": pass\n'
        'if link_state(s, link) in ("usable", "expired"): pass\n'
        'audit.record(s, a, outcome="success" if ok else "failure")\n'
        '_FHIR_OUTCOME = {"denied": "8"}\n'
        'row.status = "queued"\n'
        'state, subject = "deleted", "(deleted)"\n'
        'def link_state(link):\n    return "revoked"\n'
    )
    assert sorted(bare_states(source)) == [
        "1: 'sent'",
        "2: 'expired'",
        "2: 'usable'",
        "3: 'failure'",
        "3: 'success'",
        "4: 'denied'",
        "5: 'queued'",
        "6: 'deleted'",
        "8: 'revoked'",
    ]
    assert (
        bare_states(
            'jsonify(status="unavailable")\nif err.reason != "timeout": pass\n'
            "x = NoticeStatus.SENT\nif state == LinkState.USABLE: pass\n"
        )
        == []
    )


def test_no_bare_state_literals_in_code() -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{hit}"
        for package in ("portal", "notifier")
        for path in sorted((ROOT / package).rglob("*.py"))
        for hit in bare_states(path.read_text())
    ]
    assert hits == [], "use the StrEnum member (portal.models.*, portal.audit, notifier.worker)"


_TEMPLATE_COMPARE = re.compile(r"\b(state|status|outcome|reason)\s*(?:==|!=)\s*[\"'](\w+)[\"']")
_TEMPLATE_LOOKUP = re.compile(r"\{([^{}]*)\}\[\w+\.(state|status|outcome)\]")


def test_states_named_in_templates_are_members() -> None:
    """Jinja compares with plain strings (a StrEnum equals its value): keep them in step."""
    unknown, checked = [], 0
    for path in sorted((ROOT / "templates").rglob("*.*")):
        text = path.read_text()
        named = [(m[1], m[2]) for m in _TEMPLATE_COMPARE.finditer(text)]
        named += [
            (m[2], key)
            for m in _TEMPLATE_LOOKUP.finditer(text)
            for key in re.findall(r"[\"'](\w+)[\"']\s*:", m[1])
        ]
        unknown += [
            f"{path.name}: {value}" for topic, value in named if value not in STATES_OF[topic]
        ]
        checked += len(named)
    assert unknown == []
    assert checked >= 10  # inbox, gone, history and the auditor's search: the check reads them
