"""Admission at every start, fail-closed: the engine computes the facts, Rego decides.

Any error on the way (store, keys, OPA, a malformed answer) ends in a deny.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson

from agov.decisions import AdmissionDecision, Code, Reason, Status
from agov.errors import (
    AgovError,
    DecisionError,
    ExpiredProofError,
    NotFoundError,
    ProofError,
    RevokedSignerError,
    RollbackError,
)
from agov.opa.evaluator import EncodedInput, Evaluator
from agov.opa.http import require_bool
from agov.proofs import SignatureCache, TrustedKey, check_binding, check_not_rolled_back, verify_proof
from agov.registry import AgentRecord
from agov.store.sqlite import iso, parse_iso

ADMISSION_PATH = "agov/admission/decision"
# The codes whose reasons the engine's notes explain (which envelope check failed and why).
PROOF_CODES = frozenset(
    {
        Code.ADMISSION_DENY_PROOF_MISSING,
        Code.ADMISSION_DENY_SIGNATURE_INVALID,
        Code.ADMISSION_DENY_SIGNER_REVOKED,
        Code.ADMISSION_DENY_PROOF_EXPIRED,
        Code.ADMISSION_DENY_SPEC_HASH_MISMATCH,
        Code.ADMISSION_DENY_POLICY_HASH_MISMATCH,
    }
)
PROOF_FACTS = (
    "proof_present",
    "signature_valid",
    "signer_not_revoked",
    "proof_not_expired",
    "spec_hash_match",
    "policy_hash_match",
)


def sandbox_facts(agent: AgentRecord, now: datetime) -> dict[str, bool | None]:
    expires = parse_iso(agent.sandbox_expires_at)
    containment = agent.spec.containment
    return {
        "sandbox_not_expired": expires is not None and now < expires,
        "containment_valid": containment.get("external_calls") is False
        and containment.get("persistent_writes") is False,
    }


def proof_facts(
    agent: AgentRecord,
    proof_row: Any | None,
    newest_issued_at: datetime | None,
    key_for: Callable[[str], TrustedKey | None],
    active_policy_hash: str,
    now: datetime,
    *,
    max_proof_bytes: int,
    cache: SignatureCache | None = None,
) -> tuple[dict[str, bool | None], list[str]]:
    """The proof facts (pure apart from ``key_for``) and notes explaining any that failed.

    The facts are established in ``PROOF_FACTS`` order, and each is true only when it was
    positively established. Once one is false, the rest are unknown (the proof's claims are
    not read from an envelope that failed) and stay ``None``: a deny all the same, but not
    reported as a second failure.
    """
    facts: dict[str, bool | None] = dict.fromkeys(PROOF_FACTS)
    notes: list[str] = []
    if proof_row is None:
        facts["proof_present"] = False
        notes.append("no current proof on record")
        return facts, notes
    facts["proof_present"] = True
    stored = proof_row["envelope"]
    envelope = stored if isinstance(stored, bytes) else b""  # NULL: no envelope, so no signature
    keyid = proof_row["keyid"]
    key = key_for(keyid)
    trusted = {keyid: key} if key is not None else {}
    try:
        verified = verify_proof(envelope, trusted, now, max_size=max_proof_bytes, cache=cache)
    except RevokedSignerError as exc:
        facts["signature_valid"], facts["signer_not_revoked"] = True, False
        notes.append(str(exc))
        return facts, notes
    except ExpiredProofError as exc:
        facts["signature_valid"] = facts["signer_not_revoked"] = True
        facts["proof_not_expired"] = False
        notes.append(str(exc))
        return facts, notes
    except ProofError as exc:
        facts["signature_valid"] = False
        notes.append(str(exc))
        return facts, notes
    claims = verified.claims
    # A valid envelope that is not the one recorded for this row, or older than the newest proof
    # issued for this agent, is a replay: treat it as no valid signature for this agent.
    try:
        if newest_issued_at is not None:
            check_not_rolled_back(verified, newest_issued_at=newest_issued_at)
        if iso(claims.issued_at) != proof_row["issued_at"]:
            raise RollbackError("the proof's issue time differs from its record: replayed envelope")
    except RollbackError as exc:
        facts["signature_valid"] = False
        notes.append(str(exc))
        return facts, notes
    facts["signature_valid"] = facts["signer_not_revoked"] = facts["proof_not_expired"] = True
    mismatches = check_binding(
        verified,
        agent_id=agent.id,
        version=agent.version,
        spec_hash=agent.spec.hash,
        policy_hash=active_policy_hash,
    )
    if claims.governance_status != agent.status.value:  # the status row edited: it is not signed
        mismatches.append("governance_status")
    facts["spec_hash_match"] = not (
        {"agent_id", "version", "spec_hash", "governance_status"} & set(mismatches)
    )
    facts["policy_hash_match"] = "policy_hash" not in mismatches
    if set(mismatches) - {"policy_hash"}:
        notes.append(f"proof does not match the agent as it is now: {', '.join(sorted(mismatches))}")
    elif mismatches:  # the agent is as signed: only the policy changed since
        notes.append(
            f"the proof was issued under policy {claims.policy_hash[:12]}, "
            f"not under the active policy {active_policy_hash[:12]}"
        )
    return facts, notes


def decide(
    evaluator: Evaluator,
    agent: AgentRecord,
    facts: dict[str, bool | None],
    active_policy_hash: str,
    now: datetime,
) -> AdmissionDecision:
    """Ask ``agov.admission`` and check the answer's shape; any fault raises (and so denies).

    Raises:
        EngineUnavailableError: OPA could not answer.
        DecisionError: the answer is not a well-formed admission decision.
    """
    payload = {"agent_id": agent.id, "status": agent.status.value, "facts": facts, "now": iso(now)}
    # strings, booleans and null only, so orjson's bytes are plain JSON (its one liberty, NaN as null,
    # cannot arise); the stdlib encoder cost more than the rest of this function
    encoded = EncodedInput(orjson.dumps(payload))
    evaluation = evaluator.evaluate(ADMISSION_PATH, encoded, expected_revision=active_policy_hash)
    result = evaluation.result
    if not isinstance(result, dict):
        raise DecisionError(f"admission decision is not an object: {result!r}")
    allow = require_bool(result.get("allow"), "admission allow")
    code = result.get("code")
    raw_reasons = result.get("reasons")
    if not isinstance(code, str) or not isinstance(raw_reasons, list):
        raise DecisionError("admission decision lacks a code or reasons")
    reasons = tuple(_reason(r) for r in raw_reasons)
    if allow != (code == Code.ADMISSION_ALLOW) or (allow and reasons):
        raise DecisionError(f"inconsistent admission decision: allow={allow} code={code}")
    objection = _never_starts(agent, facts) if allow else None
    if objection:
        raise DecisionError(
            f"OPA allowed {agent.id}, but {objection}: agov does not start it whatever the policy"
            " says (is the sidecar serving agov's admission policy?)"
        )
    return AdmissionDecision(
        allow=allow,
        code=code,
        reasons=reasons,
        policy_hash=evaluation.revision,
        decision_id=evaluation.decision_id,
        agent_id=agent.id,
        facts=facts,
        status=agent.status.value if allow else None,  # what starts: nothing, on a deny
    )


# The facts an agent of each startable status must have established; any other status never starts.
_REQUIRED_FACTS = {
    Status.SANDBOX: ("sandbox_not_expired", "containment_valid"),
    Status.GOVERNED_VALID: PROOF_FACTS,
    Status.GOVERNED_RESTRICTED: PROOF_FACTS,
}


def _never_starts(agent: AgentRecord, facts: dict[str, bool | None]) -> str | None:
    """Why the engine refuses to start ``agent`` even on an allow, or None. The policy decides
    which starts to deny; these are the ones no policy may allow: an impostor or broken sidecar,
    or an edited admission policy, cannot start an invalidated or unproven agent."""
    required = _REQUIRED_FACTS.get(agent.status)
    if required is None:
        return f"its status is {agent.status.value}"
    unproven = [name for name in required if facts.get(name) is not True]
    return f"{', '.join(unproven)} {'is' if len(unproven) == 1 else 'are'} not true" if unproven else None


def _reason(raw: Any) -> Reason:
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("code"), str)
        or not isinstance(raw.get("message"), str)
    ):
        raise DecisionError(f"malformed reason in decision: {raw!r}")
    return Reason(raw["code"], raw["message"])


def deny_unavailable(agent_id: str, error: AgovError, policy_hash: str | None) -> AdmissionDecision:
    """The fail-closed answer when anything on the way broke."""
    return AdmissionDecision(
        allow=False,
        code=Code.ADMISSION_DENY_ENGINE_UNAVAILABLE,
        reasons=(Reason(Code.ADMISSION_DENY_ENGINE_UNAVAILABLE, error.in_one_line()),),
        policy_hash=policy_hash,
        agent_id=agent_id,
    )


def admit(
    agent_loader: Callable[[], AgentRecord],
    proof_loader: Callable[[str], tuple[Any | None, datetime | None]],
    key_for: Callable[[str], TrustedKey | None],
    active_hash_loader: Callable[[], str],
    evaluator_loader: Callable[[], Evaluator],
    now: datetime,
    *,
    max_proof_bytes: int,
    cache: SignatureCache | None = None,
    agent_id: str = "?",
) -> AdmissionDecision:
    """The whole admission: load, compute facts, decide; every error becomes a deny.

    ``agent_id`` is the id asked about: a deny names it even when the agent's row cannot be read.

    Raises:
        NotFoundError: the agent does not exist (bad input, not a decision).
    """
    active_hash: str | None = None
    try:
        agent = agent_loader()
        agent_id = agent.id
        active_hash = active_hash_loader()
        notes: list[str] = []
        if agent.status is Status.SANDBOX:
            facts: dict[str, bool | None] = sandbox_facts(agent, now)
        else:
            proof_row, newest = proof_loader(agent.id)
            facts, notes = proof_facts(
                agent,
                proof_row,
                newest,
                key_for,
                active_hash,
                now,
                max_proof_bytes=max_proof_bytes,
                cache=cache,
            )
        decision = decide(evaluator_loader(), agent, facts, active_hash, now)
        if notes and decision.code in PROOF_CODES:
            extra = tuple(Reason(decision.code, note) for note in notes)
            decision = dataclasses.replace(decision, reasons=decision.reasons + extra)
        return decision
    except NotFoundError:
        raise
    except AgovError as exc:
        return deny_unavailable(agent_id, exc, active_hash)
    except Exception as exc:
        return deny_unavailable(
            agent_id, AgovError(f"internal error: {type(exc).__name__}: {exc}"), active_hash
        )
