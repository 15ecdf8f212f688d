"""What a user reads of an OPA evaluation error: OPA's message and the policy line it names.

Before, only the message was kept ("div: divide by zero"), with no file or line, and a long
message (a rule's conflicting values) was cut at 200 characters, location and all."""

from __future__ import annotations

import json

import pytest

from agov.decisions import parse_verdict
from agov.errors import DecisionError
from agov.opa.http import _opa_message


def _body(message: str, location: dict[str, object] | None) -> bytes:
    error: dict[str, object] = {"code": "eval_builtin_error", "message": message}
    if location is not None:
        error["location"] = location
    return json.dumps(
        {"code": "internal_error", "message": "error(s) occurred while evaluating query", "errors": [error]}
    ).encode()


def test_the_error_names_the_policy_line() -> None:
    body = _body("div: divide by zero", {"file": "agov/lib/spec_rules/spec_rules.rego", "row": 146, "col": 2})
    assert _opa_message(body) == (
        "internal_error: error(s) occurred while evaluating query: div: divide by zero"
        " at agov/lib/spec_rules/spec_rules.rego:146:2"
    )


def test_a_long_message_is_cut_but_its_location_is_kept() -> None:
    values = "\n".join(f"  {i} at agov/admission/admission.rego:{i}" for i in range(100))
    text = _opa_message(
        _body(
            f"rule data.agov.x produced conflicting values:\n{values}",
            {
                "file": "agov/admission/admission.rego",
                "row": 13,
                "col": 1,
            },
        )
    )
    assert text.endswith("… at agov/admission/admission.rego:13:1")
    assert len(text) < 600


def test_an_error_without_a_usable_location_reads_as_before() -> None:
    for location in (None, {"file": ""}, {"row": 3}, "x"):
        body = _body("div: divide by zero", location)  # type: ignore[arg-type]
        assert _opa_message(body).endswith("evaluating query: div: divide by zero")
    assert _opa_message(_body("m", {"file": "f.rego"})).endswith(": m at f.rego")


def test_a_missing_verdict_says_the_policy_gave_none() -> None:
    """Before: "verdict for a1 is not an object: None", Python's word for JSON's nothing."""
    with pytest.raises(DecisionError) as missing:
        parse_verdict(None, "verdict for a1")
    assert (
        missing.value.message == "verdict for a1: the policy gave no result (undefined), which fails closed"
    )
    with pytest.raises(DecisionError, match=r"verdict for a1 is not an object: \[1\]"):
        parse_verdict([1], "verdict for a1")
