"""Spec hash and policy hash: deterministic, and sensitive to every value change."""

from __future__ import annotations

import json
from typing import Any

import pytest
import rfc8785
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agov.errors import SpecError
from agov.hashing import canonical_json, policy_hash, spec_hash
from agov.spec import parse_spec_bytes

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False, width=64)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
@settings(max_examples=200)
def test_key_order_and_whitespace_do_not_change_the_hash(doc: dict[str, Any]) -> None:
    reordered = dict(reversed(list(doc.items())))
    spaced = json.loads(json.dumps(doc, indent=3, ensure_ascii=False))
    assert spec_hash(doc) == spec_hash(reordered) == spec_hash(spaced)


@given(st.dictionaries(st.text(min_size=1, max_size=8), json_values, min_size=1, max_size=6), st.data())
@settings(max_examples=200)
def test_any_value_change_changes_the_hash(doc: dict[str, Any], data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(doc)))
    new_value = data.draw(json_values.filter(lambda v: canonical_json(v) != canonical_json(doc[key])))
    changed = {**doc, key: new_value}
    assert spec_hash(changed) != spec_hash(doc)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("budget: 200", "budget: 200.0"),
        ("t: 0.2", "t: 2.0e-1"),
        ("t: 0.20", "t: 0.2"),
        ('{"a": 1, "b": [1, 2]}', "b: [1, 2]\na: 1"),
        ('{"x": 1e3}', '{"x": 1000}'),
        ('{"x": 1.50}', "x: 1.5"),
    ],
)
def test_equivalent_number_spellings_hash_the_same(a: str, b: str) -> None:
    assert spec_hash(parse_spec_bytes(a.encode())) == spec_hash(parse_spec_bytes(b.encode()))


# Every kind of value the fast path must either print exactly as RFC 8785 does or hand over:
# any float (exponents, integral values, subnormals), keys beyond ASCII (UTF-16 order), control
# characters, and integers at the edge of the safe range.
any_scalars = json_scalars | st.sampled_from(
    [0.0, -0.0, 1.0, 1e16, 1e21, 1e-6, 1e-7, 5e-324, 123.456, 2**53 - 1, -(2**53) + 1]
)
any_values = st.recursive(
    any_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=25,
)


@given(any_values)
@settings(max_examples=1500)
@example({"\ue000": 1, "\U0001f600": 2, "a": [1.0, 0.35, "\x00\x1f\x7f\u2028"]})
def test_the_fast_path_prints_exactly_what_rfc8785_prints(value: Any) -> None:
    assert canonical_json(value) == rfc8785.dumps(value)


def test_values_json_cannot_carry_canonically_are_refused() -> None:
    with pytest.raises(SpecError, match="cannot be canonicalized"):
        canonical_json({"n": 2**60})
    with pytest.raises(SpecError, match="cannot be canonicalized"):
        canonical_json({"n": float("nan")})
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    for odd in (
        {"n": float("inf")},
        {1: "int key"},
        {"s": "\ud800"},
        {"n": -(2**53)},
        [{"t": (2**60,)}],
        cyclic,
        deep,
    ):
        with pytest.raises(SpecError, match="cannot be canonicalized"):
            canonical_json(odd)


def test_policy_hash_is_order_independent_and_byte_sensitive() -> None:
    files = [("agov/a.rego", b"package agov.a\n"), ("agov/b/data.json", b"{}")]
    assert policy_hash(files) == policy_hash(list(reversed(files)))
    for index in range(len(files[0][1])):
        flipped = bytearray(files[0][1])
        flipped[index] ^= 0x01
        assert policy_hash([("agov/a.rego", bytes(flipped)), files[1]]) != policy_hash(files)
    assert policy_hash([("agov/renamed.rego", files[0][1]), files[1]]) != policy_hash(files)


def test_policy_hash_refuses_duplicate_paths() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        policy_hash([("agov/a.rego", b"1"), ("agov/a.rego", b"2")])
