"""The port the service layer evaluates policy through, and the limits every adapter obeys."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from agov.config import MAX_TIMEOUT_S
from agov.decisions import Evaluation

_BUNDLE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class EvaluatorConfig:
    """Limits for talking to OPA.

    Attributes:
        timeout_s: Hard deadline for one evaluation, from the call to the last body byte
            (connect, send, wait and read together, not per socket operation).
        max_response_bytes: A larger response is refused before it is parsed.
        max_request_bytes: A larger serialized input is refused before it is sent.
        pool_size: Keep-alive connections kept idle for reuse.
        bundle_name: The bundle whose revision every answer must carry (``provenance``).
    """

    timeout_s: float = 2.0
    max_response_bytes: int = 8 * 1024 * 1024
    max_request_bytes: int = 8 * 1024 * 1024
    pool_size: int = 4
    bundle_name: str = "agov"

    def __post_init__(self) -> None:
        if not 0 < self.timeout_s <= MAX_TIMEOUT_S:
            raise ValueError(f"timeout_s must be in (0, {MAX_TIMEOUT_S:g}], got {self.timeout_s}")
        if self.max_response_bytes <= 0 or self.max_request_bytes <= 0:
            raise ValueError("max_response_bytes and max_request_bytes must be positive")
        if not 1 <= self.pool_size <= 256:
            raise ValueError(f"pool_size must be in [1, 256], got {self.pool_size}")
        if not _BUNDLE_NAME_RE.fullmatch(self.bundle_name):
            raise ValueError(f"bundle_name {self.bundle_name!r} must match [A-Za-z0-9_.-]{{1,64}}")


@dataclass(frozen=True)
class EncodedInput:
    """An input document already serialized as UTF-8 JSON, sent to OPA as it is.

    For a caller that holds the bytes already: revalidation assembles a chunk of a thousand
    agents from the canonical spec bytes the store keeps, instead of parsing each spec only to
    encode it again. The caller vouches that ``json`` is one JSON object; OPA answers anything
    else with an error, which fails closed like any other.
    """

    json: bytes


@runtime_checkable
class Evaluator(Protocol):
    """Something that answers policy queries, tied to the revision of the bundle that answered.

    Every method fails closed: a fault raises ``EngineUnavailableError`` (OPA unreachable,
    slow or broken) or ``DecisionError`` (OPA answered, but not usably). None of them ever
    returns a default.
    """

    def evaluate(
        self,
        path: str,
        input: Mapping[str, Any] | EncodedInput,
        *,
        expected_revision: str | None = None,
        timeout_s: float | None = None,
    ) -> Evaluation:
        """Evaluate ``data.<path>`` (``path`` like ``"agov/admission/decision"``) for ``input``.

        Args:
            path: Slash-separated rule path below ``data``.
            input: The input document (must serialize to JSON), or its JSON bytes.
            expected_revision: When given, an answer from any other bundle revision is refused.
            timeout_s: This call's deadline, for work larger than one decision (a revalidation
                chunk); ``EvaluatorConfig.timeout_s`` when not given.

        Returns:
            The result, the bundle revision that produced it and OPA's decision id.

        Raises:
            EngineUnavailableError: OPA could not be reached or did not answer in time.
            DecisionError: The answer was unusable: undefined, malformed, too large, or from
                another revision.
        """
        ...

    def health(self) -> None:
        """Check that OPA is up and has activated its bundles.

        Raises:
            EngineUnavailableError: It is not.
        """
        ...

    def revision(self) -> str | None:
        """The revision of the active bundle, or None while no bundle is active.

        Raises:
            EngineUnavailableError: OPA could not be asked.
            DecisionError: OPA's answer was malformed.
        """
        ...

    def close(self) -> None:
        """Release connections (and, for a managed sidecar, the OPA process). Idempotent."""
        ...
