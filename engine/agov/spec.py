"""The agent spec: parse YAML or JSON, validate against the shared JSON Schema, hash it.

Pure apart from reading the schema that ships with the policies; parsing happens on bytes the
caller has already size-checked, so an oversized document is refused before it is parsed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import jsonschema
import yaml

from agov.errors import SpecError
from agov.hashing import canonical_json, sha256_hex, spec_hash
from agov.resources import schema_path

MAX_SPEC_BYTES = 256 * 1024
MAX_DEPTH = 32


@dataclass(frozen=True)
class AgentSpec:
    """A validated spec document together with its canonical form and hash."""

    document: dict[str, Any]
    canonical: bytes
    hash: str

    @property
    def id(self) -> str:
        return str(self.document["metadata"]["id"])

    @property
    def name(self) -> str:
        return str(self.document["metadata"]["name"])

    @property
    def workspace(self) -> str:
        return str(self.document["metadata"].get("workspace", "default"))

    @property
    def agent_type(self) -> str:
        return str(self.document["spec"]["agent_type"])

    @property
    def role_class(self) -> str:
        return str(self.document["spec"]["role_class"])

    @property
    def containment(self) -> dict[str, Any]:
        return dict(self.document["spec"]["containment"])


@cache
def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads(schema_path("agent_spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _depth(value: Any, limit: int) -> int:
    stack: list[tuple[Any, int]] = [(value, 1)]
    deepest = 0
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return deepest


def _bracket_depth(text: str) -> int:
    """Deepest run of unclosed ``[``/``{`` (over-counts brackets in strings, which only errs
    towards refusing)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif char in "]}":
            depth = max(depth - 1, 0)
    return deepest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class _RepeatedJsonKeyError(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all distinct: with a repeated key the reader of the file and
    the parser (last one wins) would see different specs. A key with an escaped lone surrogate
    is refused too: Go's decoder (OPA's) reads every such key as the same U+FFFD."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _RepeatedJsonKeyError(f"the key {key!r} appears twice in one object")
        if any("\ud800" <= c <= "\udfff" for c in key):
            raise _RepeatedJsonKeyError(f"the key {key!r} escapes a lone surrogate, which is no character")
        seen.add(key)
    return dict(pairs)


_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _MergeKeyError(yaml.YAMLError):
    def __init__(self, line: int) -> None:
        super().__init__(f"a YAML merge key (<<) on line {line}")
        self.line = line


class _RepeatedYamlKeyError(yaml.constructor.ConstructorError):
    pass


class _UniqueKeyLoader(_YAML_LOADER):  # type: ignore[misc]
    """The safe loader (libyaml's when present), refusing a key repeated in one mapping, and
    merge keys: ``<<`` merges a mapping in, and a key given both there and beside it keeps one
    of the two values silently, as a repeated key would."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _MergeKeyError(key_node.start_mark.line + 1)
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
                seen.add(key)
            except TypeError:  # unhashable: the base class says so
                continue
            if repeated:
                raise _RepeatedYamlKeyError(
                    None, None, f"the key {key!r} appears twice in one mapping", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


def _refuse_aliases(text: str, loader: Any, source: str) -> None:
    """An alias repeats a node by reference: nine nested ones in 400 bytes expand to a billion
    values (gigabytes, minutes of CPU) when loaded. A spec has no use for them. The parser's
    events are read without building anything."""
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.AliasEvent):
            raise SpecError(
                f"{source} uses a YAML alias (*{event.anchor}), which agov does not accept",
                hint="write the repeated values out",
            )


def ambiguous_keys(text: str) -> str | None:
    """What makes a JSON or YAML document read one way by a person and another by a parser: a key
    repeated in one mapping, a YAML merge key, a YAML alias, or (JSON) a key escaping a lone
    surrogate. None when it has none, or does not parse at all (its own loader names that).

    For documents other than specs, such as a policy's data files, which are not held to the
    other rules of :func:`parse_spec_bytes`.
    """
    try:
        if text.lstrip().startswith("{"):
            json.loads(text, object_pairs_hook=_unique_keys)
        elif _bracket_depth(text) <= MAX_DEPTH:  # deeper: libyaml could overflow the C stack
            _refuse_aliases(text, _YAML_LOADER, "it")
            yaml.load(text, Loader=_UniqueKeyLoader)
    except _MergeKeyError as exc:
        return f"a YAML merge key (<<) on line {exc.line}"
    except _RepeatedYamlKeyError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else "?"
        return f"{exc.problem} (line {line})"
    except (_RepeatedJsonKeyError, SpecError) as exc:  # SpecError: an alias
        return exc.message if isinstance(exc, SpecError) else str(exc)
    except (yaml.YAMLError, ValueError, RecursionError):
        return None
    return None


def parse_spec_bytes(raw: bytes, *, source: str = "spec", max_bytes: int = MAX_SPEC_BYTES) -> dict[str, Any]:
    """Parse a YAML or JSON document (JSON is YAML) into a mapping.

    Raises:
        SpecError: too large, not UTF-8, not parseable, or not a mapping.
    """
    if len(raw) > max_bytes:
        raise SpecError(
            f"{source} is {len(raw)} bytes, over the {max_bytes}-byte limit",
            hint="an agent spec is a small document; check you passed the right file",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{source} is not UTF-8: {exc}") from exc
    if _bracket_depth(text) > MAX_DEPTH:
        # libyaml recurses per flow level and can overflow the C stack before Python sees it.
        raise SpecError(f"{source} is nested deeper than {MAX_DEPTH} levels")
    try:
        if text.lstrip().startswith("{"):
            # JSON proper: PyYAML (YAML 1.1) would read 1e3 as a string.
            document = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
        else:
            # CSafeLoader when present; never the full loader (no arbitrary Python objects).
            _refuse_aliases(text, _YAML_LOADER, source)
            document = yaml.load(text, Loader=_UniqueKeyLoader)
    except _MergeKeyError as exc:
        raise SpecError(
            f"{source} uses a YAML merge key (<<) on line {exc.line}, which agov does not accept",
            hint="write the keys out",
        ) from None
    except (yaml.YAMLError, ValueError) as exc:
        # PyYAML names a parsed string "<unicode string>": name the user's file instead
        detail = str(exc).replace('"<unicode string>"', f'"{source}"')
        raise SpecError(f"{source} is not valid YAML or JSON: {detail}") from exc
    except RecursionError as exc:
        raise SpecError(f"{source} is nested too deeply") from exc
    if not isinstance(document, dict):
        raise SpecError(f"{source} must be a mapping with apiVersion, kind, metadata and spec")
    return document


_SHOWN_ERRORS = 10


_ONE_LINE = "^[^\\u0000-\\u001f\\u007f\\u2028\\u2029]+$"  # the schema's pattern for ids and names


def _is_one_line_rule(error: Any) -> bool:
    return bool(error.validator == "pattern" and error.validator_value == _ONE_LINE)


def _said(error: Any) -> str:
    """The schema error in words: a pattern is no explanation."""
    if _is_one_line_rule(error):
        return f"{error.instance!r} holds a control or line-breaking character"
    return str(error.message)


def _first_unjsonable(value: Any, path: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """Where the first value JSON cannot carry sits, as a field path, and what it is."""
    if isinstance(value, dict):
        for key, item in value.items():
            found = _first_unjsonable(item, (*path, str(key)))
            if found:
                return found
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _first_unjsonable(item, (*path, str(index)))
            if found:
                return found
        return None
    where = "/".join(path) or "(document)"
    if isinstance(value, float) and not math.isfinite(value):
        return where, f"{value} is not a finite number"
    if value is None or isinstance(value, str | int | float):
        return None
    return where, f"{type(value).__name__} {value!r}"


def validate_spec(document: Any) -> AgentSpec:
    """Validate a parsed document against the agent spec schema and compute its hash.

    Raises:
        SpecError: every schema violation (up to ``_SHOWN_ERRORS``), each with its field path
            and reason; ``path`` names the first.
    """
    if _depth(document, MAX_DEPTH) > MAX_DEPTH:
        raise SpecError(f"spec is nested deeper than {MAX_DEPTH} levels")
    # Round-trip through JSON so dates, YAML tags and tuples become plain JSON values or fail here.
    try:
        document = json.loads(json.dumps(document, allow_nan=False))
    except (TypeError, ValueError) as exc:
        field, what = _first_unjsonable(document) or ("", str(exc))
        raise SpecError(
            f"a value JSON cannot carry: {what}",
            path=field,
            hint="quote it to make it a string (YAML reads 2026-01-01 as a date), or use a finite number",
        ) from exc
    found = list(_validator().iter_errors(document))
    # an empty id or name also fails the one-line pattern: minLength says what is wrong
    too_short = {tuple(e.absolute_path) for e in found if e.validator == "minLength"}
    errors = sorted(
        (e for e in found if not (_is_one_line_rule(e) and tuple(e.absolute_path) in too_short)),
        key=lambda e: (list(e.absolute_path), e.message),
    )
    if errors:
        where = ["/".join(str(p) for p in e.absolute_path) or "(document)" for e in errors]
        said = [_said(e) for e in errors]
        others = [f"{w}: {m}" for w, m in zip(where[1:_SHOWN_ERRORS], said[1:_SHOWN_ERRORS], strict=True)]
        if len(errors) > _SHOWN_ERRORS:
            others.append(f"and {len(errors) - _SHOWN_ERRORS} more")
        also = "".join(f"\n  also {line}" for line in others)  # one fix-and-retry round, not ten
        raise SpecError(
            f"{said[0]}{also}",
            path=where[0],
            hint="start from a template (`agov agent templates`), or see the spec reference in agov's README",
        )
    canonical = canonical_json(document)
    return AgentSpec(document=document, canonical=canonical, hash=spec_hash(document))


def load_spec(raw: bytes, *, source: str = "spec", max_bytes: int = MAX_SPEC_BYTES) -> AgentSpec:
    """Parse and validate in one step.

    Raises:
        SpecError: see :func:`parse_spec_bytes` and :func:`validate_spec`.
    """
    return validate_spec(parse_spec_bytes(raw, source=source, max_bytes=max_bytes))


def spec_from_canonical(canonical: str | bytes) -> AgentSpec:
    """Rebuild an AgentSpec from the canonical JSON the store holds, hashing the stored bytes.

    The store only ever holds RFC 8785 output, so hashing its bytes gives the spec hash; any
    change to them, even one that keeps the meaning (whitespace, key order), changes the hash,
    which errs towards refusing.
    """
    raw = canonical.encode() if isinstance(canonical, str) else bytes(canonical)
    return AgentSpec(document=json.loads(raw), canonical=raw, hash=sha256_hex(raw))
