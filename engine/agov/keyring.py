"""Proof signing keys as the workspace knows them: files (keys.py) plus their state in the store
(active signer, validity window, revocation time).

A key generated with a ``not_before`` still ahead is *staged*: the key signing now keeps
signing, and the staged key takes over once its window opens, with no step to run then. Its
public key is in the workspace from the start, so a rotation can be announced before it happens.
The ``active`` column marks the keys that may sign (the one signing and any staged); the signer
at a given time is the one among them whose window opened last."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
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
    """True for the key that signs new proofs now."""
    state: str
    """One of KEY_STATES: signing, staged (signs from not_before on), verifying (signs no more;
    its proofs still verify inside its window), expired, or revoked."""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


KEY_STATES = ("signing", "staged", "verifying", "expired", "revoked")


def _states(rows: list[Any], now: datetime) -> list[KeyState]:
    try:
        signer = _signer_row(rows, now)
    except KeyMaterialError:
        signer = None
    return [_state(row, now, signer is not None and row["keyid"] == signer["keyid"]) for row in rows]


def _state(row: Any, now: datetime, signing: bool) -> KeyState:
    if row["revoked_at"] is not None:
        state = "revoked"
    elif signing:
        state = "signing"
    else:
        try:
            not_before, not_after = _window(row)
        except KeyMaterialError:
            not_before = not_after = None
        if not_after is not None and now > not_after:
            state = "expired"
        elif row["active"] and not_before is not None and now < not_before:
            state = "staged"
        else:
            state = "verifying"
    return KeyState(
        row["keyid"],
        row["alg"],
        row["created_at"],
        row["not_before"],
        row["not_after"],
        row["revoked_at"],
        row["revoke_reason"],
        signing,
        state,
    )


def _window(row: Any) -> tuple[datetime | None, datetime | None]:
    """A key row's validity window, with both ends timezone-aware.

    Raises:
        KeyMaterialError: a time agov did not write (not a time, or one without a UTC offset).
    """
    try:
        not_before, not_after = parse_iso(row["not_before"]), parse_iso(row["not_after"])
        for end in (not_before, not_after):
            if end is not None and end.utcoffset() is None:
                raise ValueError("no UTC offset")
    except (TypeError, ValueError):
        raise KeyMaterialError(
            f"the proof signing key {row['keyid']} has a validity window agov did not write"
            f" ({row['not_before']!r} to {row['not_after']!r}): agov.db was changed outside agov",
            hint="run `agov keys generate` for a new key, and find out who edited agov.db",
        ) from None
    return not_before, not_after


def _staged(row: Any, now: datetime) -> bool:
    """The key's window opens after ``now`` (a garbled window counts as not staged)."""
    try:
        not_before, _ = _window(row)
    except KeyMaterialError:
        return False
    return not_before is not None and now < not_before


def _signer_row(rows: list[Any], now: datetime) -> Any:
    """The row of the key that signs at ``now``: of the active, unrevoked keys whose window has
    opened, the one that opened last (its not_before, else its creation time).

    Raises:
        KeyMaterialError: no such key, a window agov did not write, or the signer's window has
            closed (admission would refuse every proof it signs).
    """
    candidates = [(row, *_window(row)) for row in rows if row["active"] and row["revoked_at"] is None]
    if not candidates:
        raise KeyMaterialError("no active proof signing key", hint="run `agov keys generate`")
    opened = [
        (not_before or _time_or_min(row["created_at"]), order, row, not_after)
        for order, (row, not_before, not_after) in enumerate(candidates)
        if not_before is None or not_before <= now
    ]
    if not opened:
        first = min(candidates, key=lambda c: c[1] or now)[0]
        raise KeyMaterialError(
            f"the active proof signing key {first['keyid']} is not valid before {first['not_before']}",
            hint="wait until then, or run `agov keys generate` for a key valid now",
        )
    _, _, row, not_after = max(opened, key=lambda item: (item[0], item[1]))
    if not_after is not None and now > not_after:
        raise KeyMaterialError(
            f"the active proof signing key {row['keyid']} stopped being valid at {row['not_after']}",
            hint="run `agov keys generate` for a new key",
        )
    return row


def _time_or_min(text: Any) -> datetime:
    """A creation time as agov writes it, or the earliest time for one it did not write."""
    try:
        when = parse_iso(text)
    except (TypeError, ValueError):
        return _EARLIEST
    return when if when is not None and when.utcoffset() is not None else _EARLIEST


_EARLIEST = datetime.min.replace(tzinfo=UTC)


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

    With ``not_before`` after ``now`` the key is staged: the signer in use keeps signing until
    then. Keys staged earlier stay staged either way.

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
    staged = not_before is not None and now < not_before
    info = keys.generate_proof_key(keys_dir, alg=alg)
    try:
        with store.transaction() as tx:
            if not staged:  # it signs from now on; keys staged for later stay staged
                retired = [
                    (row["keyid"],)
                    for row in tx.execute("SELECT * FROM signing_keys WHERE active = 1").fetchall()
                    if not _staged(row, now)
                ]
                tx.executemany("UPDATE signing_keys SET active = 0 WHERE keyid = ?", retired)
            tx.execute(
                "INSERT INTO signing_keys (keyid, alg, created_at, not_before, not_after, active)"
                " VALUES (?, ?, ?, ?, ?, 1)",
                (info.keyid, alg, iso(now), *window),
            )
            payload: dict[str, Any] = {"keyid": info.keyid, "alg": alg}
            if staged:
                payload["staged_until"] = window[0]
            tx.audit(Code.KEY_GENERATED, actor=actor, now=now, payload=payload)
    except BaseException:
        # never recorded: leave no key file that the store does not know
        for path in (info.private_key_path, info.public_key_path):
            if path is not None:
                path.unlink(missing_ok=True)
        raise
    return get(store, info.keyid, now)


def get(store: Store, keyid: str, now: datetime | None = None) -> KeyState:
    for state in list_keys(store, now):
        if state.keyid == keyid:
            return state
    raise NotFoundError(f"no key with id {keyid!r}", hint="`agov keys list` shows the keys")


def list_keys(store: Store, now: datetime | None = None) -> list[KeyState]:
    """Every key, with its state at ``now`` (default: the current time)."""
    rows = store.query("SELECT * FROM signing_keys ORDER BY created_at, rowid")
    return _states(rows, now or utcnow())


def revoke(store: Store, keyid: str, *, reason: str, actor: str, now: datetime | None = None) -> KeyState:
    """Revoke a key from ``now`` on: proofs it signed stop admitting agents at once.

    Raises:
        NotFoundError: no such key.
        UsageError: already revoked.
    """
    now = now or utcnow()
    state = get(store, keyid, now)
    if state.revoked_at:
        raise UsageError(f"key {keyid} was already revoked at {state.revoked_at}")
    with store.transaction() as tx:
        tx.execute(
            "UPDATE signing_keys SET revoked_at = ?, revoke_reason = ?, active = 0 WHERE keyid = ?",
            (iso(now), reason, keyid),
        )
        tx.audit(Code.KEY_REVOKED, actor=actor, now=now, payload={"keyid": keyid, "reason": reason})
    return get(store, keyid, now)


def active_signer(store: Store, keys_dir: Path, now: datetime | None = None) -> ProofSigner:
    """The key new proofs are signed with at ``now`` (default: the current time).

    Raises:
        KeyMaterialError: there is no active, unrevoked key whose window has opened, the signer's
            window has closed (admission would refuse every proof it signs), or its file is
            missing.
    """
    rows = store.query("SELECT * FROM signing_keys WHERE active = 1 AND revoked_at IS NULL ORDER BY rowid")
    row = _signer_row(rows, now or utcnow())
    return keys.load_signer(keys_dir, row["keyid"])
