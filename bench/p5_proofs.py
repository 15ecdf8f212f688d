"""P5: proofs per agent: canonical spec hash + sign, and verify, against raw Ed25519.

agov side: ``agov.hashing.spec_hash`` + ``ProofClaims`` + ``agov.proofs.sign_proof`` (what
promotion and revalidation do per agent), and ``agov.proofs.verify_proof`` (what admission does
per start). Baseline in the same run, interleaved call by call: ``cryptography``'s Ed25519
sign and verify of exactly the bytes agov signs (the DSSE PAE of the same statement).

Goals: hash + sign p50 <= 100 µs; verify p50 <= 150 µs.

    python bench/p5_proofs.py [--quick] [--json out.json] [--profile]
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import _common as c
from agov import proofs
from agov.errors import ProofError
from agov.hashing import canonical_json, spec_hash
from agov.proofs import PAYLOAD_TYPE, ProofClaims, ProofSigner, sign_proof, statement, verify_proof

POLICY_HASH = hashlib.sha256(b"bench-policy").hexdigest()
INPUT_DIGEST = hashlib.sha256(b"bench-input").hexdigest()


def run(quick: bool, do_profile: bool) -> dict[str, Any]:
    n, warmup = (300, 50) if quick else (5000, 500)
    doc = c.research_agent("research-analyst-0001", 0.35)
    private = Ed25519PrivateKey.generate()
    signer = ProofSigner.ed25519(private)
    trusted = {signer.keyid: signer.trusted_key()}
    now = datetime.now(UTC)

    def claims_for(h: str) -> ProofClaims:
        return ProofClaims(
            agent_id="research-analyst-0001",
            version="1",
            spec_hash=h,
            policy_hash=POLICY_HASH,
            decision_id="5b0c2a4e-9d8f-4b6a-a1c3-0e2f4d6b8a9c",
            input_digest=INPUT_DIGEST,
            actor="agov-revalidation",
            role="system",
            governance_status="GOVERNED_VALID",
            issued_at=now,
            expires_at=None,
        )

    claims = claims_for(spec_hash(doc))
    envelope = sign_proof(claims, signer)
    # the exact bytes agov signs: the DSSE PAE over the canonical statement
    payload = canonical_json(statement(claims))
    pae = proofs.pae(PAYLOAD_TYPE, payload)
    sig = base64.b64decode(json.loads(envelope)["signatures"][0]["sig"])
    public = private.public_key()
    public.verify(sig, pae)  # sanity: the baseline verifies agov's own signature
    verify_proof(envelope, trusted, now)

    def agov_sign() -> bytes:
        return sign_proof(claims_for(spec_hash(doc)), signer)

    def raw_sign() -> bytes:
        return private.sign(pae)

    def agov_verify() -> Any:
        return verify_proof(envelope, trusted, now)

    def raw_verify() -> None:
        public.verify(sig, pae)

    subjects: dict[str, Callable[[], Any]] = {
        "agov hash + sign (spec_hash + ProofClaims + sign_proof)": agov_sign,
        "raw Ed25519 sign of the same PAE bytes": raw_sign,
        "agov verify_proof (no cache: the signature is checked)": agov_verify,
        "raw Ed25519 verify of the same PAE bytes": raw_verify,
    }
    cache_cls = getattr(proofs, "SignatureCache", None)
    if cache_cls is not None and "cache" in inspect.signature(verify_proof).parameters:
        cache = cache_cls()
        verify_proof(envelope, trusted, now, cache=cache)
        subjects["agov verify_proof, warm SignatureCache (admission's hit path)"] = lambda: verify_proof(
            envelope, trusted, now, cache=cache
        )
    c.collect()
    samples = c.interleave(subjects, n, warmup)
    metrics = [c.summarize(name, s) for name, s in samples.items()]
    by = {m["name"]: m for m in metrics}
    a_sign, r_sign = by[metrics[0]["name"]], by[metrics[1]["name"]]
    a_ver, r_ver = by[metrics[2]["name"]], by[metrics[3]["name"]]

    breakdown = _breakdown(doc, claims, signer, envelope, trusted, now, n=max(200, n // 4), warmup=warmup)
    result: dict[str, Any] = {
        "figure": "P5",
        "title": "proofs: canonical hash + sign, and verify, per agent",
        "quick": quick,
        "metrics": metrics,
        "ratios": [
            c.ratio("agov hash+sign / raw Ed25519 sign (p50)", a_sign["p50"] / r_sign["p50"]),
            c.ratio("agov verify / raw Ed25519 verify (p50)", a_ver["p50"] / r_ver["p50"]),
        ],
        "goals": [
            c.goal("hash + sign p50 <= 100 µs", a_sign["p50"], "<=", 100, "µs"),
            c.goal("verify p50 <= 150 µs", a_ver["p50"], "<=", 150, "µs"),
        ],
        "breakdown": breakdown,
        "sizes": {
            "spec_canonical_bytes": len(canonical_json(doc)),
            "statement_bytes": len(payload),
            "envelope_bytes": len(envelope),
        },
    }
    result["bound"] = bound(result)
    if do_profile:
        c.profile(agov_sign, 2000 if not quick else 200, label="spec_hash + sign_proof")
        c.profile(agov_verify, 2000 if not quick else 200, label="verify_proof")
    return result


def _breakdown(
    doc: dict[str, Any],
    claims: ProofClaims,
    signer: ProofSigner,
    envelope: bytes,
    trusted: dict[str, Any],
    now: datetime,
    *,
    n: int,
    warmup: int,
) -> list[dict[str, Any]]:
    """The stages of sign_proof and verify_proof, timed one by one (interleaved)."""
    payload = canonical_json(statement(claims))
    signed_bytes = proofs.pae(PAYLOAD_TYPE, payload)
    envelope_dict = json.loads(envelope)
    canonical_spec = canonical_json(doc)
    stages: dict[str, Callable[[], Any]] = {
        "sign: spec_hash (canonical JSON + SHA-256 of the spec)": lambda: spec_hash(doc),
        "sign: ProofClaims(...) (field checks)": lambda: ProofClaims(**_claim_fields(claims)),
        "sign: statement bytes (the template sign_proof fills)": lambda: proofs._statement_bytes(claims),
        "sign: Ed25519 over the PAE (ProofSigner)": lambda: signer._sign(signed_bytes),
        "sign: envelope bytes (base64 of the payload, the template)": lambda: proofs._ENVELOPE.render(
            base64.standard_b64encode(payload).decode("ascii"),
            envelope_dict["signatures"][0]["keyid"],
            envelope_dict["signatures"][0]["sig"],
        ),
        "reference: canonical_json(statement(claims)) (what the template replaced)": lambda: canonical_json(
            statement(claims)
        ),
        "reference: rfc8785.dumps of the spec (the pure-Python encoder, now the fallback)": lambda: (
            rfc8785.dumps(doc)
        ),
        "reference: SHA-256 of the canonical spec bytes": lambda: hashlib.sha256(canonical_spec).hexdigest(),
    }
    # verify_proof's stages use the module's private helpers; skip a stage if they were renamed
    try:
        loads, parse_envelope, parse_statement = (
            proofs._loads,
            proofs._parse_envelope,
            proofs._parse_statement,
        )
        env = parse_envelope(loads(envelope, "envelope"))
        key = next(iter(trusted.values()))
        stages.update(
            {
                "verify: _loads + _parse_envelope (JSON, base64)": lambda: parse_envelope(
                    loads(envelope, "envelope")
                ),
                "verify: PAE + Ed25519 (key parsed once)": lambda: proofs._signature_valid(
                    key,
                    bytes.fromhex(env.signatures[key.keyid].signature),
                    proofs.pae(PAYLOAD_TYPE, env.payload),
                ),
                "verify: _parse_statement (JSON + ProofClaims)": lambda: parse_statement(env.payload),
                "verify: SHA-256 of the envelope and of the payload (digests)": lambda: (
                    hashlib.sha256(envelope).hexdigest(),
                    hashlib.sha256(env.payload).hexdigest(),
                ),
            }
        )
    except (AttributeError, TypeError, ProofError) as exc:  # pragma: no cover - engine drift
        print(f"(verify breakdown skipped: {exc})", file=sys.stderr)
    c.collect()
    samples = c.interleave(stages, n, warmup)
    return [c.summarize(name, s) for name, s in samples.items()]


def _claim_fields(claims: ProofClaims) -> dict[str, Any]:
    return {name: getattr(claims, name) for name in ProofClaims.__dataclass_fields__}


def bound(result: dict[str, Any]) -> str:
    """What bounds the figure, in one sentence, from its result document."""
    stage = {b["name"].split(" (")[0]: b["p50"] for b in result["breakdown"]}
    m = {x["name"]: x["p50"] for x in result["metrics"]}
    names = list(m)
    sign = {k: v for k, v in stage.items() if k.startswith("sign:")}
    verify = {k: v for k, v in stage.items() if k.startswith("verify:")}
    canon = sum(v for k, v in sign.items() if "spec_hash" in k or "bytes" in k)
    crypto_sign = sum(v for k, v in sign.items() if "Ed25519" in k)
    crypto_verify = sum(v for k, v in verify.items() if "Ed25519" in k)
    text = (
        f"Both are bound by Ed25519 itself (OpenSSL through cryptography). Signing: in the breakdown pass "
        f"its stages sum to ~{sum(sign.values()):.0f} µs, of which the signature ~{crypto_sign:.0f} µs "
        f"(raw: {m[names[1]]:.0f} µs) and canonical JSON of the spec, the statement and the envelope "
        f"~{canon:.0f} µs (orjson with sorted keys where its bytes are the RFC 8785 bytes, and templates "
        f"made once by it for the statement and the envelope: canonical_json of the statement takes "
        f"~{stage.get('reference: canonical_json(statement(claims))', 0):.0f} µs; the pure-Python encoder "
        f"takes ~{stage.get('reference: rfc8785.dumps of the spec', 0):.0f} µs for the spec alone). "
        f"Verification: its stages sum to ~{sum(verify.values()):.0f} µs, of which Ed25519 "
        f"~{crypto_verify:.0f} µs (raw verify: {m[names[3]]:.0f} µs); the rest is JSON parsing with "
        f"duplicate-key checks and the ProofClaims checks"
    )
    if len(names) > 4:
        text += f". With admission's signature cache warm, verify_proof costs {m[names[4]]:.0f} µs"
    return text + ". Compare ratios within one pass: the passes ran at different loads."


def main(argv: list[str] | None = None) -> int:
    return c.main_for(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
