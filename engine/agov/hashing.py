"""Canonical JSON (RFC 8785) and SHA-256: the spec hash and the policy hash.

Pure functions over values and bytes, no I/O: the policy hash takes file contents, not paths
on disk, so the same content always gives the same hash wherever it lives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
import rfc8785

from agov.errors import SpecError


def canonical_json(value: Any) -> bytes:
    """Serialize ``value`` as RFC 8785 canonical JSON.

    Values whose RFC 8785 form is exactly what orjson writes with sorted keys (plain dicts with
    ASCII string keys, lists, strings, safe integers, floats printed without an exponent or a
    trailing ``.0``) take that C fast path; anything else goes through the reference encoder,
    which also raises for what JSON cannot carry. ``tests/unit/test_hashing.py`` checks the two
    agree.

    Raises:
        SpecError: the value holds something JSON cannot carry canonically (NaN, an integer
            beyond 2**53, a non-string key).
    """
    if _fast_path_safe(value):
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            pass  # a lone surrogate, say: the reference encoder gives the error
    try:
        return bytes(rfc8785.dumps(value))
    except (rfc8785.CanonicalizationError, TypeError, ValueError, RecursionError) as exc:
        raise SpecError(
            f"value cannot be canonicalized: {exc}",
            hint="use plain JSON values: strings, finite numbers, booleans, lists, maps",
        ) from exc


_SAFE_INT = 2**53 - 1
_MAX_FAST_NODES = 1_000_000


def _fast_path_safe(value: Any) -> bool:
    """Whether orjson's sorted output of ``value`` is byte for byte its RFC 8785 form.

    Exact types only (a str or int subclass, a tuple, takes the reference path). Keys must be
    ASCII, where code point order and RFC 8785's UTF-16 order agree.
    """
    pending = [value]
    budget = _MAX_FAST_NODES  # a cycle (a list that holds itself) must end, in the reference path
    while pending:
        budget -= 1
        if budget < 0:
            return False
        item = pending.pop()
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if kind is dict:
            for key in item:
                if type(key) is not str or not key.isascii():
                    return False
            pending.extend(item.values())
        elif kind is list:
            pending.extend(item)
        elif kind is int:
            if not -_SAFE_INT <= item <= _SAFE_INT:
                return False
        elif kind is float:
            text = repr(item)
            # ECMAScript prints 1.0 as 1 and has other exponent forms; orjson must match repr too
            if "e" in text or "n" in text or text.endswith(".0") or orjson.dumps(item) != text.encode():
                return False
        else:
            return False
    return True


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest(value: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of ``value``."""
    return sha256_hex(canonical_json(value))


def spec_hash(spec: Mapping[str, Any]) -> str:
    """The hash a proof binds to: SHA-256 over the RFC 8785 form of the whole spec document."""
    return digest(spec)


def policy_hash(files: Iterable[tuple[str, bytes]]) -> str:
    """Hash a bundle's content: (relative POSIX path, bytes) pairs, order-independent.

    Each file contributes ``path NUL sha256(content) LF`` in path order, so renaming a file, or
    changing any byte in it, changes the hash, and the order files are listed in does not.

    Raises:
        ValueError: two entries share one path.
    """
    entries = sorted(files)
    paths = [p for p, _ in entries]
    if len(paths) != len(set(paths)):
        raise ValueError("duplicate path in policy bundle content")
    h = hashlib.sha256(b"agov-policy-v1\n")
    for path, content in entries:
        h.update(path.encode() + b"\0" + hashlib.sha256(content).hexdigest().encode() + b"\n")
    return h.hexdigest()
