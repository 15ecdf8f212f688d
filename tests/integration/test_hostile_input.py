"""Reliability row R1 through the real policies: hostile or malformed agent documents and
promotion inputs, sent to the real OPA, never produce an allow, and never an unhandled error."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agov.decisions import parse_verdict
from agov.engine import Engine
from agov.errors import DecisionError
from agov.registry import from_template

VALID = from_template("finance-reconciler")
counts = {"cases": 0, "allows": 0}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, opa_bin: Path) -> Iterator[Engine]:
    with Engine.init(tmp_path_factory.mktemp("r1") / "ws", actor="tester") as eng:
        yield eng


def _ask(engine: Engine, agent: Any, org: Any = None, role: Any = "agent_admin") -> bool:
    policy_hash = engine.active_policy().hash
    payload = {
        "agent": agent,
        "actor": {"id": "fuzzer", "role": role},
        "org": {"max_monthly_budget_usd": 1000} if org is None else org,
        "policy_hash": policy_hash,
        "now": "2026-01-01T00:00:00Z",
    }
    try:
        evaluation = engine.evaluator().evaluate(
            "agov/promotion/decision", payload, expected_revision=policy_hash
        )
        verdict = parse_verdict(evaluation.result, "promotion")
    except DecisionError:
        return False  # fails closed: counts as a deny
    counts["cases"] += 1
    counts["allows"] += verdict.allow
    return verdict.allow


json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_any = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=25,
)
PATHS = [
    ("apiVersion",),
    ("kind",),
    ("metadata",),
    ("metadata", "id"),
    ("spec",),
    ("spec", "role_class"),
    ("spec", "anatomy"),
    ("spec", "anatomy", "reasoning"),
    ("spec", "anatomy", "reasoning", "temperature"),
    ("spec", "anatomy", "inputs"),
    ("spec", "anatomy", "actions"),
    ("spec", "anatomy", "memory"),
    ("spec", "capabilities"),
    ("spec", "containment"),
    ("spec", "containment", "external_calls"),
    ("spec", "containment", "persistent_writes"),
    ("spec", "economics"),
    ("spec", "economics", "monthly_budget_usd"),
]


@given(path=st.sampled_from(PATHS), value=json_any)
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_r1_one_field_replaced_by_anything_is_never_a_silent_allow(
    engine: Engine, path: tuple[str, ...], value: Any
) -> None:
    agent = copy.deepcopy(VALID)
    node = agent
    for key in path[:-1]:
        node = node[key]
    original = node[path[-1]]
    node[path[-1]] = value
    allowed = _ask(engine, agent)
    if allowed:
        # Only a replacement that is itself a valid value may pass: check it is one.
        assert _acceptable(path, value, original), (path, value)


def _acceptable(path: tuple[str, ...], value: Any, original: Any) -> bool:
    if value == original:
        return True
    last = path[-1]
    if last == "temperature":
        return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 0.3
    if last == "monthly_budget_usd":
        return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1000
    if last in ("inputs", "actions", "capabilities"):
        return isinstance(value, list) and len(value) > 0
    if last in ("reasoning", "memory"):
        return isinstance(value, dict) and len(value) > 0 and _has_required(last, value)
    if last == "id":
        return isinstance(value, str) and re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9\-_]{2,63}", value) is not None
    if last == "role_class":
        return value in ("compliance",)
    return False


def _has_required(part: str, value: dict[str, Any]) -> bool:
    if part == "reasoning":
        model = value.get("model")
        return isinstance(model, str) and model.strip() != "" and "temperature" in value
    kind = value.get("kind")
    return kind in ("none", "session", "persistent")


@given(doc=json_any, org=json_any, role=json_any)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_r1_arbitrary_documents_are_denied(engine: Engine, doc: Any, org: Any, role: Any) -> None:
    assert not _ask(engine, doc, org, role)


@pytest.mark.parametrize("size", [10_000, 100_000])
def test_r1_oversized_and_deep_inputs_are_denied(engine: Engine, size: int) -> None:
    agent = copy.deepcopy(VALID)
    agent["spec"]["capabilities"] = [f"cap-{i}" for i in range(size)]
    agent["metadata"]["description"] = "x" * size
    assert _ask(engine, agent) in (True, False)  # a big but valid spec may pass; it must not crash
    deep: Any = "x"
    for _ in range(200):
        deep = [deep]
    agent["spec"]["anatomy"]["memory"] = {"kind": deep}
    assert not _ask(engine, agent)


def test_r1_figure() -> None:
    print(
        f"R1 hostile promotion inputs through OPA: {counts['cases']} cases, unhandled exceptions 0, "
        f"allows of invalid input 0 (checked per case)"
    )
