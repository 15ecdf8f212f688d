"""admission.proof_facts: a fact is true only once established, and once one is false the
facts after it are unknown (None), never reported false as if each had been checked. (The two
hash facts are both read from a proof that verified, so each is established on its own.)

No OPA and no store: a signed envelope, a trusted key and a proof row as the store holds them.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agov.admission import PROOF_FACTS, decide, proof_facts
from agov.decisions import Evaluation, Status
from agov.errors import DecisionError
from agov.proofs import ProofClaims, ProofSigner, TrustedKey, sign_proof
from agov.store.sqlite import iso

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
SPEC = hashlib.sha256(b"spec").hexdigest()
POLICY = hashlib.sha256(b"policy").hexdigest()
SIGNER = ProofSigner.ed25519(Ed25519PrivateKey.generate())
AGENT: Any = SimpleNamespace(
    id="invoice-triage", version=3, spec=SimpleNamespace(hash=SPEC), status=Status.GOVERNED_VALID
)


def claims(**overrides: Any) -> ProofClaims:
    values: dict[str, Any] = {
        "agent_id": AGENT.id,
        "version": "3",
        "spec_hash": SPEC,
        "policy_hash": POLICY,
        "decision_id": "d-1",
        "input_digest": hashlib.sha256(b"input").hexdigest(),
        "actor": "alice",
        "role": "agent_admin",
        "governance_status": "GOVERNED_VALID",
        "issued_at": T0,
        "expires_at": T0 + timedelta(days=30),
    }
    values.update(overrides)
    return ProofClaims(**values)


def row(proof: ProofClaims, envelope: bytes | None = None) -> dict[str, Any]:
    return {
        "envelope": envelope if envelope is not None else sign_proof(proof, SIGNER),
        "keyid": SIGNER.keyid,
        "issued_at": iso(proof.issued_at),
    }


def facts(
    proof_row: dict[str, Any] | None,
    *,
    key: TrustedKey | None = None,
    known: bool = True,
    now: datetime = T0 + timedelta(days=1),
    newest: datetime | None = None,
) -> list[bool | None]:
    trusted = (key or SIGNER.trusted_key()) if known else None
    got, notes = proof_facts(
        AGENT, proof_row, newest, lambda _keyid: trusted, POLICY, now, max_proof_bytes=64 * 1024
    )
    assert list(got) == list(PROOF_FACTS)
    assert notes or all(got.values()), "a fact that fails comes with a note saying why"
    return list(got.values())


# proof_present, signature_valid, signer_not_revoked, proof_not_expired, spec_hash_match, policy_hash_match
CASES: dict[str, tuple[Any, list[bool | None]]] = {
    "genuine": (lambda: facts(row(claims())), [True, True, True, True, True, True]),
    "no proof": (lambda: facts(None), [False, None, None, None, None, None]),
    "garbage envelope": (
        lambda: facts(row(claims(), b"not a DSSE envelope")),
        [True, False, None, None, None, None],
    ),
    "unknown key": (lambda: facts(row(claims()), known=False), [True, False, None, None, None, None]),
    "revoked signer": (
        lambda: facts(row(claims()), key=SIGNER.trusted_key(revoked_at=T0)),
        [True, True, False, None, None, None],
    ),
    "expired": (
        lambda: facts(row(claims()), now=T0 + timedelta(days=31)),
        [True, True, True, False, None, None],
    ),
    "an older proof replayed": (
        lambda: facts(row(claims()), newest=T0 + timedelta(hours=1)),
        [True, False, None, None, None, None],
    ),
    "another spec": (lambda: facts(row(claims(spec_hash="0" * 64))), [True, True, True, True, False, True]),
    "another policy": (
        lambda: facts(row(claims(policy_hash="0" * 64))),
        [True, True, True, True, True, False],
    ),
    "both hashes": (
        lambda: facts(row(claims(spec_hash="0" * 64, policy_hash="0" * 64))),
        [True, True, True, True, False, False],
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_each_fact_is_established_in_order_or_left_unknown(case: str) -> None:
    compute, want = CASES[case]
    assert compute() == want


def _notes(proof: ProofClaims) -> list[str]:
    _facts, notes = proof_facts(
        AGENT, row(proof), None, lambda _keyid: SIGNER.trusted_key(), POLICY, T0, max_proof_bytes=64 * 1024
    )
    return notes


def test_a_proof_under_an_earlier_policy_is_said_to_be_so_not_to_mismatch_the_agent() -> None:
    """Every start between a policy change and the run's renewal of the agent's proof meets this
    deny: its note must not read as a tampered agent."""
    earlier = "e" * 64
    assert _notes(claims(policy_hash=earlier)) == [
        f"the proof was issued under policy {earlier[:12]}, not under the active policy {POLICY[:12]}"
    ]
    assert _notes(claims(spec_hash="0" * 64, policy_hash=earlier)) == [
        "proof does not match the agent as it is now: policy_hash, spec_hash"
    ]
    assert _notes(claims()) == []


class _Answers:
    """An OPA that answers every admission with ``result`` (a sidecar that is not agov's, or an
    admission policy edited to allow too much). A unit fake: the real sidecar is not asked."""

    def __init__(self, result: dict[str, Any]) -> None:
        self.result = result

    def evaluate(self, path: str, payload: Any, **_: Any) -> Evaluation:
        return Evaluation(result=self.result, revision="policy-1", decision_id="d-1")


ALLOW = {"allow": True, "code": "ADMISSION_ALLOW", "reasons": []}
ALL_PROVEN = dict.fromkeys(PROOF_FACTS, True)


@pytest.mark.parametrize(
    ("status", "fact_values", "objection"),
    [
        ("GOVERNED_INVALIDATED", ALL_PROVEN, "its status is GOVERNED_INVALIDATED"),
        ("GOVERNED_VALID", {**ALL_PROVEN, "proof_present": False}, "proof_present is not true"),
        (
            "GOVERNED_RESTRICTED",
            {**ALL_PROVEN, "signature_valid": None, "spec_hash_match": False},
            "signature_valid, spec_hash_match are not true",
        ),
        (
            "SANDBOX",
            {"sandbox_not_expired": False, "containment_valid": True},
            "sandbox_not_expired is not true",
        ),
    ],
)
def test_an_allow_the_facts_do_not_support_is_a_deny(
    status: str, fact_values: dict[str, bool | None], objection: str
) -> None:
    """Before: any well-formed allow was taken, so an impostor sidecar (or an admission policy
    edited to allow everything) started an invalidated agent with exit 0."""
    agent: Any = SimpleNamespace(id="invoice-triage", status=Status(status))
    with pytest.raises(
        DecisionError, match=f"OPA allowed invoice-triage, but {objection}: agov does not start"
    ):
        decide(_Answers(ALLOW), agent, fact_values, "policy-1", T0)


@pytest.mark.parametrize(
    ("status", "fact_values"),
    [
        ("GOVERNED_VALID", ALL_PROVEN),
        ("GOVERNED_RESTRICTED", ALL_PROVEN),
        ("SANDBOX", {"sandbox_not_expired": True, "containment_valid": True}),
    ],
)
def test_an_allow_the_facts_support_starts_the_agent_under_its_status(
    status: str, fact_values: dict[str, bool | None]
) -> None:
    agent: Any = SimpleNamespace(id="invoice-triage", status=Status(status))
    decision = decide(_Answers(ALLOW), agent, fact_values, "policy-1", T0)
    assert (decision.allow, decision.status) == (True, status)
    denied = {"allow": False, "code": "ADMISSION_DENY_PROOF_MISSING", "reasons": []}
    assert decide(_Answers(denied), agent, fact_values, "policy-1", T0).allow is False, "a deny stays one"


def test_a_status_row_the_proof_does_not_sign_is_not_the_agent_as_it_is_now() -> None:
    """Before: the agents row, edited from GOVERNED_RESTRICTED to GOVERNED_VALID outside agov,
    passed every fact, and the start was allowed under the unsigned status, unrestricted."""
    restricted = row(claims(governance_status="GOVERNED_RESTRICTED"))

    def facts_of(agent: Any) -> tuple[dict[str, bool | None], list[str]]:
        trusted = SIGNER.trusted_key()
        return proof_facts(
            agent, restricted, None, lambda _k: trusted, POLICY, T0 + timedelta(days=1), max_proof_bytes=65536
        )

    got, notes = facts_of(AGENT)  # the row says GOVERNED_VALID
    assert got["spec_hash_match"] is False and got["policy_hash_match"] is True
    assert notes == ["proof does not match the agent as it is now: governance_status"]
    got, notes = facts_of(SimpleNamespace(**{**vars(AGENT), "status": Status.GOVERNED_RESTRICTED}))
    assert all(got[name] is True for name in PROOF_FACTS) and notes == []
