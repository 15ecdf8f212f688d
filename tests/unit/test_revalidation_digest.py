"""Revalidation assembles its OPA input and each agent's input digest from the stored canonical
bytes; both equal what the slow way (parse, build the document, encode) gives."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from agov.hashing import canonical_json, digest
from agov.revalidation import _chunk_input, _input_digest, _Row

ODD_IDS = ("finance-reconciler-prod", 'odd"id\\é', "tab\tnew\nline")


def test_assembled_digest_equals_the_canonical_one(valid_spec: dict[str, Any]) -> None:
    org = {"max_monthly_budget_usd": 1000.0}
    for agent_id in ODD_IDS:
        canonical = canonical_json(valid_spec)
        row = _Row(agent_id, 1, "0" * 64, 1, "GOVERNED_VALID", canonical, True, None)
        expected = digest({"agent": {"id": agent_id, "agent": valid_spec}, "org": org})
        assert _input_digest(row, canonical_json(org)) == expected


def test_assembled_chunk_input_is_the_document_it_stands_for(valid_spec: dict[str, Any]) -> None:
    org = {"max_monthly_budget_usd": 1000.0}
    other = {**valid_spec, "metadata": {**valid_spec["metadata"], "name": "Zweite Fassung, ünïcødé"}}
    specs = [valid_spec, other, valid_spec]
    rows = [
        _Row(agent_id, 1, "0" * 64, 1, "GOVERNED_VALID", canonical_json(spec), True, None)
        for agent_id, spec in zip(ODD_IDS, specs, strict=True)
    ]
    now = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    sent = _chunk_input(rows, canonical_json(org), "ab" * 32, now)
    assert json.loads(sent.json) == {
        "agents": [{"id": agent_id, "agent": spec} for agent_id, spec in zip(ODD_IDS, specs, strict=True)],
        "org": org,
        "policy_hash": "ab" * 32,
        "now": "2026-01-02T03:04:05.678901+00:00",
    }
    assert json.loads(_chunk_input([], canonical_json(org), "ab" * 32, now).json)["agents"] == []


def test_a_report_keeps_the_first_changes_and_counts_the_rest() -> None:
    from agov.decisions import PolicyVerdict, Reason
    from agov.revalidation import _CHANGES_KEPT, RevalidationReport

    report = RevalidationReport(policy_hash="p" * 64, dry_run=False)
    fails = PolicyVerdict(False, (Reason("PROMOTION_DENY_X", "why"),))
    for i in range(_CHANGES_KEPT + 3):
        report.note_change(_Row(f"a{i}", 1, "0" * 64, 1, "GOVERNED_VALID", b"{}", True, None), fails)

    assert [c["agent_id"] for c in report.changes] == [f"a{i}" for i in range(_CHANGES_KEPT)]
    assert report.changes[0] == {
        "agent_id": "a0",
        "from": "GOVERNED_VALID",
        "to": "GOVERNED_INVALIDATED",
        "deny": [{"code": "PROMOTION_DENY_X", "message": "why"}],
        "warn": [],
    }
    assert report.changes_omitted == 3
    assert report.as_dict()["changes_omitted"] == 3
