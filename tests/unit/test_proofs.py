"""Proof bundles: DSSE PAE conformance, round trips, and the R2-R8 attack rows.

Every row prints its figure and asserts it. No OPA, no files: keys are generated here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from securesystemslib.dsse import Envelope

from agov import proofs
from agov.decisions import Status
from agov.errors import (
    ExpiredProofError,
    KeyMaterialError,
    ProofError,
    RevokedSignerError,
    RollbackError,
    SignatureError,
    SpecError,
)
from agov.hashing import canonical_json
from agov.proofs import (
    PAYLOAD_TYPE,
    ProofClaims,
    ProofSigner,
    SignatureCache,
    TrustedKey,
    VerifiedProof,
    check_binding,
    check_not_rolled_back,
    pae,
    sign_proof,
    statement,
    verify_proof,
)

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
SEC = timedelta(seconds=1)

# --- helpers ----------------------------------------------------------------------------------


def make_claims(**overrides: Any) -> ProofClaims:
    values: dict[str, Any] = {
        "agent_id": "invoice-triage",
        "version": "3",
        "spec_hash": hashlib.sha256(b"spec").hexdigest(),
        "policy_hash": hashlib.sha256(b"policy").hexdigest(),
        "decision_id": "4ae1c5a0-5c1c-4a8e-9a57-0d3f1c1f7e21",
        "input_digest": hashlib.sha256(b"input").hexdigest(),
        "actor": "alice@example.com",
        "role": "approver",
        "governance_status": "GOVERNED_VALID",
        "issued_at": T0,
        "expires_at": T0 + timedelta(days=30),
    }
    values.update(overrides)
    return ProofClaims(**values)


class Ed:
    """An Ed25519 key for tests, with direct access to raw signing (independent of proofs.py)."""

    def __init__(self) -> None:
        self.private = Ed25519PrivateKey.generate()
        self.raw_public = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.signer = ProofSigner.ed25519(self.private)
        self.keyid = self.signer.keyid

    def trusted(self, **window: datetime | None) -> dict[str, TrustedKey]:
        return {self.keyid: self.signer.trusted_key(**window)}


@pytest.fixture(scope="module")
def ed() -> Ed:
    return Ed()


@pytest.fixture(scope="module")
def other() -> Ed:
    return Ed()


@pytest.fixture(scope="module")
def hmac_signer() -> ProofSigner:
    return ProofSigner.hmac(b"\x07" * 32)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def envelope_json(payload: bytes, sigs: list[tuple[str, bytes]], payload_type: str = PAYLOAD_TYPE) -> bytes:
    return json.dumps(
        {
            "payload": b64(payload),
            "payloadType": payload_type,
            "signatures": [{"keyid": k, "sig": b64(s)} for k, s in sigs],
        }
    ).encode()


def sign_raw(key: Ed, body: bytes, payload_type: str = PAYLOAD_TYPE, keyid: str | None = None) -> bytes:
    """An envelope over arbitrary bytes, signed with cryptography directly over the DSSE PAE."""
    sig = key.private.sign(pae(payload_type, body))
    return envelope_json(body, [(keyid or key.keyid, sig)], payload_type)


def decode(envelope: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(envelope)
    return doc


def statement_bytes(claims: ProofClaims, mutate: Callable[[dict[str, Any]], None] | None = None) -> bytes:
    doc = proofs.statement(claims)
    if mutate is not None:
        mutate(doc)
    return json.dumps(doc).encode()


# --- R2: PAE conformance ----------------------------------------------------------------------

PAE_VECTORS = [
    # the DSSE spec's own vector
    (
        "http://example.com/HelloWorld",
        b"hello world",
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world",
    ),
    ("", b"", b"DSSEv1 0  0 "),
    # lengths are byte lengths: "\u00fc" is 2 bytes, "\u20ac" 3, the emoji 4
    ("\u00fc", "\u20ac".encode(), b"DSSEv1 2 \xc3\xbc 3 \xe2\x82\xac"),
    (
        "t/\u00e9\U0001f30d",
        "h\u00e9llo \U0001f30d".encode(),
        b"DSSEv1 8 t/\xc3\xa9\xf0\x9f\x8c\x8d 11 h\xc3\xa9llo \xf0\x9f\x8c\x8d",
    ),
    # a body holding spaces, digits and NUL must not confuse the length prefix
    (PAYLOAD_TYPE, b"1 2\x003 ", b"DSSEv1 28 application/vnd.in-toto+json 6 1 2\x003 "),
]


def test_r2_pae_conformance_byte_exact() -> None:
    right = sum(pae(t, body) == expected for t, body, expected in PAE_VECTORS)
    print(f"R2 PAE conformance: byte-exact {right}/{len(PAE_VECTORS)}")
    assert right == len(PAE_VECTORS)


def test_r2_signatures_are_over_the_pae(ed: Ed, hmac_signer: ProofSigner) -> None:
    env = decode(sign_proof(make_claims(), ed.signer))
    body = base64.b64decode(env["payload"])
    sig = base64.b64decode(env["signatures"][0]["sig"])
    # raises InvalidSignature if the signature were over anything but the PAE
    ed.private.public_key().verify(sig, pae(PAYLOAD_TYPE, body))

    env = decode(sign_proof(make_claims(), hmac_signer))
    body = base64.b64decode(env["payload"])
    secret = hmac_signer.trusted_key().material
    expected = hmac.new(secret, pae(PAYLOAD_TYPE, body), hashlib.sha256).digest()
    assert base64.b64decode(env["signatures"][0]["sig"]) == expected


@pytest.mark.parametrize("alg", ["ed25519", "hmac-sha256"])
def test_securesystemslib_reads_what_agov_signs_and_the_reverse(
    alg: str, ed: Ed, hmac_signer: ProofSigner
) -> None:
    signer = ed.signer if alg == "ed25519" else hmac_signer
    trusted = signer.trusted_key()
    ours = Envelope.from_dict(decode(sign_proof(make_claims(), signer)))
    ours.verify([trusted._sslib_key()], 1)  # raises if securesystemslib disagrees
    theirs = Envelope(canonical_json(statement(make_claims())), PAYLOAD_TYPE, {})
    theirs.sign(signer._signer)
    verified = verify_proof(canonical_json(theirs.to_dict()), {signer.keyid: trusted}, T0 + SEC)
    assert verified.claims == make_claims()
    assert canonical_json(theirs.to_dict()) == sign_proof(make_claims(), signer)


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ed25519", "hmac-sha256"])
def test_round_trip(alg: str, ed: Ed, hmac_signer: ProofSigner) -> None:
    signer = ed.signer if alg == "ed25519" else hmac_signer
    claims = make_claims()
    envelope = sign_proof(claims, signer)
    verified = verify_proof(envelope, {signer.keyid: signer.trusted_key()}, T0 + SEC)
    assert isinstance(verified, VerifiedProof)
    assert verified.claims == claims
    assert verified.keyid == signer.keyid
    payload = base64.b64decode(decode(envelope)["payload"])
    assert verified.payload_digest == hashlib.sha256(payload).hexdigest()
    assert verified.envelope_digest == hashlib.sha256(envelope).hexdigest()  # output is canonical
    assert json.loads(payload)["subject"][0]["name"] == "agent/invoice-triage@3"


def test_round_trip_keeps_microseconds_and_normalizes_to_utc(ed: Ed) -> None:
    cet = timezone(timedelta(hours=1))
    claims = make_claims(issued_at=datetime(2025, 3, 1, 13, 0, 0, 123456, tzinfo=cet), expires_at=None)
    verified = verify_proof(sign_proof(claims, ed.signer), ed.trusted(), T0 + SEC)
    assert verified.claims.issued_at == T0.replace(microsecond=123456)
    assert verified.claims.issued_at.tzinfo == UTC
    assert verified.claims.expires_at is None


def test_payload_digest_ignores_whitespace_and_base64_alphabet(ed: Ed) -> None:
    envelope = sign_proof(make_claims(), ed.signer)
    doc = decode(envelope)
    doc["payload"] = base64.urlsafe_b64encode(base64.b64decode(doc["payload"])).decode()
    reformatted = json.dumps(doc, indent=2).encode()
    a = verify_proof(envelope, ed.trusted(), T0)
    b = verify_proof(reformatted, ed.trusted(), T0)
    assert a.payload_digest == b.payload_digest
    assert a.envelope_digest != b.envelope_digest, "the envelope digest covers the exact bytes"


def test_signature_cache_skips_only_the_crypto(ed: Ed, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = SignatureCache(max_entries=4)
    envelope = sign_proof(make_claims(), ed.signer)
    verify_proof(envelope, ed.trusted(), T0, cache=cache)
    calls: list[int] = []
    original = proofs._signature_valid

    def counting(*args: Any) -> bool:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(proofs, "_signature_valid", counting)
    verify_proof(envelope, ed.trusted(), T0, cache=cache)
    assert calls == [], "a cached signature is not verified again"
    # revocation is still judged on a cache hit
    revoked = {k: replace(v, revoked_at=T0) for k, v in ed.trusted().items()}
    with pytest.raises(RevokedSignerError):
        verify_proof(envelope, revoked, T0, cache=cache)
    # a flipped byte is a different envelope: verified afresh, and refused
    tampered = bytearray(envelope)
    index = envelope.index(b'"sig":"') + 8
    tampered[index] = ord("A") if tampered[index] != ord("A") else ord("B")
    with pytest.raises(SignatureError):
        verify_proof(bytes(tampered), ed.trusted(), T0, cache=cache)
    assert calls, "the tampered envelope went through the real check"


def test_signing_is_deterministic_for_ed25519(ed: Ed) -> None:
    assert sign_proof(make_claims(), ed.signer) == sign_proof(make_claims(), ed.signer)


def test_signer_repr_and_trusted_key_repr_hide_secret(hmac_signer: ProofSigner) -> None:
    secret_hex = hmac_signer.trusted_key().material.hex()
    assert secret_hex not in repr(hmac_signer)
    assert "\\x07" not in repr(hmac_signer.trusted_key())
    assert secret_hex not in repr(hmac_signer.trusted_key())


# --- R3: tampering ----------------------------------------------------------------------------


def _flips(data: bytes) -> list[bytes]:
    """Every single-bit flip of every byte."""
    out = []
    for i in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            out.append(bytes(flipped))
    return out


@pytest.mark.parametrize("alg", ["ed25519", "hmac-sha256"])
def test_r3_tampered_payload_type_and_signature(alg: str, ed: Ed, hmac_signer: ProofSigner) -> None:
    signer = ed.signer if alg == "ed25519" else hmac_signer
    trusted = {signer.keyid: signer.trusted_key()}
    doc = decode(sign_proof(make_claims(), signer))
    payload = base64.b64decode(doc["payload"])
    sig = base64.b64decode(doc["signatures"][0]["sig"])
    accepted = tried = 0

    for bad in _flips(payload):
        tried += 1
        with pytest.raises(SignatureError, match="no trusted key verifies"):
            verify_proof(envelope_json(bad, [(signer.keyid, sig)]), trusted, T0)
            accepted += 1
    for bad in _flips(PAYLOAD_TYPE.encode()):
        tried += 1
        # not every flip is valid UTF-8; JSON can still carry it as escaped lone surrogates
        bad_type = bad.decode("utf-8", errors="surrogateescape")
        with pytest.raises(ProofError, match="payloadType must be"):
            verify_proof(envelope_json(payload, [(signer.keyid, sig)], bad_type), trusted, T0)
            accepted += 1
    for bad in _flips(sig):
        tried += 1
        with pytest.raises(SignatureError, match="no trusted key verifies"):
            verify_proof(envelope_json(payload, [(signer.keyid, bad)]), trusted, T0)
            accepted += 1
    # truncated and extended signatures
    for bad in (sig[:-1], sig + b"\0", b""):
        tried += 1
        with pytest.raises(SignatureError, match="no trusted key verifies"):
            verify_proof(envelope_json(payload, [(signer.keyid, bad)]), trusted, T0)
            accepted += 1
    print(f"R3 tampered ({alg}): accepted={accepted}/{tried}")
    assert accepted == 0
    assert tried == 8 * (len(payload) + len(PAYLOAD_TYPE) + len(sig)) + 3


def test_r3_signature_covers_the_payload_type(ed: Ed) -> None:
    # a valid signature over the same body under another type is not a proof
    body = statement_bytes(make_claims())
    forged_type = sign_raw(ed, body, payload_type="application/json")
    doc = decode(forged_type)
    doc["payloadType"] = PAYLOAD_TYPE
    with pytest.raises(SignatureError, match="no trusted key verifies"):
        verify_proof(json.dumps(doc).encode(), ed.trusted(), T0)


# --- R4: forgery ------------------------------------------------------------------------------


def test_r4_forged(ed: Ed, other: Ed, hmac_signer: ProofSigner) -> None:
    claims = make_claims()
    body = statement_bytes(claims)
    trusted = ed.trusted()
    by_other = decode(sign_proof(claims, other.signer))
    other_sig = base64.b64decode(by_other["signatures"][0]["sig"])
    hmac_sig_with_public_as_secret = hmac.new(ed.raw_public, pae(PAYLOAD_TYPE, body), hashlib.sha256).digest()
    real_hmac = decode(sign_proof(claims, hmac_signer))
    real_hmac_sig = base64.b64decode(real_hmac["signatures"][0]["sig"])

    cases: list[tuple[str, bytes, str]] = [
        ("untrusted key", sign_proof(claims, other.signer), "no trusted key verifies"),
        (
            "trusted keyid over a foreign signature",
            envelope_json(body, [(ed.keyid, other_sig)]),
            "no trusted key verifies",
        ),
        (
            "trusted keyid over a foreign signature, next to the foreign one",
            envelope_json(body, [(other.keyid, other_sig), (ed.keyid, other_sig)]),
            "no trusted key verifies",
        ),
        ("signatures stripped (empty list)", envelope_json(body, []), "no signatures"),
        (
            "signatures stripped (key missing)",
            json.dumps({"payload": b64(body), "payloadType": PAYLOAD_TYPE}).encode(),
            "no signatures",
        ),
        (
            "HMAC keyed with the Ed25519 public key, under the Ed25519 keyid",
            envelope_json(body, [(ed.keyid, hmac_sig_with_public_as_secret)]),
            "no trusted key verifies",
        ),
        (
            "real HMAC proof relabeled with the Ed25519 keyid",
            envelope_json(base64.b64decode(real_hmac["payload"]), [(ed.keyid, real_hmac_sig)]),
            "no trusted key verifies",
        ),
        (
            "HMAC proof where only Ed25519 is trusted",
            sign_proof(claims, hmac_signer),
            "no trusted key verifies",
        ),
        (
            "forged and also expired",
            sign_proof(
                make_claims(issued_at=T0 - timedelta(days=60), expires_at=T0 - timedelta(days=1)),
                other.signer,
            ),
            "no trusted key verifies",
        ),
        (
            "signed with the raw payload instead of the PAE",
            envelope_json(body, [(ed.keyid, ed.private.sign(body))]),
            "no trusted key verifies",
        ),
    ]
    accepted = 0
    for name, envelope, match in cases:
        with pytest.raises(SignatureError, match=match):
            verify_proof(envelope, trusted, T0)
            accepted += 1
            print(f"  accepted: {name}")
    # a trust map whose entry sits under another key's id does not lend that id to the key
    with pytest.raises(SignatureError, match="no trusted key verifies"):
        verify_proof(sign_proof(claims, ed.signer), {other.keyid: ed.signer.trusted_key()}, T0)
    # no trusted keys at all
    with pytest.raises(SignatureError, match="no trusted key verifies"):
        verify_proof(sign_proof(claims, ed.signer), {}, T0)
    print(f"R4 forged: accepted={accepted}/{len(cases) + 2}")
    assert accepted == 0


def test_r4_unknown_signatures_are_ignored_when_a_trusted_one_verifies(ed: Ed, other: Ed) -> None:
    body = statement_bytes(make_claims())
    good = ed.private.sign(pae(PAYLOAD_TYPE, body))
    foreign = other.private.sign(pae(PAYLOAD_TYPE, body))
    envelope = envelope_json(body, [(other.keyid, foreign), ("", b"junk"), (ed.keyid, good)])
    assert verify_proof(envelope, ed.trusted(), T0).keyid == ed.keyid


def test_r4_trusted_key_must_match_its_material(ed: Ed, other: Ed) -> None:
    with pytest.raises(KeyMaterialError, match="does not match its ed25519 key material"):
        TrustedKey(other.keyid, "ed25519", ed.raw_public)
    with pytest.raises(KeyMaterialError, match="does not match its hmac-sha256 key material"):
        TrustedKey(ed.keyid, "hmac-sha256", ed.raw_public)  # the public key is public: never a secret
    with pytest.raises(KeyMaterialError, match="shorter than 32"):
        ProofSigner.hmac(b"short")
    with pytest.raises(KeyMaterialError, match="unknown key algorithm"):
        TrustedKey(ed.keyid, "rsa", ed.raw_public)  # type: ignore[arg-type]


# --- R5: expiry and key validity windows ------------------------------------------------------


def test_r5_boundaries(ed: Ed) -> None:
    expires = T0 + timedelta(hours=1)
    expiring = sign_proof(make_claims(expires_at=expires), ed.signer)
    plain = sign_proof(make_claims(), ed.signer)  # issued at T0
    ok, expired = "ok", ExpiredProofError
    cases: list[tuple[str, bytes, dict[str, datetime], datetime, object]] = [
        # proof expiry: valid strictly before expires_at
        ("expires_at -1s", expiring, {}, expires - SEC, ok),
        ("expires_at exactly", expiring, {}, expires, expired),
        ("expires_at +1s", expiring, {}, expires + SEC, expired),
        # not_before: issued_at must be at or after it
        ("not_before = issued -1s", plain, {"not_before": T0 - SEC}, T0, ok),
        ("not_before = issued", plain, {"not_before": T0}, T0, ok),
        ("not_before = issued +1s", plain, {"not_before": T0 + SEC}, T0, expired),
        # not_after: issued_at must be at or before it
        ("not_after = issued -1s", plain, {"not_after": T0 - SEC}, T0, expired),
        ("not_after = issued", plain, {"not_after": T0}, T0, ok),
        ("not_after = issued +1s", plain, {"not_after": T0 + SEC}, T0, ok),
    ]
    right = 0
    for name, envelope, window, now, want in cases:
        try:
            verify_proof(envelope, ed.trusted(**window), now)
            got: object = ok
        except ExpiredProofError as exc:
            got = expired
            assert "expired at" in exc.message or "valid" in exc.message, name
        right += got == want
        assert got == want, name
    print(f"R5 boundary decisions right {right}/{len(cases)}")
    assert right == len(cases)


def test_r5_expiry_messages(ed: Ed) -> None:
    expires = T0 + timedelta(hours=1)
    with pytest.raises(ExpiredProofError, match=r"proof expired at 2025-03-01T13:00:00Z"):
        verify_proof(sign_proof(make_claims(expires_at=expires), ed.signer), ed.trusted(), expires)
    with pytest.raises(ExpiredProofError, match=r"before signer .* became valid"):
        verify_proof(sign_proof(make_claims(), ed.signer), ed.trusted(not_before=T0 + SEC), T0)
    with pytest.raises(ExpiredProofError, match=r"after signer .* stopped being valid"):
        verify_proof(sign_proof(make_claims(), ed.signer), ed.trusted(not_after=T0 - SEC), T0)


def test_r5_naive_now_is_a_caller_bug(ed: Ed) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_proof(sign_proof(make_claims(), ed.signer), ed.trusted(), T0.replace(tzinfo=None))


# --- R6: rollback -----------------------------------------------------------------------------


def test_r6_rollback(ed: Ed) -> None:
    trusted = ed.trusted()
    issued = [T0 + timedelta(hours=h) for h in range(5)]
    verified = [
        verify_proof(sign_proof(make_claims(issued_at=t, expires_at=None), ed.signer), trusted, issued[-1])
        for t in issued
    ]
    newest = issued[-1]
    rejected = 0
    for older in verified[:-1]:
        with pytest.raises(RollbackError, match="older than the newest proof"):
            check_not_rolled_back(older, newest_issued_at=newest)
        rejected += 1
    check_not_rolled_back(verified[-1], newest_issued_at=newest)  # the newest itself, presented again
    check_not_rolled_back(verified[0], newest_issued_at=None)  # nothing on record yet
    print(f"R6 rolled back: rejected {rejected}/{len(verified) - 1}")
    assert rejected == len(verified) - 1


# --- R7: mix and match ------------------------------------------------------------------------


def test_r7_mix_and_match(ed: Ed) -> None:
    a = make_claims(
        agent_id="agent-a",
        version="1",
        spec_hash=hashlib.sha256(b"spec A").hexdigest(),
        policy_hash=hashlib.sha256(b"policy A").hexdigest(),
    )
    b = make_claims(
        agent_id="agent-b",
        version="2",
        spec_hash=hashlib.sha256(b"spec B").hexdigest(),
        policy_hash=hashlib.sha256(b"policy B").hexdigest(),
    )
    va = verify_proof(sign_proof(a, ed.signer), ed.trusted(), T0)

    def bind(c: ProofClaims, **kw: str) -> list[str]:
        target = {
            "agent_id": c.agent_id,
            "version": c.version,
            "spec_hash": c.spec_hash,
            "policy_hash": c.policy_hash,
            **kw,
        }
        return check_binding(va, **target)

    cases = [
        (bind(a, policy_hash=b.policy_hash), ["policy_hash"]),
        (bind(b, spec_hash=a.spec_hash, agent_id=a.agent_id, version=a.version), ["policy_hash"]),
        (bind(a, spec_hash=b.spec_hash), ["spec_hash"]),
        (bind(a, agent_id=b.agent_id), ["agent_id"]),
        (bind(a, version=b.version), ["version"]),
        (bind(b), ["agent_id", "version", "spec_hash", "policy_hash"]),
    ]
    accepted = sum(not got for got, _ in cases)
    for got, want in cases:
        assert got == want
    assert bind(a) == []
    # the store's integer version binds like its decimal string
    assert (
        check_binding(va, agent_id="agent-a", version=1, spec_hash=a.spec_hash, policy_hash=a.policy_hash)
        == []
    )
    print(f"R7 mix-and-match: accepted={accepted}/{len(cases)}")
    assert accepted == 0


# --- R8: revocation (key side) ----------------------------------------------------------------


def test_r8_revocation(ed: Ed, other: Ed) -> None:
    envelope = sign_proof(make_claims(expires_at=None), ed.signer)
    now = T0 + timedelta(days=1)
    cases = [(now - SEC, True), (now, True), (now + SEC, False), (T0 - timedelta(days=1), True)]
    valid_under_revoked = right = 0
    for revoked_at, revoked in cases:
        try:
            verify_proof(envelope, ed.trusted(revoked_at=revoked_at), now)
            valid_under_revoked += revoked
            right += not revoked
        except RevokedSignerError as exc:
            assert "was revoked at" in exc.message
            right += revoked
    print(
        f"R8 revoked signer: agents left valid under the revoked key = {valid_under_revoked}; "
        f"boundary decisions right {right}/{len(cases)}"
    )
    assert valid_under_revoked == 0
    assert right == len(cases)


def test_r8_revocation_beats_expiry_and_a_second_good_signer_still_admits(ed: Ed, other: Ed) -> None:
    claims = make_claims(expires_at=T0 + SEC)
    with pytest.raises(RevokedSignerError, match="was revoked"):
        verify_proof(sign_proof(claims, ed.signer), ed.trusted(revoked_at=T0), T0 + timedelta(days=1))
    body = statement_bytes(make_claims())
    both = envelope_json(
        body,
        [
            (ed.keyid, ed.private.sign(pae(PAYLOAD_TYPE, body))),
            (other.keyid, other.private.sign(pae(PAYLOAD_TYPE, body))),
        ],
    )
    trusted = {**ed.trusted(revoked_at=T0), **other.trusted()}
    assert verify_proof(both, trusted, T0 + SEC).keyid == other.keyid
    with pytest.raises(RevokedSignerError):
        verify_proof(both, {**ed.trusted(revoked_at=T0), **other.trusted(revoked_at=T0)}, T0 + SEC)


# --- malformed input --------------------------------------------------------------------------


def _envelope_cases(ed: Ed) -> list[tuple[str, bytes, type[ProofError], str]]:
    good = sign_proof(make_claims(), ed.signer)
    doc = decode(good)

    def with_(**changes: Any) -> bytes:
        return json.dumps({**doc, **changes}).encode()

    sig0 = doc["signatures"][0]
    return [
        ("not UTF-8", b"\xff\xfe{}", ProofError, "envelope is not valid UTF-8"),
        ("not JSON", b"{", ProofError, "envelope is not valid JSON"),
        ("empty", b"", ProofError, "envelope is not valid JSON"),
        ("array", b"[]", ProofError, "envelope must be a JSON object, got list"),
        ("deep nesting", b"[" * 60000, ProofError, "nested too deeply"),
        ("deep, well-formed nesting", b"[" * 1000 + b"]" * 1000, ProofError, "nested too deeply|got list"),
        ("NaN", b'{"payload": NaN}', ProofError, "non-standard JSON constant NaN"),
        (
            "duplicate key",
            good[:-1] + b',"payloadType":"' + PAYLOAD_TYPE.encode() + b'"}',
            ProofError,
            "duplicate JSON key 'payloadType'",
        ),
        ("unknown field", with_(extra=1), ProofError, "unknown fields: extra"),
        (
            "missing payload",
            json.dumps({"payloadType": PAYLOAD_TYPE, "signatures": []}).encode(),
            ProofError,
            "must have payload and payloadType",
        ),
        ("wrong payloadType", with_(payloadType="application/json"), ProofError, "payloadType must be"),
        ("payloadType not a string", with_(payloadType=7), ProofError, "payloadType must be"),
        ("payload not base64", with_(payload="!!!"), ProofError, "envelope payload is not valid base64"),
        ("payload not a string", with_(payload=[1]), ProofError, "envelope payload must be a base64 string"),
        ("payload non-ASCII", with_(payload="\u00e9"), ProofError, "envelope payload is not valid base64"),
        ("signatures not a list", with_(signatures={}), ProofError, "signatures must be a list"),
        ("signature not an object", with_(signatures=["x"]), ProofError, "exactly keyid and sig"),
        (
            "signature extra field",
            with_(signatures=[{**sig0, "cert": ""}]),
            ProofError,
            "exactly keyid and sig",
        ),
        (
            "signature keyid not a string",
            with_(signatures=[{**sig0, "keyid": 1}]),
            ProofError,
            "keyid must be a string",
        ),
        (
            "signature keyid lone surrogate",
            with_(signatures=[{**sig0, "keyid": "\udc80"}]),
            ProofError,
            "lone surrogate",
        ),
        (
            "sig not base64",
            with_(signatures=[{**sig0, "sig": "%%"}]),
            ProofError,
            "signature 0 sig is not valid base64",
        ),
        ("duplicate keyid", with_(signatures=[sig0, sig0]), ProofError, "two signatures with keyid"),
    ]


def _statement_cases(ed: Ed) -> list[tuple[str, bytes, type[ProofError], str]]:
    c = make_claims()

    def signed(mutate: Callable[[dict[str, Any]], None]) -> bytes:
        return sign_raw(ed, statement_bytes(c, mutate))

    def drop(key: str) -> Callable[[dict[str, Any]], None]:
        return lambda d: d["predicate"].pop(key)

    def set_(path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], None]:
        def go(d: dict[str, Any]) -> None:
            for k in path[:-1]:
                d = d[k]
            d[path[-1]] = value

        return go

    def subject(**kw: Any) -> Callable[[dict[str, Any]], None]:
        return lambda d: d["subject"][0].update(kw)

    return [
        ("payload not JSON", sign_raw(ed, b"not json"), ProofError, "statement is not valid JSON"),
        ("payload not UTF-8", sign_raw(ed, b"\xc3"), ProofError, "statement is not valid UTF-8"),
        ("payload an array", sign_raw(ed, b"[]"), ProofError, "statement must be a JSON object"),
        (
            "wrong _type",
            signed(set_(("_type",), "https://in-toto.io/Statement/v0.1")),
            ProofError,
            "statement _type must be",
        ),
        (
            "wrong predicateType",
            signed(set_(("predicateType",), "https://slsa.dev/provenance/v1")),
            ProofError,
            "predicateType must be",
        ),
        (
            "two subjects",
            signed(lambda d: d["subject"].append(d["subject"][0])),
            ProofError,
            "exactly one object",
        ),
        ("no subject", signed(set_(("subject",), [])), ProofError, "exactly one object"),
        ("subject name not agent/", signed(subject(name="pkg:pypi/x@1")), ProofError, "subject name must be"),
        ("subject name without version", signed(subject(name="agent/x")), ProofError, "subject name must be"),
        ("subject empty id", signed(subject(name="agent/@1")), ProofError, "agent_id must be a non-empty"),
        ("no sha256 digest", signed(subject(digest={"sha512": "00"})), ProofError, "sha256 entry"),
        (
            "spec hash not hex",
            signed(subject(digest={"sha256": "zz"})),
            ProofError,
            "spec_hash must be 64 lowercase hex",
        ),
        (
            "predicate not an object",
            signed(set_(("predicate",), [])),
            ProofError,
            "predicate must be an object",
        ),
        ("missing decision_id", signed(drop("decision_id")), ProofError, "predicate is missing: decision_id"),
        ("missing issued_at", signed(drop("issued_at")), ProofError, "predicate is missing: issued_at"),
        ("actor not a string", signed(set_(("predicate", "actor"), 5)), ProofError, "actor must be a string"),
        ("empty role", signed(set_(("predicate", "role"), "")), ProofError, "role must be a non-empty"),
        (
            "unknown status",
            signed(set_(("predicate", "governance_status"), "GREAT")),
            ProofError,
            "governance_status is not a known status",
        ),
        (
            "issued_at with offset",
            signed(set_(("predicate", "issued_at"), "2025-03-01T12:00:00+00:00")),
            ProofError,
            "issued_at is not an RFC 3339 UTC timestamp",
        ),
        (
            "issued_at impossible date",
            signed(set_(("predicate", "issued_at"), "2025-02-30T12:00:00Z")),
            ProofError,
            "issued_at is not a valid date",
        ),
        (
            "issued_at a number",
            signed(set_(("predicate", "issued_at"), 1740830400)),
            ProofError,
            "issued_at is not an RFC 3339",
        ),
        (
            "expires before issued",
            signed(set_(("predicate", "expires_at"), "2025-03-01T11:00:00Z")),
            ProofError,
            "expires_at must be later than issued_at",
        ),
        (
            "duplicate key in a canonical statement",
            sign_raw(ed, canonical_json(proofs.statement(c))[:-1] + b',"_type":"x"}'),
            ProofError,
            "duplicate JSON key '_type'",
        ),
    ]


def test_malformed_envelopes_and_statements_are_named(ed: Ed) -> None:
    cases = _envelope_cases(ed) + _statement_cases(ed)
    rejected = 0
    for name, envelope, error, match in cases:
        with pytest.raises(error, match=match):
            verify_proof(envelope, ed.trusted(), T0)
        rejected += 1
        assert name
    print(f"malformed: rejected {rejected}/{len(cases)}, each with a message naming the problem")
    assert rejected == len(cases)


def test_malformed_statement_from_an_untrusted_key_is_a_signature_error(other: Ed, ed: Ed) -> None:
    # the statement is never parsed before its signature checks out
    with pytest.raises(SignatureError):
        verify_proof(sign_raw(other, b"not json"), ed.trusted(), T0)


def test_claims_validation() -> None:
    with pytest.raises(ProofError, match="issued_at must be a timezone-aware"):
        make_claims(issued_at=datetime(2025, 1, 1))
    with pytest.raises(ProofError, match="must not contain '@'"):
        make_claims(version="1@2")
    with pytest.raises(ProofError, match="expires_at must be later"):
        make_claims(expires_at=T0)
    with pytest.raises(ProofError, match="policy_hash must be 64 lowercase hex"):
        make_claims(policy_hash="A" * 64)
    assert replace(make_claims(), expires_at=None).expires_at is None


class _Text(str):
    """A str subclass: accepted wherever a str is (the fast check in ProofClaims takes exact types)."""


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (name, bad, f"{name} must be a non-empty string")
        for name in ("agent_id", "version", "decision_id", "actor", "role", "governance_status")
        for bad in ("", None, 7, ["x"], b"x")
    ]
    + [
        (name, bad, f"{name} must be 64 lowercase hex")
        for name in ("spec_hash", "policy_hash", "input_digest")
        for bad in ("", "a" * 63, "a" * 65, "A" * 64, "g" * 64, None, ["a" * 64], b"a" * 64)
    ]
    + [("governance_status", "VALID", "not a known status"), ("version", "1@2", "must not contain '@'")],
)
def test_every_claim_field_is_checked(field: str, value: Any, message: str) -> None:
    with pytest.raises(ProofError, match=message):
        make_claims(**{field: value})


def test_claims_of_str_subclasses_and_other_zones_sign_as_plain_ones(ed: Ed) -> None:
    plain = make_claims()
    subclassed = make_claims(
        **{
            name: _Text(getattr(plain, name))
            for name in ("agent_id", "version", "actor", "spec_hash", "role")
        },
        issued_at=T0.astimezone(timezone(timedelta(hours=2))),
    )
    assert subclassed.issued_at == T0 and subclassed.issued_at.tzinfo is UTC
    assert sign_proof(subclassed, ed.signer) == sign_proof(plain, ed.signer)


def test_a_claim_that_cannot_be_canonical_json_is_refused_as_before(ed: Ed) -> None:
    claims = make_claims(actor="lone \ud800 surrogate")
    with pytest.raises(SpecError, match="cannot be canonicalized"):
        sign_proof(claims, ed.signer)


_claim_text = st.text(min_size=1, max_size=12).filter(lambda t: "@" not in t)


@settings(max_examples=300, deadline=None)
@given(
    agent_id=_claim_text,
    version=_claim_text,
    decision_id=_claim_text,
    actor=_claim_text,
    role=_claim_text,
    status=st.sampled_from(sorted(s.value for s in Status)),
    issued_us=st.integers(0, 10**12),
    expires_in_us=st.none() | st.integers(1, 10**12),
)
def test_the_statement_and_envelope_templates_are_the_reference_encoding(
    agent_id: str,
    version: str,
    decision_id: str,
    actor: str,
    role: str,
    status: str,
    issued_us: int,
    expires_in_us: int | None,
) -> None:
    """sign_proof fills templates made once from canonical_json: any claims (quotes, controls,
    non-ASCII, whole and fractional seconds, with or without expiry) give the reference bytes."""
    issued = T0 + timedelta(microseconds=issued_us)
    claims = make_claims(
        agent_id=agent_id,
        version=version,
        decision_id=decision_id,
        actor=actor,
        role=role,
        governance_status=status,
        issued_at=issued,
        expires_at=None if expires_in_us is None else issued + timedelta(microseconds=expires_in_us),
    )
    reference = canonical_json(proofs.statement(claims))
    assert proofs._statement_bytes(claims) == reference
    envelope = sign_proof(claims, ProofSigner.hmac(b"k" * 32))
    doc = json.loads(envelope)
    assert canonical_json(doc) == envelope
    assert base64.standard_b64decode(doc["payload"]) == reference


# --- size limit -------------------------------------------------------------------------------


def test_oversized_rejected_before_parsing(ed: Ed, monkeypatch: pytest.MonkeyPatch) -> None:
    good = sign_proof(make_claims(), ed.signer)
    padded = good + b" " * (1024 - len(good) % 1024)  # whitespace is valid JSON around the object

    def no_parse(*_: Any, **__: Any) -> Any:
        raise AssertionError("json.loads called on oversized input")

    with monkeypatch.context() as m:
        m.setattr(json, "loads", no_parse)
        with pytest.raises(ProofError, match=f"over the {len(padded) - 1}-byte limit"):
            verify_proof(padded, ed.trusted(), T0, max_size=len(padded) - 1)
        huge = b"[" * (32 * 1024 * 1024)
        start = time.perf_counter()
        with pytest.raises(ProofError, match="over the 65536-byte limit"):
            verify_proof(huge, ed.trusted(), T0)
        elapsed_us = (time.perf_counter() - start) * 1e6
    # exactly at the limit it is parsed and verifies
    assert verify_proof(padded, ed.trusted(), T0, max_size=len(padded)).keyid == ed.keyid
    print(f"oversized: rejected before parsing, 32 MiB refused in {elapsed_us:.0f} us")
    assert elapsed_us < 50_000


def test_non_bytes_envelope_is_refused(ed: Ed) -> None:
    with pytest.raises(ProofError, match="envelope must be bytes, got str"):
        verify_proof(sign_proof(make_claims(), ed.signer).decode(), ed.trusted(), T0)  # type: ignore[arg-type]


# --- fuzzing: only ProofError, never a verified proof -----------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Fuzz:
    """Counts examples; verify_proof must raise ProofError (any other exception fails the test)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.examples = 0
        self.accepted = 0

    def check(self, envelope: bytes, trusted: dict[str, TrustedKey]) -> None:
        self.examples += 1
        try:
            verify_proof(envelope, trusted, T0)
        except ProofError:
            return
        self.accepted += 1
        raise AssertionError(f"fuzzed envelope verified: {envelope[:200]!r}")

    def report(self) -> None:
        print(
            f"fuzz {self.name}: examples={self.examples}, accepted={self.accepted}, "
            "exceptions other than ProofError=0"
        )
        assert self.examples >= 100
        assert self.accepted == 0


def test_fuzz_arbitrary_bytes(ed: Ed) -> None:
    fuzz = Fuzz("arbitrary bytes")

    @FUZZ
    @given(data=st.binary(max_size=4096))
    def run(data: bytes) -> None:
        fuzz.check(data, ed.trusted())

    run()
    fuzz.report()


def test_fuzz_arbitrary_json(ed: Ed) -> None:
    fuzz = Fuzz("arbitrary JSON")

    @FUZZ
    @given(value=json_values)
    def run(value: Any) -> None:
        fuzz.check(json.dumps(value).encode(), ed.trusted())

    run()
    fuzz.report()


def test_fuzz_envelope_shaped(ed: Ed) -> None:
    fuzz = Fuzz("envelope-shaped JSON")
    keyids = st.sampled_from(["", "x", ed.keyid]) | st.text(max_size=64) | json_values

    @FUZZ
    @given(
        payload=st.one_of(st.binary(max_size=300).map(b64), json_values),
        payload_type=st.sampled_from([PAYLOAD_TYPE, "", "application/json"]) | st.text(max_size=30),
        signatures=st.lists(
            st.fixed_dictionaries(
                {
                    "keyid": keyids,
                    "sig": st.binary(max_size=80).map(b64) | json_values,
                }
            ),
            max_size=3,
        )
        | json_values,
    )
    def run(payload: Any, payload_type: Any, signatures: Any) -> None:
        doc = {"payload": payload, "payloadType": payload_type, "signatures": signatures}
        fuzz.check(json.dumps(doc).encode(), ed.trusted())

    run()
    fuzz.report()


def test_fuzz_trusted_keyid_over_random_signature(ed: Ed) -> None:
    fuzz = Fuzz("trusted keyid, random sig and payload")

    @FUZZ
    @given(body=st.binary(max_size=300), sig=st.binary(max_size=70))
    def run(body: bytes, sig: bytes) -> None:
        fuzz.check(envelope_json(body, [(ed.keyid, sig)]), ed.trusted())

    run()
    fuzz.report()


def test_fuzz_garbage_statement_signed_by_a_trusted_key(ed: Ed) -> None:
    # past the signature check: the statement parser must still fail closed, with a ProofError
    fuzz = Fuzz("garbage statement, valid signature")

    @FUZZ
    @given(body=st.one_of(st.binary(max_size=500), json_values.map(lambda v: json.dumps(v).encode())))
    def run(body: bytes) -> None:
        fuzz.check(sign_raw(ed, body), ed.trusted())

    run()
    fuzz.report()


def test_fuzz_one_statement_field_replaced(ed: Ed) -> None:
    """A validly signed statement with one field swapped for arbitrary JSON.

    It may only verify when the swapped value is itself valid, and then the claims read back
    must re-serialize to exactly the statement that was signed.
    """
    counts = {"examples": 0, "rejected": 0, "accepted_exact": 0}
    paths: list[tuple[Any, ...]] = [
        ("_type",),
        ("subject",),
        ("predicateType",),
        ("predicate",),
        ("predicate", "policy_hash"),
        ("predicate", "decision_id"),
        ("predicate", "issued_at"),
        ("predicate", "expires_at"),
        ("predicate", "governance_status"),
        ("subject", 0),
        ("subject", 0, "name"),
        ("subject", 0, "digest"),
    ]

    @FUZZ
    @given(path=st.sampled_from(paths), value=json_values)
    def run(path: tuple[Any, ...], value: Any) -> None:
        counts["examples"] += 1
        doc = proofs.statement(make_claims())
        target: Any = doc
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = value
        try:
            verified = verify_proof(sign_raw(ed, json.dumps(doc).encode()), ed.trusted(), T0)
        except ProofError:
            counts["rejected"] += 1
            return
        assert proofs.statement(verified.claims) == doc, (path, value)
        counts["accepted_exact"] += 1

    run()
    print(f"fuzz one field replaced: {counts}, exceptions other than ProofError=0")
    assert counts["examples"] >= 100
    assert counts["rejected"] > 0
