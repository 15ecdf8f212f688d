"""Proof signing keys as the workspace knows them: files (keys.py) plus their state in the store
(active signer, validity window, revocation time).

A key generated with a ``not_before`` still ahead is *staged*: the key signing now keeps
signing, and the staged key takes over once its window opens, with no step to run then. Its
public key is in the workspace from the start, so a rotation can be announced before it happens.
The ``active`` column marks the keys that take their turn as signer (the one signing, any
staged, and those a staged key has since taken over from); the signer at a given time is the one
among them that took over last, and if it was revoked or has expired, none signs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agov import keys
from agov.decisions import Code
from agov.errors import KeyMaterialError, NotFoundError, UsageError
from agov.proofs import ProofSigner
from agov.store import Store
from agov.store.sqlite import Tx, blob_text, iso, parse_iso, utcnow

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
    its proofs still verify inside its window), expired, revoked, or invalid (a row agov did not
    write)."""
    problem: str | None = None
    """Why the key's files cannot do what its state needs (sign, or verify), or None. Filled in
    by ``Engine.list_keys``, which knows the keys directory."""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


KEY_STATES = ("signing", "staged", "verifying", "expired", "revoked", "invalid")

# Text columns read as BLOB: text that is not UTF-8 (written outside agov) would fail the whole
# fetch, and with it `keys list` and `keys generate`, the way out.
_KEY_ROWS = (
    "SELECT rowid, CAST(keyid AS BLOB) AS keyid, CAST(alg AS BLOB) AS alg,"
    " CAST(created_at AS BLOB) AS created_at, CAST(not_before AS BLOB) AS not_before,"
    " CAST(not_after AS BLOB) AS not_after, CAST(revoked_at AS BLOB) AS revoked_at,"
    " CAST(revoke_reason AS BLOB) AS revoke_reason, active FROM signing_keys"
)


@dataclass(frozen=True)
class _KeyRow:
    rowid: int
    keyid: str
    alg: str
    created_at: str
    not_before: str | None
    not_after: str | None
    revoked_at: str | None
    revoke_reason: str | None
    designated: bool
    """``active`` in the store: the key takes its turn as signer when its window opens, and
    keeps it until a key takes over after it (revoked or not) or a key generated for now, or its
    own revocation while still staged, retires it."""


def _read(rows: list[Any]) -> list[_KeyRow]:
    return [
        _KeyRow(
            rowid=row["rowid"],
            keyid=blob_text(row["keyid"]),
            alg=blob_text(row["alg"]),
            created_at=blob_text(row["created_at"]),
            not_before=blob_text(row["not_before"]),
            not_after=blob_text(row["not_after"]),
            revoked_at=blob_text(row["revoked_at"]),
            revoke_reason=blob_text(row["revoke_reason"]),
            designated=row["active"] == 1,
        )
        for row in rows
    ]


def _states(rows: list[_KeyRow], now: datetime) -> list[KeyState]:
    try:
        signer: _KeyRow | None = _signer_row(rows, now)
    except KeyMaterialError:
        signer = None
    return [_state(row, now, row is signer) for row in rows]


def _state(row: _KeyRow, now: datetime, signing: bool) -> KeyState:
    if row.revoked_at is not None:
        state = "revoked"
    elif signing:
        state = "signing"
    else:
        try:
            not_before, not_after = _window(_checked(row))
        except KeyMaterialError:
            state = "invalid"
        else:
            if not_after is not None and now > not_after:
                state = "expired"
            elif row.designated and not_before is not None and now < not_before:
                state = "staged"
            else:
                state = "verifying"
    return KeyState(
        _shown(row.keyid),
        _shown(row.alg),
        _shown(row.created_at),
        _shown(row.not_before),
        _shown(row.not_after),
        _shown(row.revoked_at),
        _shown(row.revoke_reason),
        signing,
        state,
    )


def _checked(row: _KeyRow) -> _KeyRow:
    """The row, if its key id and algorithm are ones agov writes.

    Raises:
        KeyMaterialError: they are not.
    """
    if not (isinstance(row.keyid, str) and _KEYID.fullmatch(row.keyid) and row.alg in ALGORITHMS):
        raise KeyMaterialError(
            f"a proof signing key row has a key id or algorithm agov did not write ({_shown(row.keyid)!r},"
            f" {_shown(row.alg)!r}): agov.db was changed outside agov",
            hint="run `agov keys generate` for a new key, and find out who edited agov.db",
        )
    return row


_KEYID = re.compile(r"[0-9a-f]{64}")


def _shown(value: Any) -> Any:
    """Text read from the store, printable: bytes that were not UTF-8 as backslash escapes."""
    if not isinstance(value, str):
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _window(row: _KeyRow) -> tuple[datetime | None, datetime | None]:
    """A key's validity window, with both ends timezone-aware.

    Raises:
        KeyMaterialError: a time agov did not write (not a time, or one without a UTC offset).
    """
    try:
        not_before, not_after = _aware(row.not_before), _aware(row.not_after)
    except ValueError:
        raise KeyMaterialError(
            f"the proof signing key {_shown(row.keyid)} has a validity window agov did not write"
            f" ({_shown(row.not_before)!r} to {_shown(row.not_after)!r}): agov.db was changed outside agov",
            hint="run `agov keys generate` for a new key, and find out who edited agov.db",
        ) from None
    return not_before, not_after


def _aware(text: str | None) -> datetime | None:
    """A time as agov writes it, or None.

    Raises:
        ValueError: not a time, or one without a UTC offset.
    """
    try:
        when = parse_iso(text)
        if when is None:
            return None
        if when.utcoffset() is None:
            raise ValueError(text)
        return when.astimezone(UTC)
    except (TypeError, OverflowError):  # not text; a time with no UTC form (past year 9999)
        raise ValueError(text) from None


def _start(row: _KeyRow, not_before: datetime | None) -> datetime:
    """When the key took over, or takes over, as signer: its creation, or its window's opening
    if that is later. A creation time agov did not write counts as the earliest time."""
    try:
        created = _aware(row.created_at) or _EARLIEST
    except ValueError:
        created = _EARLIEST
    return max(created, not_before or _EARLIEST)


_EARLIEST = datetime.min.replace(tzinfo=UTC)


def _pending(row: _KeyRow, now: datetime) -> bool:
    """A staged key whose window opens after ``now``, not revoked (a garbled window is not)."""
    try:
        not_before, _ = _window(row)
    except KeyMaterialError:
        return False
    return row.revoked_at is None and not_before is not None and now < not_before


def _signer_row(rows: list[_KeyRow], now: datetime) -> _KeyRow:
    """The key that signs at ``now``: of the designated keys whose window has opened, the one
    that took over last. If that key is revoked or its window has closed, none signs: an older
    key never signs again in its place.

    Raises:
        KeyMaterialError: no key may sign now, or a designated key's row is not one agov wrote.
    """
    designated = [(_checked(row), *_window(row)) for row in rows if row.designated]
    opened: list[tuple[datetime, int, _KeyRow, datetime | None]] = []
    pending: list[tuple[datetime, _KeyRow]] = []
    for row, not_before, not_after in designated:
        if not_before is None or not_before <= now:
            opened.append((_start(row, not_before), row.rowid, row, not_after))
        elif row.revoked_at is None:
            pending.append((not_before, row))
    later = ""
    if pending:
        staged = min(pending, key=lambda item: item[0])[1]
        later = f"; the staged key {staged.keyid} takes over at {staged.not_before}"
    if not opened and not pending:
        raise KeyMaterialError("no active proof signing key", hint="run `agov keys generate`")
    if not opened:
        raise KeyMaterialError(
            f"no proof signing key may sign yet{later}",
            hint="wait until then, or run `agov keys generate` for a key that signs now (the staged"
            " key still takes over at its time; `agov keys revoke` cancels it)",
        )
    _, _, row, not_after = max(opened, key=lambda item: (item[0], item[1]))
    if row.revoked_at is not None:
        raise KeyMaterialError(
            f"the proof signing key {row.keyid} was revoked at {row.revoked_at}{later}",
            hint="run `agov keys generate` for a key that signs now",
        )
    if not_after is not None and now > not_after:
        raise KeyMaterialError(
            f"the active proof signing key {row.keyid} stopped being valid at {row.not_after}{later}",
            hint="run `agov keys generate` for a key that signs now",
        )
    return row


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
                designated = _read(tx.execute(f"{_KEY_ROWS} WHERE active = 1").fetchall())
                retired = [(row.rowid,) for row in designated if not _pending(row, now)]
                tx.executemany("UPDATE signing_keys SET active = 0 WHERE rowid = ?", retired)
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
    return _states(_read(store.query(f"{_KEY_ROWS} ORDER BY rowid")), now or utcnow())


def revoke(store: Store, keyid: str, *, reason: str, actor: str, now: datetime | None = None) -> KeyState:
    """Revoke a key from ``now`` on: proofs it signed stop admitting agents at once. A revoked
    key keeps its turn as signer, so no older key signs in its stead; a staged key revoked before
    its window opens is retired, and never takes over.

    Raises:
        NotFoundError: no such key.
        UsageError: already revoked.
    """
    now = now or utcnow()
    state = get(store, keyid, now)
    if state.revoked_at:
        raise UsageError(f"key {keyid} was already revoked at {state.revoked_at}")
    with store.transaction() as tx:
        (row,) = _read(tx.execute(f"{_KEY_ROWS} WHERE keyid = ?", (keyid,)).fetchall())
        cancelled = row.designated and _pending(row, now)  # staged, not yet signing: never will
        revoked = tx.execute(
            "UPDATE signing_keys SET revoked_at = ?, revoke_reason = ?,"
            " active = CASE WHEN ? THEN 0 ELSE active END WHERE keyid = ? AND revoked_at IS NULL",
            (iso(now), reason, cancelled, keyid),
        ).rowcount
        if revoked != 1:
            raise UsageError(f"key {keyid} was revoked meanwhile", hint="`agov keys list` shows when")
        payload: dict[str, Any] = {"keyid": keyid, "reason": reason}
        if cancelled:
            payload["cancelled_staged"] = True
        tx.audit(Code.KEY_REVOKED, actor=actor, now=now, payload=payload)
    return get(store, keyid, now)


def signer_keyid(tx: Tx, now: datetime) -> str:
    """The id of the key that signs at ``now``, read in ``tx``.

    Raises:
        KeyMaterialError: no key may sign now (as active_signer).
    """
    return _signer_row(
        _read(tx.execute(f"{_KEY_ROWS} WHERE active = 1 ORDER BY rowid").fetchall()), now
    ).keyid


def active_signer(store: Store, keys_dir: Path, now: datetime | None = None) -> ProofSigner:
    """The key new proofs are signed with at ``now`` (default: the current time).

    Raises:
        KeyMaterialError: no key may sign now (none is designated, the one whose turn it is was
            revoked or its window has closed, or the next one's window has not opened yet), a
            window agov did not write, or the key's file is missing.
    """
    rows = _read(store.query(f"{_KEY_ROWS} WHERE active = 1 ORDER BY rowid"))
    return keys.load_signer(keys_dir, _signer_row(rows, now or utcnow()).keyid)
