"""Promotion proofs: DSSE envelopes carrying an in-toto Statement v1, signed and verified.

Pure functions over values and bytes: no file I/O and no clock reads (``now`` is passed in).
Keys come from :mod:`agov.keys`. The envelope is DSSE as securesystemslib reads and writes it
(its ``Envelope`` verifies what this module signs, and the reverse, in the unit tests); the hot
paths sign and verify PAE bytes with ``cryptography`` directly, with each public key parsed once.
This module adds the statement format, an HMAC-SHA256 key type that plugs into
securesystemslib's ``Signer``/``Key`` interfaces, and the checks that turn a verified envelope
into a decision: revocation, key validity window, expiry, binding and rollback.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import (  # type: ignore[attr-defined]  # re-exported without __all__
    ED25519,
    KEY_TYPE_ED25519,
    CryptoSigner,
    Key,
    SecretsHandler,
    Signature,
    Signer,
    SSlibKey,
)

from agov.decisions import Status
from agov.errors import (
    AgovError,
    ExpiredProofError,
    KeyMaterialError,
    ProofError,
    RevokedSignerError,
    RollbackError,
    SignatureError,
    SpecError,
)
from agov.hashing import canonical_json, sha256_hex

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "agov.dev/promotion/v1"
DEFAULT_MAX_SIZE = 64 * 1024
HMAC_MIN_SECRET_BYTES = 32

Alg = Literal["ed25519", "hmac-sha256"]
ALGORITHMS: tuple[Alg, ...] = ("ed25519", "hmac-sha256")

_HMAC_KEYID_PREFIX = b"agov-hmac-keyid\0"
_HEX64 = re.compile(r"[0-9a-f]{64}")
# One canonical timestamp form: RFC 3339, UTC, "Z", optional fraction (microseconds at most).
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")
_PREDICATE_STRINGS = ("policy_hash", "decision_id", "input_digest", "actor", "role", "governance_status")
_STATUSES = frozenset(s.value for s in Status)
_ENVELOPE_FIELDS = frozenset({"payload", "payloadType", "signatures"})
_SIGNATURE_FIELDS = frozenset({"keyid", "sig"})


# --- key ids ----------------------------------------------------------------------------------


def ed25519_keyid(public_raw: bytes) -> str:
    """Key id of an Ed25519 key: SHA-256 (hex) of its 32 raw public key bytes."""
    return sha256_hex(public_raw)


def hmac_keyid(secret: bytes) -> str:
    """Key id of an HMAC secret: SHA-256 (hex) over a domain prefix and the secret.

    The prefix keeps the id from being the plain hash of the secret, which would let the id
    be confused with an Ed25519 id computed over the same bytes.
    """
    return sha256_hex(_HMAC_KEYID_PREFIX + secret)


def _ed25519_public(public_raw: bytes) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(public_raw)
    except ValueError as exc:
        raise KeyMaterialError(
            f"not an Ed25519 public key: {exc}", hint="an Ed25519 public key is exactly 32 raw bytes"
        ) from exc


def _check_hmac_secret(secret: bytes) -> None:
    if len(secret) < HMAC_MIN_SECRET_BYTES:
        raise KeyMaterialError(
            f"HMAC secret is {len(secret)} bytes, shorter than {HMAC_MIN_SECRET_BYTES}",
            hint="generate a new key with `agov keys generate --alg hmac-sha256`",
        )


# --- HMAC-SHA256 for securesystemslib's Envelope ----------------------------------------------


class _HmacKey(Key):
    """A symmetric key seen through securesystemslib's ``Key`` interface.

    The secret is kept off ``keyval`` so that ``to_dict`` and ``repr`` never carry it.
    """

    KEYTYPE = "agov-hmac"
    SCHEME = "hmac-sha256"

    def __init__(self, keyid: str, secret: bytes) -> None:
        super().__init__(keyid, self.KEYTYPE, self.SCHEME, {})
        self._secret = secret

    @classmethod
    def from_dict(cls, keyid: str, key_dict: dict[str, Any]) -> _HmacKey:
        raise ValueError("HMAC keys are never deserialized from metadata")

    def to_dict(self) -> dict[str, Any]:
        return self._to_dict()

    def mac(self, data: bytes) -> bytes:
        return hmac.new(self._secret, data, hashlib.sha256).digest()

    def verify_signature(self, signature: Signature, data: bytes) -> None:
        if signature.keyid != self.keyid:
            raise UnverifiedSignatureError(f"keyid mismatch for {self.keyid}")
        try:
            given = bytes.fromhex(signature.signature)
        except ValueError as exc:
            raise UnverifiedSignatureError(f"signature by {self.keyid} is not hex") from exc
        # constant time, so a forger learns nothing from how long a mismatch takes
        if not hmac.compare_digest(given, self.mac(data)):
            raise UnverifiedSignatureError(f"Failed to verify signature by {self.keyid}")


class _HmacSigner(Signer):
    def __init__(self, key: _HmacKey) -> None:
        self._key = key

    @classmethod
    def from_priv_key_uri(
        cls, priv_key_uri: str, public_key: Key, secrets_handler: SecretsHandler | None = None
    ) -> _HmacSigner:
        raise ValueError("HMAC signers are made from a secret, not a key URI")

    @property
    def public_key(self) -> Key:
        return self._key

    def sign(self, payload: bytes) -> Signature:
        return Signature(self._key.keyid, self._key.mac(payload).hex())


# --- value types ------------------------------------------------------------------------------


def _require_aware(name: str, value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if type(value) is datetime and value.tzinfo is UTC:  # what agov's own clock gives
        return value
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ProofError(f"{name} must be a timezone-aware datetime, got {value!r}")
    return value.astimezone(UTC)


@dataclass(frozen=True)
class ProofClaims:
    """What a promotion proof states: which agent version, under which policy, by whom, when.

    Datetimes must be timezone-aware and are normalized to UTC.

    Raises:
        ProofError: a field is empty or of the wrong form (hashes are 64 lowercase hex, the
            version must not contain ``@``, datetimes must be aware, ``expires_at`` must be
            after ``issued_at``).
    """

    agent_id: str
    version: str
    spec_hash: str
    policy_hash: str
    decision_id: str
    input_digest: str
    actor: str
    role: str
    governance_status: str
    issued_at: datetime
    expires_at: datetime | None = None

    def __post_init__(self) -> None:
        if not self._well_formed():
            self._refuse()  # names the first field that is wrong
        object.__setattr__(self, "issued_at", _require_aware("issued_at", self.issued_at))
        expires_at = _require_aware("expires_at", self.expires_at)
        object.__setattr__(self, "expires_at", expires_at)
        if expires_at is not None and expires_at <= self.issued_at:
            raise ProofError("claim expires_at must be later than issued_at")

    def _well_formed(self) -> bool:
        """The checks of :meth:`_refuse` in one expression: revalidation makes claims per agent."""
        return (
            type(self.agent_id) is str
            and type(self.version) is str
            and type(self.decision_id) is str
            and type(self.actor) is str
            and type(self.role) is str
            and bool(self.agent_id and self.version and self.decision_id and self.actor and self.role)
            and "@" not in self.version
            and type(self.governance_status) is str
            and self.governance_status in _STATUSES
            and type(self.spec_hash) is str
            and type(self.policy_hash) is str
            and type(self.input_digest) is str
            and _HEX64.fullmatch(self.spec_hash) is not None
            and _HEX64.fullmatch(self.policy_hash) is not None
            and _HEX64.fullmatch(self.input_digest) is not None
        )

    def _refuse(self) -> None:
        for name in ("agent_id", "version", "decision_id", "actor", "role", "governance_status"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ProofError(f"claim {name} must be a non-empty string, got {value!r}")
        # the subject name is "agent/<id>@<version>": an '@' in the version would make it ambiguous
        if "@" in self.version:
            raise ProofError(f"claim version must not contain '@': {self.version!r}")
        for name in ("spec_hash", "policy_hash", "input_digest"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _HEX64.fullmatch(value):
                raise ProofError(f"claim {name} must be 64 lowercase hex characters, got {value!r}")
        if self.governance_status not in _STATUSES:
            raise ProofError(f"claim governance_status is not a known status: {self.governance_status!r}")

    @property
    def subject_name(self) -> str:
        return f"agent/{self.agent_id}@{self.version}"


@dataclass(frozen=True)
class TrustedKey:
    """A key trusted to sign proofs, with the time window it may sign in and its revocation.

    ``material`` is the raw 32-byte public key for Ed25519, or the shared secret for HMAC
    (kept out of ``repr``). The key id must be the one derived from the material, so a
    trust entry cannot claim another key's id.

    Raises:
        KeyMaterialError: unknown algorithm, unusable material, or a key id that does not
            match the material.
        ProofError: a datetime is not timezone-aware.
    """

    keyid: str
    alg: Alg
    material: bytes = field(repr=False)
    not_before: datetime | None = None
    not_after: datetime | None = None
    revoked_at: datetime | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.material, bytes):
            raise KeyMaterialError(
                f"key material for {self.keyid} must be bytes, got {type(self.material).__name__}"
            )
        if self.alg == "ed25519":
            _ed25519_public(self.material)
            expected = ed25519_keyid(self.material)
        elif self.alg == "hmac-sha256":
            _check_hmac_secret(self.material)
            expected = hmac_keyid(self.material)
        else:
            raise KeyMaterialError(
                f"unknown key algorithm {self.alg!r}", hint=f"use one of {', '.join(ALGORITHMS)}"
            )
        if self.keyid != expected:
            raise KeyMaterialError(
                f"key id {self.keyid} does not match its {self.alg} key material",
                hint="load trusted keys with agov.keys.load_trusted_key",
            )
        for name in ("not_before", "not_after", "revoked_at"):
            object.__setattr__(self, name, _require_aware(name, getattr(self, name)))

    def _sslib_key(self) -> Key:
        if self.alg == "ed25519":
            return SSlibKey(self.keyid, KEY_TYPE_ED25519, ED25519, {"public": self.material.hex()})
        return _HmacKey(self.keyid, self.material)


@dataclass(frozen=True)
class VerifiedProof:
    """A proof whose signature, signer and expiry all checked out at ``now``.

    ``envelope_digest`` is SHA-256 over the envelope bytes exactly as verified;
    ``payload_digest`` is SHA-256 over the signed statement bytes, which stays the same if
    signatures are added or removed.
    """

    claims: ProofClaims
    keyid: str
    envelope_digest: str
    payload_digest: str


class ProofSigner:
    """Signs proofs with one key. Build it with :meth:`ed25519` or :meth:`hmac`."""

    __slots__ = ("_sign", "_signer", "alg", "keyid")

    def __init__(self, signer: Signer, sign: Callable[[bytes], bytes], keyid: str, alg: Alg) -> None:
        self._signer = signer
        # the raw signature over PAE bytes; the securesystemslib signer only describes the key
        self._sign = sign
        self.keyid = keyid
        self.alg: Alg = alg

    @classmethod
    def ed25519(cls, private_key: Ed25519PrivateKey) -> ProofSigner:
        """A signer over an Ed25519 private key; the key id is SHA-256 of the raw public key.

        Raises:
            KeyMaterialError: ``private_key`` is not an Ed25519 private key.
        """
        if not isinstance(private_key, Ed25519PrivateKey):
            raise KeyMaterialError(f"expected an Ed25519 private key, got {type(private_key).__name__}")
        raw = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        keyid = ed25519_keyid(raw)
        public = SSlibKey(keyid, KEY_TYPE_ED25519, ED25519, {"public": raw.hex()})
        return cls(CryptoSigner(private_key, public), private_key.sign, keyid, "ed25519")

    @classmethod
    def hmac(cls, secret: bytes) -> ProofSigner:
        """A signer over an HMAC-SHA256 shared secret (at least 32 bytes).

        Raises:
            KeyMaterialError: the secret is too short.
        """
        _check_hmac_secret(secret)
        key = _HmacKey(hmac_keyid(secret), secret)
        return cls(_HmacSigner(key), key.mac, key.keyid, "hmac-sha256")

    def trusted_key(
        self,
        *,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        revoked_at: datetime | None = None,
    ) -> TrustedKey:
        """The trust entry that verifies this signer's proofs.

        Raises:
            ProofError: a datetime is not timezone-aware.
        """
        key = self._signer.public_key
        material = key._secret if isinstance(key, _HmacKey) else bytes.fromhex(key.keyval["public"])
        return TrustedKey(
            self.keyid, self.alg, material, not_before=not_before, not_after=not_after, revoked_at=revoked_at
        )

    def __repr__(self) -> str:
        return f"ProofSigner(alg={self.alg!r}, keyid={self.keyid!r})"


# --- DSSE -------------------------------------------------------------------------------------


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE pre-authentication encoding: ``"DSSEv1" SP len(type) SP type SP len(body) SP body``.

    Lengths are byte lengths (UTF-8 for the type), as securesystemslib's ``Envelope.pae``.
    """
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(body), body)


def _format_time(value: datetime) -> str:
    if type(value) is datetime and value.tzinfo is UTC:  # what ProofClaims holds: cached
        return _format_utc(value)
    return _format_utc.__wrapped__(value.astimezone(UTC))


@functools.lru_cache(maxsize=1024)
def _format_utc(value: datetime) -> str:
    """A revalidation chunk shares one issue time, and agents often an expiry. Only plain UTC
    datetimes come here (see ``agov.store.sqlite._iso_utc`` for why)."""
    spec = "seconds" if value.microsecond == 0 else "microseconds"
    return value.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def _parse_time(name: str, value: Any) -> datetime:
    if not isinstance(value, str) or not _TIMESTAMP.fullmatch(value):
        raise ProofError(
            f"predicate {name} is not an RFC 3339 UTC timestamp (YYYY-MM-DDTHH:MM:SS[.ffffff]Z): {value!r}"
        )
    try:
        return datetime.fromisoformat(value[:-1]).replace(tzinfo=UTC)
    except ValueError as exc:
        raise ProofError(f"predicate {name} is not a valid date and time: {value!r}") from exc


def statement(claims: ProofClaims) -> dict[str, Any]:
    """The in-toto Statement v1 that a proof's envelope carries for ``claims``."""
    return _statement(*_statement_values(claims))


def _statement_values(claims: ProofClaims) -> tuple[str, str, str, str, str, str, str, str, str, str | None]:
    """The arguments of :func:`_statement` for ``claims``, in its order."""
    return (
        claims.subject_name,
        claims.spec_hash,
        claims.policy_hash,
        claims.decision_id,
        claims.input_digest,
        claims.actor,
        claims.role,
        claims.governance_status,
        _format_time(claims.issued_at),
        None if claims.expires_at is None else _format_time(claims.expires_at),
    )


def _statement(
    name: str,
    spec_hash: str,
    policy_hash: str,
    decision_id: str,
    input_digest: str,
    actor: str,
    role: str,
    governance_status: str,
    issued_at: str,
    expires_at: str | None,
) -> dict[str, Any]:
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": spec_hash}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "policy_hash": policy_hash,
            "decision_id": decision_id,
            "input_digest": input_digest,
            "actor": actor,
            "role": role,
            "governance_status": governance_status,
            "issued_at": issued_at,
            "expires_at": expires_at,
        },
    }


class _Template:
    """The canonical bytes of a fixed-shape document whose variable parts are all strings (or
    null), as pieces to join with the encoded values: the shape is canonicalized once, by
    ``canonical_json`` itself, with a marker string in every variable place, so the key order
    is the reference encoder's. One string encodes the same in both (orjson's escaping is RFC
    8785's, ``tests/unit/test_hashing.py``); ``tests/unit/test_proofs.py`` checks whole proofs."""

    __slots__ = ("_order", "_pieces")

    def __init__(self, build: Callable[..., Any], arity: int) -> None:
        encoded_markers = [orjson.dumps(f"\x00agov-template-{i}\x00") for i in range(arity)]
        encoded = canonical_json(build(*(orjson.loads(m) for m in encoded_markers)))
        places = []
        for index, marker in enumerate(encoded_markers):
            if encoded.count(marker) != 1:
                raise AssertionError(f"template marker {index} is not in place exactly once")
            places.append((encoded.index(marker), index, len(marker)))
        places.sort()
        pieces, start = [], 0
        for position, _index, length in places:
            pieces.append(encoded[start:position])
            start = position + length
        pieces.append(encoded[start:])
        self._pieces = tuple(pieces)
        self._order = tuple(index for _position, index, _length in places)  # argument per place

    def render(self, *values: str | None) -> bytes:
        """Raises: orjson.JSONEncodeError: a value that orjson refuses (a lone surrogate)."""
        pieces = self._pieces
        out = [pieces[0]]
        for index, piece in zip(self._order, pieces[1:], strict=True):
            value = values[index]
            out.append(b"null" if value is None else orjson.dumps(value))
            out.append(piece)
        return b"".join(out)


_STATEMENT = _Template(_statement, 10)
_ENVELOPE = _Template(
    lambda payload, keyid, sig: {
        "payload": payload,
        "payloadType": PAYLOAD_TYPE,
        "signatures": [{"keyid": keyid, "sig": sig}],
    },
    3,
)


def _statement_bytes(claims: ProofClaims) -> bytes:
    """``canonical_json(statement(claims))``, from the template."""
    try:
        return _STATEMENT.render(*_statement_values(claims))
    except orjson.JSONEncodeError:
        return canonical_json(statement(claims))  # the reference encoder names the problem


def sign_proof(claims: ProofClaims, signer: ProofSigner) -> bytes:
    """Sign ``claims`` into a DSSE envelope, returned as canonical JSON bytes.

    Raises:
        SpecError: a claim value cannot be serialized canonically.
    """
    payload = _statement_bytes(claims)
    signature = signer._sign(pae(PAYLOAD_TYPE, payload))
    # the shape of securesystemslib's Envelope.to_dict, which verifies it (tests/unit/test_proofs.py)
    return _ENVELOPE.render(
        base64.standard_b64encode(payload).decode("ascii"),
        signer.keyid,
        base64.standard_b64encode(signature).decode("ascii"),
    )


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # two parsers could disagree on which duplicate wins; refuse the ambiguity
            raise ProofError(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ProofError(f"non-standard JSON constant {name}")


# one decoder for every envelope and statement: json.loads with hooks builds a new one per call
_DECODER = json.JSONDecoder(object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)


def _loads(data: bytes, what: str) -> Any:
    # Fast path for what agov itself writes: bytes that are exactly the canonical form of what
    # orjson reads from them hold no duplicate key, no NaN and nothing else the strict parser
    # below refuses. Anything else (a reformatted envelope, say) takes the strict parser.
    try:
        doc = orjson.loads(data)
        if canonical_json(doc) == data:
            return doc
    except (orjson.JSONDecodeError, SpecError, RecursionError):
        pass
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProofError(f"{what} is not valid UTF-8: {exc.reason} at byte {exc.start}") from exc
    try:
        return _DECODER.decode(text)
    except RecursionError as exc:
        raise ProofError(f"{what} is nested too deeply") from exc
    except ValueError as exc:
        raise ProofError(f"{what} is not valid JSON: {exc}") from exc


def _b64decode(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise ProofError(f"{what} must be a base64 string, got {type(value).__name__}")
    try:
        data = value.encode("ascii")
    except UnicodeEncodeError as exc:
        raise ProofError(f"{what} is not valid base64 (non-ASCII character)") from exc
    # DSSE allows either alphabet
    for altchars in (None, b"-_"):
        try:
            return base64.b64decode(data, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            continue
    raise ProofError(f"{what} is not valid base64")


def _utf8_string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ProofError(f"{what} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ProofError(f"{what} is not valid Unicode (lone surrogate)") from exc
    return value


def _parse_envelope(raw: Any) -> Envelope:
    if not isinstance(raw, dict):
        raise ProofError(f"envelope must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _ENVELOPE_FIELDS)
    if unknown:
        raise ProofError(f"envelope has unknown fields: {', '.join(unknown)}")
    if "payloadType" not in raw or "payload" not in raw:
        raise ProofError("envelope must have payload and payloadType")
    payload_type = raw["payloadType"]
    if payload_type != PAYLOAD_TYPE:
        raise ProofError(f"envelope payloadType must be {PAYLOAD_TYPE!r}, got {payload_type!r}")
    payload = _b64decode(raw["payload"], "envelope payload")
    entries = raw.get("signatures", [])
    if not isinstance(entries, list):
        raise ProofError(f"envelope signatures must be a list, got {type(entries).__name__}")
    signatures: dict[str, Signature] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != _SIGNATURE_FIELDS:
            raise ProofError(f"envelope signature {i} must be an object with exactly keyid and sig")
        keyid = _utf8_string(entry["keyid"], f"envelope signature {i} keyid")
        sig = _b64decode(entry["sig"], f"envelope signature {i} sig")
        if keyid in signatures:
            raise ProofError(f"envelope has two signatures with keyid {keyid!r}")
        signatures[keyid] = Signature(keyid, sig.hex())
    return Envelope(payload, payload_type, signatures)


def _parse_statement(payload: bytes) -> ProofClaims:
    doc = _loads(payload, "statement")
    if not isinstance(doc, dict):
        raise ProofError(f"statement must be a JSON object, got {type(doc).__name__}")
    if doc.get("_type") != STATEMENT_TYPE:
        raise ProofError(f"statement _type must be {STATEMENT_TYPE!r}, got {doc.get('_type')!r}")
    if doc.get("predicateType") != PREDICATE_TYPE:
        raise ProofError(
            f"statement predicateType must be {PREDICATE_TYPE!r}, got {doc.get('predicateType')!r}"
        )
    subjects = doc.get("subject")
    if not isinstance(subjects, list) or len(subjects) != 1 or not isinstance(subjects[0], dict):
        raise ProofError("statement subject must be a list of exactly one object")
    name = subjects[0].get("name")
    digests = subjects[0].get("digest")
    if not isinstance(name, str) or not name.startswith("agent/") or "@" not in name:
        raise ProofError(f"statement subject name must be 'agent/<id>@<version>', got {name!r}")
    agent_id, _, version = name[len("agent/") :].rpartition("@")
    if not isinstance(digests, dict) or "sha256" not in digests:
        raise ProofError("statement subject digest must have a sha256 entry")
    predicate = doc.get("predicate")
    if not isinstance(predicate, dict):
        raise ProofError("statement predicate must be an object")
    missing = [k for k in (*_PREDICATE_STRINGS, "issued_at") if k not in predicate]
    if missing:
        raise ProofError(f"statement predicate is missing: {', '.join(missing)}")
    for key in _PREDICATE_STRINGS:
        if not isinstance(predicate[key], str):
            raise ProofError(f"predicate {key} must be a string, got {type(predicate[key]).__name__}")
    expires_raw = predicate.get("expires_at")
    return ProofClaims(
        agent_id=agent_id,
        version=version,
        spec_hash=digests["sha256"],
        policy_hash=predicate["policy_hash"],
        decision_id=predicate["decision_id"],
        input_digest=predicate["input_digest"],
        actor=predicate["actor"],
        role=predicate["role"],
        governance_status=predicate["governance_status"],
        issued_at=_parse_time("issued_at", predicate["issued_at"]),
        expires_at=None if expires_raw is None else _parse_time("expires_at", expires_raw),
    )


class SignatureCache:
    """Remembers envelopes whose signature already verified under a given key.

    The entry is keyed by the SHA-256 of the exact envelope bytes and the key's id *and*
    material, so a changed byte or another key is a miss and is verified afresh. Only the
    signature check is skipped on a hit: revocation, validity window and expiry are judged at
    every call. Bounded (least recently used out), thread-safe.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._entries: OrderedDict[tuple[str, str, bytes], None] = OrderedDict()
        # raw digest -> (claims, payload digest) of envelopes that verified under some key
        self._parsed: OrderedDict[str, tuple[ProofClaims, str]] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def parsed(self, raw_digest: str) -> tuple[ProofClaims, str] | None:
        with self._lock:
            return self._parsed.get(raw_digest)

    def remember_parsed(self, raw_digest: str, claims: ProofClaims, payload_digest: str) -> None:
        with self._lock:
            self._parsed[raw_digest] = (claims, payload_digest)
            if len(self._parsed) > self._max:
                self._parsed.popitem(last=False)

    def __contains__(self, entry: tuple[str, str, bytes]) -> bool:
        with self._lock:
            if entry in self._entries:
                self._entries.move_to_end(entry)
                return True
            return False

    def add(self, entry: tuple[str, str, bytes]) -> None:
        with self._lock:
            self._entries[entry] = None
            if len(self._entries) > self._max:
                self._entries.popitem(last=False)


def _verifying_keys(
    envelope: Envelope, trusted: Mapping[str, TrustedKey], raw_digest: str, cache: SignatureCache | None
) -> list[TrustedKey]:
    """Trusted keys whose signature over the envelope checks out, in signature order.

    The envelope's keyid only narrows which trusted key to try; the signature is always
    checked with that key's own algorithm and material, never with anything the envelope says.
    """
    verified: list[TrustedKey] = []
    signed_bytes = pae(envelope.payload_type, envelope.payload)
    for keyid, signature in envelope.signatures.items():
        key = trusted.get(keyid)
        if key is None or key.keyid != keyid:
            continue  # signatures from keys we do not trust are ignored
        memo = (raw_digest, key.keyid, key.material)
        if cache is not None and memo in cache:
            verified.append(key)
            continue
        if not _signature_valid(key, bytes.fromhex(signature.signature), signed_bytes):
            continue
        if cache is not None:
            cache.add(memo)
        verified.append(key)
    return verified


def _signature_valid(key: TrustedKey, signature: bytes, signed_bytes: bytes) -> bool:
    if key.alg == "ed25519":
        try:
            _ed25519_verifier(key.material).verify(signature, signed_bytes)
        except InvalidSignature:
            return False
        return True
    # constant time, so a forger learns nothing from how long a mismatch takes
    return hmac.compare_digest(signature, hmac.new(key.material, signed_bytes, hashlib.sha256).digest())


@functools.lru_cache(maxsize=1024)
def _ed25519_verifier(public_raw: bytes) -> Ed25519PublicKey:
    """The parsed public key, once per key rather than once per signature."""
    return _ed25519_public(public_raw)


def _signer_problem(key: TrustedKey, claims: ProofClaims, now: datetime) -> AgovError | None:
    # (4) revocation applies to every proof the key ever signed, whenever it was issued
    if key.revoked_at is not None and key.revoked_at <= now:
        return RevokedSignerError(
            f"proof signer {key.keyid} was revoked at {_format_time(key.revoked_at)}",
            hint="re-promote the agent with a key that is not revoked",
        )
    # (5) the key may only sign within its validity window
    if key.not_before is not None and claims.issued_at < key.not_before:
        return ExpiredProofError(
            f"proof issued at {_format_time(claims.issued_at)}, before signer "
            f"{key.keyid} became valid at {_format_time(key.not_before)}"
        )
    if key.not_after is not None and claims.issued_at > key.not_after:
        return ExpiredProofError(
            f"proof issued at {_format_time(claims.issued_at)}, after signer "
            f"{key.keyid} stopped being valid at {_format_time(key.not_after)}"
        )
    return None


def verify_proof(
    envelope: bytes,
    trusted: Mapping[str, TrustedKey],
    now: datetime,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    cache: SignatureCache | None = None,
) -> VerifiedProof:
    """Verify a proof envelope against trusted keys at time ``now``.

    Checks run in this order, so a forged proof is a ``SignatureError`` even when it is also
    expired: (1) size, (2) envelope shape, (3) signature, then the statement is decoded from
    the verified payload, (4) revocation, (5) the signer's validity window, (6) expiry. One
    valid signature from a trusted key that also passes (4) and (5) is enough; signatures
    from unknown keys are ignored.

    Args:
        envelope: the DSSE envelope as JSON bytes.
        trusted: trusted keys by key id.
        now: the current time (timezone-aware).
        max_size: largest envelope accepted, in bytes; larger input is refused unparsed.
        cache: remembers signatures already verified (same bytes, same key), so a hot
            admission path pays for the Ed25519 check once per proof.

    Returns:
        The verified claims, the key that signed them and the envelope's digests.

    Raises:
        ProofError: oversized, malformed or wrongly typed envelope or statement.
        SignatureError: no signature from a trusted key verifies (including none at all).
        RevokedSignerError: every verifying key was revoked at or before ``now``.
        ExpiredProofError: issued outside the signer's validity window, or ``now`` is at or
            after ``expires_at``.
        ValueError: ``now`` is not timezone-aware (a caller bug, not bad evidence).
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    # (1) size, before anything looks inside
    if not isinstance(envelope, bytes | bytearray):
        raise ProofError(f"envelope must be bytes, got {type(envelope).__name__}")
    if len(envelope) > max_size:
        raise ProofError(f"envelope is {len(envelope)} bytes, over the {max_size}-byte limit")
    raw_digest = sha256_hex(bytes(envelope))
    # A byte-identical envelope that already verified: only the keys that verified it then (same
    # id, same material) count, and (4)-(6) below are judged afresh.
    remembered = cache.parsed(raw_digest) if cache is not None else None
    if remembered is not None and cache is not None:
        claims, payload_digest = remembered
        keys = [k for k in trusted.values() if (raw_digest, k.keyid, k.material) in cache]
        if keys:
            return _judge_signers(keys, claims, now, raw_digest, payload_digest)
    # (2) shape
    env = _parse_envelope(_loads(bytes(envelope), "envelope"))
    # (3) signature
    if not env.signatures:
        raise SignatureError(
            "envelope carries no signatures",
            hint="the proof was stripped or never signed; re-promote the agent",
        )
    keys = _verifying_keys(env, trusted, raw_digest, cache)
    if not keys:
        raise SignatureError(
            f"no trusted key verifies the envelope (signed by: {', '.join(env.signatures)})",
            hint="check that the signing key is in the trust list, or re-promote",
        )
    # decoded once, from the object whose signature was just checked
    claims = _parse_statement(env.payload)
    payload_digest = sha256_hex(env.payload)
    if cache is not None:
        cache.remember_parsed(raw_digest, claims, payload_digest)
    return _judge_signers(keys, claims, now, raw_digest, payload_digest)


def _judge_signers(
    keys: list[TrustedKey], claims: ProofClaims, now: datetime, raw_digest: str, payload_digest: str
) -> VerifiedProof:
    """Steps (4) to (6) for keys whose signature over the envelope verified."""
    good: list[TrustedKey] = []
    problems: list[AgovError] = []
    for key in keys:
        problem = _signer_problem(key, claims, now)
        if problem is None:
            good.append(key)
        else:
            problems.append(problem)
    if not good:
        # report revocation first: it is the stronger statement about the signer
        revoked = [p for p in problems if isinstance(p, RevokedSignerError)]
        raise revoked[0] if revoked else problems[0]
    # (6) the proof's own expiry
    if claims.expires_at is not None and now >= claims.expires_at:
        raise ExpiredProofError(
            f"proof expired at {_format_time(claims.expires_at)}",
            hint="re-promote the agent to issue a fresh proof",
        )
    return VerifiedProof(
        claims=claims,
        keyid=good[0].keyid,
        envelope_digest=raw_digest,
        payload_digest=payload_digest,
    )


# --- checks on a verified proof ---------------------------------------------------------------


def check_binding(
    verified: VerifiedProof, *, agent_id: str, version: str | int, spec_hash: str, policy_hash: str
) -> list[str]:
    """Fields where the proof does not match what is being admitted.

    ``version`` may be given as the store's integer; it is compared in its decimal form, which
    is how the subject name carries it.

    Returns:
        The names of mismatched fields, in the order agent_id, version, spec_hash,
        policy_hash; empty when the proof binds to exactly this agent version and policy.
    """
    claims = verified.claims
    expected = {
        "agent_id": agent_id,
        "version": str(version),
        "spec_hash": spec_hash,
        "policy_hash": policy_hash,
    }
    return [name for name, value in expected.items() if getattr(claims, name) != value]


def check_not_rolled_back(verified: VerifiedProof, *, newest_issued_at: datetime | None) -> None:
    """Refuse a proof older than the newest one already held for this agent version.

    Args:
        verified: the proof on offer.
        newest_issued_at: ``issued_at`` of the newest proof the store holds for the same
            agent version, or None when it holds none. An equal time is accepted, so the
            same proof can be presented again.

    Raises:
        RollbackError: the proof was issued before ``newest_issued_at``.
    """
    if newest_issued_at is None:
        return
    issued = verified.claims.issued_at
    if issued < newest_issued_at:
        raise RollbackError(
            f"proof issued at {_format_time(issued)} is older than the newest proof "
            f"held for this agent version ({_format_time(newest_issued_at)})",
            hint="present the newest proof, or re-promote the agent",
        )


# --- seals on stored proof rows ---------------------------------------------------------------


class ProofSeal:
    """HMAC-SHA256 over a stored proof row, keyed by a secret that lives beside the signing keys.

    Revalidation renews the proof on record without spending an Ed25519 verify on it (~130 µs of
    CPU per agent): it renews a row only when the row carries this seal, which only a holder of
    the secret can compute. A row written into the store by anything else (a status flipped and
    a proof row forged, or a column edited) is verified in full instead, and never re-signed on
    the strength of the store alone.

    The seal covers the columns a renewal is made from, not the envelope: a renewal signs a new
    envelope from these columns and never reads the old one, and admission verifies any envelope
    it is shown by its signature.
    """

    __slots__ = ("_secret",)
    _DOMAIN = b"agov-proof-seal/v1\n"

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) < HMAC_MIN_SECRET_BYTES:
            raise KeyMaterialError(
                f"a proof seal key is at least {HMAC_MIN_SECRET_BYTES} bytes",
                hint="remove the proof seal key file: agov writes a new one, and verifies each proof"
                " in full once before sealing it again",
            )
        self._secret = secret

    def seal(
        self,
        *,
        agent_id: str,
        version: int,
        policy_hash: str,
        spec_hash: str,
        keyid: str,
        governance_status: str,
        issued_at: str,
        expires_at: str | None,
    ) -> str:
        """The seal of one proof row: its columns as stored (the time texts too), as one JSON array."""
        columns = orjson.dumps(
            [agent_id, version, policy_hash, spec_hash, keyid, governance_status, issued_at, expires_at]
        )
        return hmac.new(self._secret, self._DOMAIN + columns, hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        return "ProofSeal(...)"
