"""The revalidation input digest, assembled from stored canonical bytes, equals the RFC 8785
digest of the same input built the slow way."""

from __future__ import annotations

from typing import Any

from agov.hashing import canonical_json, digest
from agov.revalidation import _input_digest, _Row


def test_assembled_digest_equals_the_canonical_one(valid_spec: dict[str, Any]) -> None:
    org = {"max_monthly_budget_usd": 1000.0}
    for agent_id in ("finance-reconciler-prod", 'odd"id\\é'):
        canonical = canonical_json(valid_spec)
        row = _Row(agent_id, 1, "0" * 64, 1, "GOVERNED_VALID", valid_spec, canonical)
        expected = digest({"agent": {"id": agent_id, "agent": valid_spec}, "org": org})
        assert _input_digest(row, canonical_json(org)) == expected
