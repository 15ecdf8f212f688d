"""Proof signing keys as the workspace knows them: files (keys.py) plus their state in the store
(active signer, validity window, revocation time)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from agov import keys
from agov.decisions import Code
from agov.errors import KeyMaterialError, NotFoundError, UsageError
from agov.proofs import ProofSigner
from agov.store import Store
from agov.store.sqlite import iso, parse_iso, utcnow

ALGORITHMS = ("ed25519", "hmac-sha256")


@dataclass(frozen=True)
class KeyState:
    keyid: str
    alg: str
    created_at: str
    not_before: str | None
    not_after: str | None
    revoked_at: str | None
    revoke_reason: str | None
    active: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _state(row: Any) -> KeyState:
    return KeyState(
        row["keyid"],
        row["alg"],
        row["created_at"],
        row["not_before"],
        row["not_after"],
        row["revoked_at"],
        row["revoke_reason"],
        bool(row["active"]),
    )


def generate(
    store: Store,
    keys_dir: Path,
    *,
    alg: str = "ed25519",
    actor: str,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    now: datetime | None = None,
) -> KeyState:
    """Create a proof key and make it the active signer (older keys still verify until revoked).

    Raises:
        UsageError: unknown algorithm or an empty validity window.
    """
    if alg not in ALGORITHMS:
        raise UsageError(f"unknown algorithm {alg!r}", hint=f"one of {', '.join(ALGORITHMS)}")
    if not_before and not_after and not_after <= not_before:
        raise UsageError("--not-after must be later than --not-before")
    now = now or utcnow()
    if not_after is not None and not_after <= now:
        # it would still replace the active signer, and sign nothing: every promotion denied
        raise UsageError(f"--not-after {not_after.isoformat()} has passed: the key could never sign")
    window = (iso(not_before), iso(not_after))  # a time that has no UTC form fails here, first
    info = keys.generate_proof_key(keys_dir, alg=alg)
    try:
        with store.transaction() as tx:
            tx.execute("UPDATE signing_keys SET active = 0 WHERE active = 1")
            tx.execute(
                "INSERT INTO signing_keys (keyid, alg, created_at, not_before, not_after, active)"
                " VALUES (?, ?, ?, ?, ?, 1)",
                (info.keyid, alg, iso(now), *window),
            )
            tx.audit(Code.KEY_GENERATED, actor=actor, now=now, payload={"keyid": info.keyid, "alg": alg})
    except BaseException:
        # never recorded: leave no key file that the store does not know
        for path in (info.private_key_path, info.public_key_path):
            if path is not None:
                path.unlink(missing_ok=True)
        raise
    return get(store, info.keyid)


def get(store: Store, keyid: str) -> KeyState:
    row = store.query_one("SELECT * FROM signing_keys WHERE keyid = ?", (keyid,))
    if row is None:
        raise NotFoundError(f"no key with id {keyid!r}", hint="`agov keys list` shows the keys")
    return _state(row)


def list_keys(store: Store) -> list[KeyState]:
    return [_state(r) for r in store.query("SELECT * FROM signing_keys ORDER BY created_at, keyid")]


def revoke(store: Store, keyid: str, *, reason: str, actor: str, now: datetime | None = None) -> KeyState:
    """Revoke a key from ``now`` on: proofs it signed stop admitting agents at once.

    Raises:
        NotFoundError: no such key.
        UsageError: already revoked.
    """
    state = get(store, keyid)
    if state.revoked_at:
        raise UsageError(f"key {keyid} was already revoked at {state.revoked_at}")
    now = now or utcnow()
    with store.transaction() as tx:
        tx.execute(
            "UPDATE signing_keys SET revoked_at = ?, revoke_reason = ?, active = 0 WHERE keyid = ?",
            (iso(now), reason, keyid),
        )
        tx.audit(Code.KEY_REVOKED, actor=actor, now=now, payload={"keyid": keyid, "reason": reason})
    return get(store, keyid)


def active_signer(store: Store, keys_dir: Path, now: datetime | None = None) -> ProofSigner:
    """The key new proofs are signed with, if it may sign at ``now`` (default: the current time).

    Raises:
        KeyMaterialError: there is no active, unrevoked key, it is outside its validity window
            (admission would refuse every proof it signs), or its file is missing.
    """
    row = store.query_one("SELECT * FROM signing_keys WHERE active = 1 AND revoked_at IS NULL")
    if row is None:
        raise KeyMaterialError("no active proof signing key", hint="run `agov keys generate`")
    now = now or utcnow()
    try:
        not_before, not_after = parse_iso(row["not_before"]), parse_iso(row["not_after"])
        early = not_before is not None and now < not_before
        late = not_after is not None and now > not_after
    except (TypeError, ValueError):  # not a time, or one without a UTC offset
        raise KeyMaterialError(
            f"the active proof signing key {row['keyid']} has a validity window agov did not write"
            f" ({row['not_before']!r} to {row['not_after']!r}): agov.db was changed outside agov",
            hint="run `agov keys generate` for a new key, and find out who edited agov.db",
        ) from None
    if early:
        raise KeyMaterialError(
            f"the active proof signing key {row['keyid']} is not valid before {row['not_before']}",
            hint="wait until then, or run `agov keys generate` for a key valid now",
        )
    if late:
        raise KeyMaterialError(
            f"the active proof signing key {row['keyid']} stopped being valid at {row['not_after']}",
            hint="run `agov keys generate` for a new key",
        )
    return keys.load_signer(keys_dir, row["keyid"])
