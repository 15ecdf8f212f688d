"""Spec parsing and validation: errors name the field path and the reason; hostile input is
refused without an unhandled exception (reliability row R1, spec side)."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agov.errors import SpecError
from agov.resources import policies_dir, schema_path
from agov.spec import load_spec, parse_spec_bytes, validate_spec


def test_a_valid_spec_loads_from_yaml_and_json_with_the_same_hash(valid_spec: dict[str, Any]) -> None:
    from_yaml = load_spec(yaml.safe_dump(valid_spec).encode())
    from_json = load_spec(json.dumps(valid_spec).encode())
    assert from_yaml.hash == from_json.hash
    assert from_yaml.id == "finance-reconciler-prod"


@pytest.mark.parametrize(
    ("mutate", "path", "reason"),
    [
        (lambda s: s["spec"].pop("anatomy"), r"spec: 'anatomy' is a required property", ""),
        (
            lambda s: s["spec"]["anatomy"]["reasoning"].update(temperature="hot"),
            "spec/anatomy/reasoning/temperature",
            "is not of type 'number'",
        ),
        (lambda s: s["spec"].update(agent_type="rogue"), "spec/agent_type", "is not one of"),
        (lambda s: s.update(apiVersion="v2"), "apiVersion", "was expected"),
        (lambda s: s["metadata"].update(extra=1), "metadata", "Additional properties"),
        (
            lambda s: s["spec"]["economics"].update(monthly_budget_usd=-1),
            "spec/economics/monthly_budget_usd",
            "less than the minimum",
        ),
    ],
)
def test_schema_errors_name_the_path_and_reason(
    valid_spec: dict[str, Any], mutate: Any, path: str, reason: str
) -> None:
    mutate(valid_spec)
    with pytest.raises(SpecError) as info:
        validate_spec(valid_spec)
    assert path in info.value.message
    assert reason in info.value.message


def test_oversized_spec_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def exploding_load(*_: Any, **__: Any) -> Any:
        raise AssertionError("parsed an oversized document")

    monkeypatch.setattr(yaml, "load", exploding_load)
    with pytest.raises(SpecError, match="over the 1024-byte limit"):
        parse_spec_bytes(b"a" * 1025, max_bytes=1024)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b"- a\n- b",
        b"\xff\xfe",
        b"{",
        b"a: !!python/object:os.system ls",
        b"key: [" * 5000,
        json.dumps({"a": 2**70}).encode(),
        b"[" * 100_000,
    ],
)
def test_malformed_documents_raise_spec_errors(raw: bytes) -> None:
    with pytest.raises(SpecError):
        load_spec(raw)


def test_deeply_nested_values_are_refused(valid_spec: dict[str, Any]) -> None:
    nested: Any = "x"
    for _ in range(100):
        nested = {"n": nested}
    valid_spec["metadata"]["description"] = nested
    with pytest.raises(SpecError, match="nested deeper"):
        validate_spec(valid_spec)


@given(st.binary(max_size=2048))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_r1_arbitrary_bytes_never_raise_anything_but_spec_error(raw: bytes) -> None:
    with contextlib.suppress(SpecError):
        load_spec(raw)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
        max_leaves=50,
    )
)
@settings(max_examples=300)
def test_r1_arbitrary_json_values_are_refused_cleanly(value: Any) -> None:
    with pytest.raises(SpecError):
        validate_spec(value)


def test_the_schema_knows_exactly_the_role_classes_the_default_policy_limits() -> None:
    # Kept in two places: the spec schema's enum and the policy's temperature limits. A role
    # class in one only is either refused at create or denied at every promotion.
    schema = json.loads(schema_path("agent_spec.json").read_text())
    enum = schema["properties"]["spec"]["properties"]["role_class"]["enum"]
    limits = json.loads((policies_dir() / "agov" / "config" / "data.json").read_text())["temperature_limits"]
    assert sorted(enum) == sorted(limits)


def test_every_schema_error_is_named_not_only_the_first(valid_spec: dict[str, Any]) -> None:
    valid_spec["spec"]["agent_type"] = "rogue"
    valid_spec["spec"]["economics"]["monthly_budget_usd"] = -1
    del valid_spec["metadata"]["version"]
    with pytest.raises(SpecError) as info:
        validate_spec(valid_spec)
    lines = info.value.message.splitlines()
    assert lines[0] == "metadata: 'version' is a required property"
    assert lines[1].startswith("  also spec/agent_type: 'rogue' is not one of")
    assert lines[2] == "  also spec/economics/monthly_budget_usd: -1 is less than the minimum of 0"
    assert info.value.path == "metadata"


def test_past_ten_schema_errors_the_rest_are_counted() -> None:
    document = {"apiVersion": "v2", "kind": "Robot", "metadata": {}, "spec": {}}  # 11 errors or more
    with pytest.raises(SpecError) as info:
        validate_spec(document)
    lines = info.value.message.splitlines()
    assert len(lines) == 11 and re.fullmatch(r"  also and \d+ more", lines[-1]), lines


def test_a_yaml_error_names_the_file_not_a_placeholder() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec_bytes(b"a: [1,\nb: 2\n", source="broken.yaml")
    assert '"broken.yaml", line 1' in info.value.message
    assert "<unicode string>" not in info.value.message


def test_yaml_aliases_are_refused_before_anything_expands(monkeypatch: pytest.MonkeyPatch) -> None:
    """R1: a 500-byte alias bomb expands to 9**10 values (gigabytes, minutes of CPU) when loaded."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb = ("\n".join(levels) + "\n").encode()
    assert len(bomb) < 600
    real_load = yaml.load

    def load_nothing_yet(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the document was loaded (its aliases expanded) before it was refused")

    monkeypatch.setattr(yaml, "load", load_nothing_yet)
    with pytest.raises(
        SpecError, match=r"^bomb\.yaml uses a YAML alias \(\*a0\), which agov does not accept$"
    ):
        parse_spec_bytes(bomb, source="bomb.yaml")
    # an anchor with no alias is inert, and loads
    monkeypatch.setattr(yaml, "load", real_load)
    assert parse_spec_bytes(b"kind: &k Agent\n") == {"kind": "Agent"}


@pytest.mark.parametrize(
    "raw",
    [
        b"spec:\n  <<: {economics: {monthly_budget_usd: 999999}}\n  economics: {monthly_budget_usd: 300}\n",
        b"<<: {a: 1}\nb: 2\n",
    ],
    ids=["beside-the-same-key", "alone"],
)
def test_a_yaml_merge_key_is_refused(raw: bytes) -> None:
    """`<<` beside a key of the same name keeps one value of the two silently, as a repeated key."""
    with pytest.raises(
        SpecError, match=r"^s\.yaml uses a YAML merge key \(<<\) on line [12], which agov does not accept$"
    ):
        parse_spec_bytes(raw, source="s.yaml")


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        (b'{"spec": {"temperature": 0.1, "temperature": 0.9}}', "one object"),
        (b"spec:\n  temperature: 0.1\n  temperature: 0.9\n", 'one mapping\n  in "s.yaml", line 3'),
        (b"kind: Agent\nspec: {}\nkind: Other\n", 'one mapping\n  in "s.yaml", line 3'),
    ],
    ids=["json", "yaml", "yaml-top-level"],
)
def test_a_key_repeated_in_one_mapping_is_refused(raw: bytes, where: str) -> None:
    """The file's reader sees the first value, the parser keeps the last: refused, as proofs are."""
    with pytest.raises(SpecError) as info:
        parse_spec_bytes(raw, source="s.yaml")
    assert "appears twice in " + where in info.value.message


def test_the_same_key_in_different_mappings_still_loads(valid_spec: dict[str, Any]) -> None:
    assert parse_spec_bytes(b"a: {name: x}\nb: {name: y}\n") == {"a": {"name": "x"}, "b": {"name": "y"}}
    spec = load_spec(yaml.safe_dump(valid_spec).encode())
    assert spec.hash == load_spec(json.dumps(valid_spec).encode()).hash


@pytest.mark.parametrize(
    ("raw", "field", "what"),
    [
        (b"metadata:\n  created: 2026-01-01\n", "metadata/created", "date datetime.date(2026, 1, 1)"),
        (
            b"spec:\n  anatomy:\n    temperature: .nan\n",
            "spec/anatomy/temperature",
            "nan is not a finite number",
        ),
        (b"spec:\n  limits: [1, .inf]\n", "spec/limits/1", "inf is not a finite number"),
        (b"blob: !!binary aGVsbG8=\n", "blob", "bytes b'hello'"),
    ],
    ids=["yaml-date", "nan", "inf-in-a-list", "binary"],
)
def test_a_value_json_cannot_carry_is_named_by_its_field(raw: bytes, field: str, what: str) -> None:
    """Before: "Object of type date is not JSON serializable", with no field to look at."""
    with pytest.raises(SpecError) as info:
        validate_spec(parse_spec_bytes(raw))
    assert info.value.path == field
    assert info.value.message == f"{field}: a value JSON cannot carry: {what}"
    assert "quote it" in info.value.hint


@pytest.mark.parametrize("field", ["id", "name"])
@pytest.mark.parametrize("value", ["two\nlines", "tab\there", "bell\x07", "line\u2028sep"])
def test_an_id_or_name_that_is_not_one_line_is_refused_in_words(
    valid_spec: dict[str, Any], field: str, value: str
) -> None:
    """Ids and names are printed one per line (`agent list`, audit lines): a line break in one
    broke the layout. The schema's pattern says so in words, not as a regular expression."""
    document = json.loads(json.dumps(valid_spec))
    document["metadata"][field] = value
    with pytest.raises(SpecError) as info:
        validate_spec(document)
    assert info.value.path == f"metadata/{field}"
    assert info.value.message == f"metadata/{field}: {value!r} holds a control or line-breaking character"


@pytest.mark.parametrize("field", ["id", "name"])
def test_an_empty_id_or_name_is_said_to_be_empty_and_nothing_else(
    valid_spec: dict[str, Any], field: str
) -> None:
    """It also fails the one-line pattern, which said it held a control character."""
    document = json.loads(json.dumps(valid_spec))
    document["metadata"][field] = ""
    with pytest.raises(SpecError) as info:
        validate_spec(document)
    assert info.value.message == f"metadata/{field}: '' should be non-empty"


def test_the_one_line_pattern_is_the_schemas() -> None:
    from agov.spec import _ONE_LINE

    metadata = json.loads(schema_path("agent_spec.json").read_text())["properties"]["metadata"]["properties"]
    assert metadata["id"]["pattern"] == metadata["name"]["pattern"] == _ONE_LINE
    assert re.search(_ONE_LINE, "finance-reconciler prod/2 \u00e9\u200d") is not None
