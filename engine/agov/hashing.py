"""Canonical JSON (RFC 8785) and SHA-256: the spec hash and the policy hash.

Pure functions over values and bytes, no I/O: the policy hash takes file contents, not paths
on disk, so the same content always gives the same hash wherever it lives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import rfc8785

from agov.errors import SpecError


def canonical_json(value: Any) -> bytes:
    """Serialize ``value`` as RFC 8785 canonical JSON.

    Raises:
        SpecError: the value holds something JSON cannot carry canonically (NaN, an integer
            beyond 2**53, a non-string key).
    """
    try:
        return bytes(rfc8785.dumps(value))
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise SpecError(
            f"value cannot be canonicalized: {exc}",
            hint="use plain JSON values: strings, finite numbers, booleans, lists, maps",
        ) from exc


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
