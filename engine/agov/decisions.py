"""Decision codes shared with the Rego policies, and the decision value types."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Code(StrEnum):
    """Stable codes: the CLI, the audit log, metrics and the Rego policies all use these."""

    ADMISSION_ALLOW = "ADMISSION_ALLOW"
    ADMISSION_DENY_PROOF_MISSING = "ADMISSION_DENY_PROOF_MISSING"
    ADMISSION_DENY_SPEC_HASH_MISMATCH = "ADMISSION_DENY_SPEC_HASH_MISMATCH"
    ADMISSION_DENY_POLICY_HASH_MISMATCH = "ADMISSION_DENY_POLICY_HASH_MISMATCH"
    ADMISSION_DENY_SIGNER_REVOKED = "ADMISSION_DENY_SIGNER_REVOKED"
    ADMISSION_DENY_SIGNATURE_INVALID = "ADMISSION_DENY_SIGNATURE_INVALID"
    ADMISSION_DENY_PROOF_EXPIRED = "ADMISSION_DENY_PROOF_EXPIRED"
    ADMISSION_DENY_SANDBOX_EXPIRED = "ADMISSION_DENY_SANDBOX_EXPIRED"
    ADMISSION_DENY_CONTAINMENT_VIOLATION = "ADMISSION_DENY_CONTAINMENT_VIOLATION"
    ADMISSION_DENY_INVALIDATED = "ADMISSION_DENY_INVALIDATED"
    ADMISSION_DENY_INPUT_INVALID = "ADMISSION_DENY_INPUT_INVALID"
    ADMISSION_DENY_ENGINE_UNAVAILABLE = "ADMISSION_DENY_ENGINE_UNAVAILABLE"
    PROMOTION_ATTEMPT = "PROMOTION_ATTEMPT"
    PROMOTION_DENIED = "PROMOTION_DENIED"
    PROMOTION_SUCCESS = "PROMOTION_SUCCESS"
    POLICY_BUILT = "POLICY_BUILT"
    POLICY_HOTRELOAD = "POLICY_HOTRELOAD"
    POLICY_RELOAD_REFUSED = "POLICY_RELOAD_REFUSED"
    POLICY_REVALIDATION = "POLICY_REVALIDATION"
    REVALIDATION_STARTED = "REVALIDATION_STARTED"
    POLICY_ROLLBACK = "POLICY_ROLLBACK"
    ORG_LIMITS_CHANGED = "ORG_LIMITS_CHANGED"
    AGENT_CREATED = "AGENT_CREATED"
    AGENT_UPDATED = "AGENT_UPDATED"
    AGENT_INVALIDATED = "AGENT_INVALIDATED"
    AGENT_RESTORED = "AGENT_RESTORED"
    PROOFS_RENEWED = "PROOFS_RENEWED"
    KEY_GENERATED = "KEY_GENERATED"
    KEY_REVOKED = "KEY_REVOKED"
    WORKSPACE_INIT = "WORKSPACE_INIT"
    REQUEST_REJECTED = "REQUEST_REJECTED"


class Status(StrEnum):
    """Governance status of an agent."""

    SANDBOX = "SANDBOX"
    GOVERNED_VALID = "GOVERNED_VALID"
    GOVERNED_RESTRICTED = "GOVERNED_RESTRICTED"
    GOVERNED_INVALIDATED = "GOVERNED_INVALIDATED"


GOVERNED = frozenset({Status.GOVERNED_VALID, Status.GOVERNED_RESTRICTED, Status.GOVERNED_INVALIDATED})


@dataclass(frozen=True)
class Reason:
    """One `{code, message}` entry from a policy's deny or warn set."""

    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class Evaluation:
    """What OPA answered for one query, with the provenance that ties it to a policy hash."""

    result: Any
    revision: str
    decision_id: str | None = None


@dataclass(frozen=True)
class PolicyVerdict:
    """A promotion or revalidation verdict: allowed, with its deny and warn reasons."""

    allow: bool
    deny: tuple[Reason, ...] = ()
    warn: tuple[Reason, ...] = ()

    @property
    def status(self) -> Status:
        """The governance status this verdict earns (invalidated when denied)."""
        if not self.allow:
            return Status.GOVERNED_INVALIDATED
        return Status.GOVERNED_RESTRICTED if self.warn else Status.GOVERNED_VALID


@dataclass(frozen=True)
class AdmissionDecision:
    """The answer to `agov admit`: allow or deny, with the code that names why."""

    allow: bool
    code: str
    reasons: tuple[Reason, ...] = ()
    policy_hash: str | None = None
    decision_id: str | None = None
    agent_id: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    # how an admitted agent runs (SANDBOX, GOVERNED_RESTRICTED, GOVERNED_VALID); None on a deny
    status: str | None = None

    @property
    def decision(self) -> str:
        return "allow" if self.allow else "deny"

    def as_dict(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "decision": self.decision,
            "allow": self.allow,
            "code": self.code,
            "reasons": [r.as_dict() for r in self.reasons],
            "policy_hash": self.policy_hash,
            "decision_id": self.decision_id,
            "status": self.status,
        }


def parse_reasons(raw: Any, what: str) -> tuple[Reason, ...]:
    """Reasons from a policy answer, sorted by code then message (Rego sets arrive unordered).

    Raises:
        DecisionError: not a list of ``{code, message}`` strings.
    """
    from agov.errors import DecisionError

    if not isinstance(raw, list):
        raise DecisionError(f"{what} is not a list: {raw!r}")
    reasons = []
    for item in raw:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("code"), str)
            or not isinstance(item.get("message"), str)
        ):
            raise DecisionError(f"malformed entry in {what}: {item!r}")
        reasons.append(Reason(item["code"], item["message"]))
    return tuple(sorted(reasons, key=lambda r: (r.code, r.message)))


def parse_verdict(raw: Any, what: str) -> PolicyVerdict:
    """A ``{allow, deny, warn}`` answer, checked strictly: allow must be a real boolean, and an
    allow with deny reasons is contradictory (both fail closed).

    Raises:
        DecisionError: the answer does not have that shape.
    """
    from agov.errors import DecisionError

    if raw is None:  # no key in the results, or JSON null: undefined for this agent
        raise DecisionError(f"{what}: the policy gave no result (undefined), which fails closed")
    if not isinstance(raw, dict):
        raise DecisionError(f"{what} is not an object: {raw!r}")
    allow = raw.get("allow")
    if not isinstance(allow, bool):
        raise DecisionError(f"{what}.allow is {allow!r}, not a boolean: failing closed")
    deny = parse_reasons(raw.get("deny"), f"{what}.deny")
    warn = parse_reasons(raw.get("warn", []), f"{what}.warn")
    if allow and deny:
        raise DecisionError(f"{what} allows with deny reasons: failing closed")
    if not allow and not deny:
        raise DecisionError(f"{what} denies without a reason")
    return PolicyVerdict(allow=allow, deny=deny, warn=warn)
