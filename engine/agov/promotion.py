"""Promotion: ask ``agov.promotion``; on allow sign a proof and govern the agent.

On deny (including a fail-closed deny) nothing changes but the audit events
``PROMOTION_ATTEMPT`` and ``PROMOTION_DENIED``. A promotion refused as a request (the version
is already promoted, or a concurrent change won) leaves one ``REQUEST_REJECTED``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from agov.config import Config
from agov.decisions import Code, PolicyVerdict, Reason, Status, parse_verdict
from agov.errors import AgovError, UsageError
from agov.hashing import digest
from agov.opa.evaluator import Evaluator
from agov.proofs import ProofClaims, ProofSeal, ProofSigner, sign_proof
from agov.registry import AgentRecord
from agov.store import Store
from agov.store.sqlite import Tx, iso, parse_iso

PROMOTION_PATH = "agov/promotion/decision"
PROMOTION_DENY_ENGINE_UNAVAILABLE = "PROMOTION_DENY_ENGINE_UNAVAILABLE"
NO_DECISION_ID = "not-logged"


@dataclass(frozen=True)
class PromotionResult:
    agent_id: str
    allow: bool
    status: str
    deny: tuple[Reason, ...]
    warn: tuple[Reason, ...]
    policy_hash: str | None
    decision_id: str | None
    proof_keyid: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "decision": "allow" if self.allow else "deny",
            "allow": self.allow,
            "status": self.status,
            "deny": [r.as_dict() for r in self.deny],
            "warn": [r.as_dict() for r in self.warn],
            "policy_hash": self.policy_hash,
            "decision_id": self.decision_id,
            "proof_keyid": self.proof_keyid,
        }


def promotion_input(
    agent: AgentRecord, config: Config, *, actor: str, role: str, policy_hash: str, now: datetime
) -> dict[str, Any]:
    return {
        "agent": agent.spec.document,
        "actor": {"id": actor, "role": role},
        "org": asdict(config.org),
        "policy_hash": policy_hash,
        "now": iso(now),
    }


@dataclass(frozen=True)
class ProofTarget:
    """What a proof is issued for: one agent version as read, with its optimistic-lock counter."""

    agent_id: str
    version: int
    spec_hash: str
    row_version: int


@dataclass(frozen=True)
class SignedProof:
    """A proof signed for one target, with the row values that govern the agent by it."""

    target: ProofTarget
    status: Status
    reasons_json: str
    envelope: bytes
    keyid: str
    policy_hash: str
    issued_at: str
    expires_at: str | None
    seal: str  # ProofSeal over the row's columns: revalidation renews only sealed rows unverified


def sign_for(
    agent: ProofTarget,
    verdict: PolicyVerdict,
    signer: ProofSigner,
    seal: ProofSeal,
    *,
    policy_hash: str,
    decision_id: str | None,
    input_digest: str,
    actor: str,
    role: str,
    now: datetime,
    expires_at: datetime | None,
) -> SignedProof:
    """Sign the proof an allowing verdict earns, valid until ``expires_at`` (None: no expiry);
    nothing is written yet."""
    status = verdict.status
    claims = ProofClaims(
        agent_id=agent.agent_id,
        version=str(agent.version),
        spec_hash=agent.spec_hash,
        policy_hash=policy_hash,
        # OPA names a decision only when decision logging is on (an external sidecar may not).
        decision_id=decision_id or NO_DECISION_ID,
        input_digest=input_digest,
        actor=actor,
        role=role,
        governance_status=status.value,
        issued_at=now,
        expires_at=expires_at,
    )
    issued_at = iso(now)
    assert issued_at is not None
    envelope = sign_proof(claims, signer)
    expiry = iso(expires_at)
    return SignedProof(
        agent,
        status,
        _reasons_json(verdict.warn),
        envelope,
        signer.keyid,
        policy_hash,
        issued_at,
        expiry,
        seal.seal(
            agent_id=agent.agent_id,
            version=agent.version,
            policy_hash=policy_hash,
            spec_hash=agent.spec_hash,
            keyid=signer.keyid,
            governance_status=status.value,
            issued_at=issued_at,
            expires_at=expiry,
        ),
    )


def store_proofs(tx: Tx, proofs: list[SignedProof]) -> None:
    """Govern each agent by its new proof and supersede the old one, in batches of statements.

    All or nothing: if any agent changed since it was read, nothing is written.

    Raises:
        UsageError: an agent changed since it was read (another promotion or update won).
    """
    if not proofs:
        return
    changed = tx.executemany(
        "UPDATE agents SET status = ?, reasons = ?, sandbox_expires_at = NULL, row_version = row_version + 1,"
        " updated_at = ? WHERE id = ? AND row_version = ? AND current_version = ?",
        [
            (
                p.status.value,
                p.reasons_json,
                p.issued_at,
                p.target.agent_id,
                p.target.row_version,
                p.target.version,
            )
            for p in proofs
        ],
    ).rowcount
    if changed != len(proofs):
        # a batch is all or nothing: the caller's transaction rolls back the rows that did match
        raise UsageError(
            f"{len(proofs) - changed} of {len(proofs)} agents changed while their proofs were being issued",
            hint="read them again and retry",
        )
    tx.executemany(
        "UPDATE agent_proofs SET superseded_at = ? WHERE agent_id = ? AND superseded_at IS NULL",
        [(p.issued_at, p.target.agent_id) for p in proofs],
    )
    tx.executemany(
        "INSERT INTO agent_proofs (agent_id, version, policy_hash, spec_hash, envelope, keyid, governance_status,"
        " issued_at, expires_at, seal) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                p.target.agent_id,
                p.target.version,
                p.policy_hash,
                p.target.spec_hash,
                p.envelope,
                p.keyid,
                p.status.value,
                p.issued_at,
                p.expires_at,
                p.seal,
            )
            for p in proofs
        ],
    )


def _reasons_json(reasons: tuple[Reason, ...]) -> str:
    return json.dumps([r.as_dict() for r in reasons]) if reasons else "[]"


def _holds_a_live_proof(store: Store, agent: AgentRecord, policy_hash: str, now: datetime) -> bool:
    """Governed, with a current proof for this version and policy that has not expired and whose
    signer is not revoked. A proof admission refuses as expired or revoked is renewed by promoting
    again (its deny says so), not refused as a duplicate."""
    if agent.status not in (Status.GOVERNED_VALID, Status.GOVERNED_RESTRICTED):
        return False
    row = store.query_one(
        "SELECT p.expires_at, k.revoked_at FROM agent_proofs p LEFT JOIN signing_keys k ON k.keyid = p.keyid"
        " WHERE p.agent_id = ? AND p.version = ? AND p.policy_hash = ? AND p.superseded_at IS NULL",
        (agent.id, agent.version, policy_hash),
    )
    if row is None:
        return False
    try:
        expires_at, revoked_at = parse_iso(row["expires_at"]), parse_iso(row["revoked_at"])
        return (expires_at is None or now < expires_at) and (revoked_at is None or now < revoked_at)
    except (TypeError, ValueError):  # a time no agov wrote: not a proof to keep; OPA judges anew
        return False


def promote(
    store: Store,
    config_loader: Callable[[], Config],
    agent: AgentRecord,
    evaluator_loader: Callable[[], Evaluator],
    signer_loader: Callable[[], ProofSigner],
    seal_loader: Callable[[], ProofSeal],
    *,
    actor: str,
    role: str,
    policy_hash: str,
    now: datetime,
) -> PromotionResult:
    """Evaluate and, on allow, govern the agent. Every error ends in a deny that is audited,
    also one reading the config (its org limits and proof lifetime) through ``config_loader``.

    Raises:
        UsageError: the version is already governed under this policy, or a concurrent
            promotion or update of the same agent won (nothing written by this one but its
            audit events).
    """
    decision_id: str | None = None
    if _holds_a_live_proof(store, agent, policy_hash, now):
        # One winner per version and policy: a second promotion would only mint a duplicate proof.
        store.record_rejection(
            Code.REQUEST_REJECTED,
            agent_id=agent.id,
            actor=actor,
            policy_hash=policy_hash,
            payload={"operation": "promote", "reason": "already promoted", "version": agent.version},
            now=now,
        )
        raise UsageError(
            f"agent {agent.id!r} version {agent.version} is already {agent.status.value} under this policy",
            hint="update the agent to promote a new version",
        )
    config: Config | None = None
    try:
        config = config_loader()
        payload = promotion_input(agent, config, actor=actor, role=role, policy_hash=policy_hash, now=now)
        evaluation = evaluator_loader().evaluate(PROMOTION_PATH, payload, expected_revision=policy_hash)
        decision_id = evaluation.decision_id
        verdict = parse_verdict(evaluation.result, "promotion decision")
        signer: ProofSigner | None = signer_loader() if verdict.allow else None
        seal = seal_loader() if verdict.allow else None
    except AgovError as exc:
        verdict = PolicyVerdict(False, (Reason(PROMOTION_DENY_ENGINE_UNAVAILABLE, exc.in_one_line()),))
        signer = seal = None
    except Exception as exc:  # fail closed on anything unforeseen, and say what it was
        message = f"internal error: {type(exc).__name__}: {exc}"
        verdict = PolicyVerdict(False, (Reason(PROMOTION_DENY_ENGINE_UNAVAILABLE, message),))
        signer = seal = None
    fields: dict[str, Any] = {"agent_id": agent.id, "actor": actor, "policy_hash": policy_hash, "now": now}

    def denied(deny: PolicyVerdict) -> PromotionResult:
        with store.transaction() as tx:
            tx.audit(Code.PROMOTION_ATTEMPT, payload={"role": role, "version": agent.version}, **fields)
            tx.audit(
                Code.PROMOTION_DENIED,
                payload={"decision_id": decision_id, "deny": [r.as_dict() for r in deny.deny]},
                **fields,
            )
        return PromotionResult(
            agent.id, False, agent.status.value, deny.deny, deny.warn, policy_hash, decision_id
        )

    if not verdict.allow or signer is None or seal is None or config is None:
        return denied(verdict)
    try:
        with store.transaction() as tx:
            tx.audit(Code.PROMOTION_ATTEMPT, payload={"role": role, "version": agent.version}, **fields)
            target = ProofTarget(agent.id, agent.version, agent.spec.hash, agent.row_version)
            signed = sign_for(
                target,
                verdict,
                signer,
                seal,
                policy_hash=policy_hash,
                decision_id=decision_id,
                input_digest=digest(payload),
                actor=actor,
                role=role,
                now=now,
                expires_at=None
                if config.proof_ttl_days is None
                else now + timedelta(days=config.proof_ttl_days),
            )
            active = tx.execute("SELECT hash FROM policy_versions WHERE active = 1").fetchone()
            if active is None or active[0] != policy_hash:
                # a reload or rollback committed since the verdict: its revalidation skips agents
                # written after it read them, so a proof bound to the old policy would stay unjudged
                raise UsageError(
                    f"the active policy changed while agent {agent.id!r} was being promoted",
                    hint="promote it again: the policy now active judges it",
                )
            try:
                store_proofs(tx, [signed])
            except UsageError:
                raise UsageError(
                    f"agent {agent.id!r} changed while it was being promoted", hint="read it again and retry"
                ) from None
            tx.audit(
                Code.PROMOTION_SUCCESS,
                payload={
                    "decision_id": decision_id,
                    "status": verdict.status.value,
                    "version": agent.version,
                    "keyid": signer.keyid,
                    "warn": [r.as_dict() for r in verdict.warn],
                },
                **fields,
            )
    except UsageError as exc:
        # lost to a concurrent change: a refused request, as "already promoted" is, not a deny by
        # policy (the policy allowed; the attempt's own audit rolled back with its transaction)
        store.record_rejection(
            Code.REQUEST_REJECTED,
            payload={
                "operation": "promote",
                "reason": "concurrent change",
                "message": exc.message,
                "role": role,
                "version": agent.version,
                "decision_id": decision_id,
            },
            **fields,
        )
        raise
    except Exception as exc:  # signing or storing failed after OPA allowed: rolled back, a deny
        message = (
            exc.in_one_line()
            if isinstance(exc, AgovError)
            else f"internal error: {type(exc).__name__}: {exc}"
        )
        try:
            return denied(PolicyVerdict(False, (Reason(PROMOTION_DENY_ENGINE_UNAVAILABLE, message),)))
        except AgovError:  # the store takes no audit row either (say an unreadable anchor)
            raise exc from None
    return PromotionResult(
        agent.id, True, verdict.status.value, (), verdict.warn, policy_hash, decision_id, signer.keyid
    )
