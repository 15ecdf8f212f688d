"""Revalidation after a policy change: every governed agent, in chunks, one OPA query per chunk.

Passing agents get a fresh proof bound to the new hash, renewing the proof on record: it keeps
that proof's expiry, and an agent without a current proof for its version, or whose proof has
expired, is invalidated instead (only a promotion issues a first proof or a later expiry).
Failing agents are invalidated with their reasons; invalidated agents that pass again are
restored. Each chunk commits in one transaction together with the run's cursor, so a run killed
at any point resumes without losing or duplicating a record. A proof is renewed only from a row
agov wrote: it carries agov's seal, or its envelope verifies in full (see ``_unvouched``).

A run records the org limits it judges with (``org_digest``): when those in ``agov.yaml`` change,
a reload re-judges every agent under the same policy hash (see ``Engine.reload_policy``).
"""

from __future__ import annotations

import hmac
import json
import threading
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import orjson

from agov import keyring
from agov.config import MAX_SPEC_BYTES, Config
from agov.decisions import Code, PolicyVerdict, Reason, Status, parse_verdict
from agov.errors import AgovError, ConflictError, DecisionError, InfrastructureError, KeyMaterialError
from agov.hashing import canonical_json, sha256_hex
from agov.opa.evaluator import EncodedInput, Evaluator
from agov.promotion import ProofTarget, SignedProof, sign_for, store_proofs
from agov.proofs import ProofSeal, ProofSigner, TrustedKey, check_binding, verify_proof
from agov.store import Store
from agov.store.sqlite import Tx, blob_text, iso, parse_iso

REVALIDATION_PATH = "agov/revalidation/results"
# what the policy finds wrong with its own answers on a chunk (see revalidation.rego)
TRIAL_FAILURES_PATH = "agov/revalidation/trial_failures"
REVALIDATION_ACTOR = "agov-revalidation"
_TAMPERED = PolicyVerdict(
    False,
    (
        Reason(
            "REVALIDATION_SPEC_HASH_MISMATCH",
            "the stored spec does not hash to its recorded spec hash: it was changed outside agov",
        ),
    ),
)
_NO_VERSION = PolicyVerdict(
    False,
    (
        Reason(
            "REVALIDATION_SPEC_UNREADABLE",
            "the agent's current version has no stored spec: its version row was removed outside agov",
        ),
    ),
)
_UNREADABLE = PolicyVerdict(
    False,
    (
        Reason(
            "REVALIDATION_SPEC_UNREADABLE",
            "the stored spec is not one JSON object: it was changed outside agov, with its spec hash",
        ),
    ),
)
_NO_PROOF = Reason(
    "REVALIDATION_PROOF_MISSING",
    "no current proof on record for this version; revalidation renews proofs, it does not issue"
    " a first one: promote the agent again",
)
_GOVERNED = (Status.GOVERNED_VALID.value, Status.GOVERNED_RESTRICTED.value, Status.GOVERNED_INVALIDATED.value)
_GOVERNED_PARAMS = "(" + ",".join("?" * len(_GOVERNED)) + ")"  # SQL: `status IN` these, bound to _GOVERNED


@dataclass
class RevalidationReport:
    policy_hash: str
    dry_run: bool
    run_id: int | None = None
    resumed: bool = False
    total: int = 0
    valid: int = 0
    restricted: int = 0
    invalidated: int = 0
    newly_invalidated: int = 0
    restored: int = 0
    # agents whose status changed (up to _CHANGES_KEPT; the rest are counted): in a run that was
    # resumed, those this process changed
    changes: list[dict[str, Any]] = field(default_factory=list)
    changes_omitted: int = 0

    def note_change(self, row: _Row, verdict: PolicyVerdict) -> None:
        if len(self.changes) < _CHANGES_KEPT:
            self.changes.append(_change(row, verdict))
        else:  # not even built: a run that fells 100k agents would build 100k
            self.changes_omitted += 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_CHANGES_KEPT = 1000  # a policy that fells a whole fleet must not fill memory with its reasons


@dataclass(frozen=True)
class _Row:
    agent_id: str
    version: int
    spec_hash: str
    row_version: int
    status: str
    canonical: bytes  # the stored RFC 8785 spec: checked to be one JSON object, then sent as is
    has_proof: bool  # a current proof on record for this version and spec hash
    proof_expires_at: datetime | None  # that proof's expiry, which a renewed proof keeps
    stored: _StoredProof | None = None  # that proof's row, when there is one
    version_row_gone: bool = False  # the agent's current version has no row (spec_hash is "")
    read_after_seq: int = 0  # the newest audit event when it was read: later ones changed it


@dataclass(frozen=True)
class _StoredProof:
    """The current proof row's id, and the columns its seal covers as stored."""

    row_id: int
    policy_hash: str
    keyid: str
    governance_status: str
    issued_at: str
    expires_at: str | None
    seal: str | None


@dataclass(frozen=True)
class ProofVouching:
    """How a run tells the proof rows agov wrote (they carry its seal) from any other row, which
    it verifies in full against the workspace's keys before renewing it."""

    seal: ProofSeal
    trusted_key: Callable[[str], TrustedKey | None]


@dataclass(frozen=True)
class OrgChange:
    """Who judges the fleet again because the org limits changed, and why: audited as
    ``ORG_LIMITS_CHANGED`` in the transaction that opens (or restarts) the run that does it."""

    actor: str
    reason: str
    previous_digest: str | None  # the limits the last finished run judged with


# An agent with its current spec and current proof row. Columns are read as BLOB and decoded per
# row (blob_text), so that one damaged row cannot stop every run at its chunk.
_ROWS_SQL = (
    "SELECT a.id, a.current_version, a.row_version, a.status,"
    " CAST(v.spec AS BLOB) AS spec, CAST(v.spec_hash AS BLOB) AS spec_hash,"
    " p.version AS proof_version, CAST(p.spec_hash AS BLOB) AS proof_spec_hash,"
    " CAST(p.expires_at AS BLOB) AS proof_expires_at, CAST(p.policy_hash AS BLOB) AS proof_policy_hash,"
    " CAST(p.keyid AS BLOB) AS proof_keyid, CAST(p.governance_status AS BLOB) AS proof_status,"
    " CAST(p.issued_at AS BLOB) AS proof_issued_at, p.id AS proof_row_id, CAST(p.seal AS BLOB) AS proof_seal"
    " FROM agents a"
    # LEFT: an agent whose version row is gone is judged (invalidated), not silently skipped
    " LEFT JOIN agent_versions v ON v.agent_id = a.id AND v.version = a.current_version"
    " LEFT JOIN agent_proofs p ON p.agent_id = a.id AND p.superseded_at IS NULL"
)


def _chunk(store: Store, after: str, size: int) -> list[_Row]:
    newest = store.query_one("SELECT COALESCE(MAX(seq), 0) AS seq FROM audit_events")
    seq = int(newest["seq"]) if newest is not None else 0
    rows = store.query(
        _ROWS_SQL
        # `+a.status`: walk the primary key from the cursor instead of sorting every governed row
        # per chunk (which made each chunk slower as the store grew).
        + f" WHERE +a.status IN {_GOVERNED_PARAMS} AND a.id > ? ORDER BY a.id LIMIT ?",
        (*_GOVERNED, after, size),
    )
    chunk: list[_Row] = []
    spec_bytes = 0
    for r in rows:
        row = _row(r, seq)
        spec_bytes += len(row.canonical)
        if chunk and spec_bytes > _CHUNK_SPEC_BYTES:
            break  # the rest is read again as the next chunk
        chunk.append(row)
    return chunk


def _row(r: Any, read_after_seq: int = 0) -> _Row:
    gone = r["spec_hash"] is None  # LEFT JOIN: no version row (the column itself is NOT NULL)
    spec_hash = "" if gone else blob_text(r["spec_hash"])
    proof_expires = blob_text(r["proof_expires_at"])
    has_proof = r["proof_version"] == r["current_version"] and blob_text(r["proof_spec_hash"]) == spec_hash
    try:
        expires_at = parse_iso(proof_expires)
        if expires_at is not None and expires_at.utcoffset() is None:
            raise ValueError("no UTC offset")
    except (TypeError, ValueError):  # an expiry agov never wrote: no proof it can renew
        has_proof, expires_at = False, None
    spec = r["spec"]
    return _Row(
        r["id"],
        r["current_version"],
        spec_hash,
        r["row_version"],
        r["status"],
        spec if isinstance(spec, bytes) else b"",  # checked against the spec hash before any use
        has_proof,
        expires_at,
        _StoredProof(
            r["proof_row_id"],
            blob_text(r["proof_policy_hash"]),
            blob_text(r["proof_keyid"]),
            blob_text(r["proof_status"]),
            blob_text(r["proof_issued_at"]),
            proof_expires,
            blob_text(r["proof_seal"]),
        )
        if has_proof
        else None,
        gone,
        read_after_seq,
    )


def trial_input(
    store: Store, size: int, org_canonical: bytes, policy_hash: str, now: datetime
) -> bytes | None:
    """The first ``size`` governed agents whose stored spec is intact, as a revalidation under
    ``policy_hash`` would send them to OPA (in one chunk, or in several for a small fleet), or
    None when there is none: a reload runs the candidate policy on them before it switches
    (``agov.bundle.Trial``)."""
    rows = _chunk(store, "", size)
    unsent = _judged_without_opa(rows)
    intact = [r for r in rows if r.agent_id not in unsent]
    return _chunk_input(intact, org_canonical, policy_hash, now).json if intact else None


def _chunk_input(rows: list[_Row], org_canonical: bytes, policy_hash: str, now: datetime) -> EncodedInput:
    """``{"agents": [{"id", "agent"}...], "org", "policy_hash", "now"}``, assembled from stored bytes."""
    agents = b",".join(b'{"id":' + orjson.dumps(r.agent_id) + b',"agent":' + r.canonical + b"}" for r in rows)
    return EncodedInput(
        b'{"agents":['
        + agents
        + b'],"org":'
        + org_canonical
        + b',"policy_hash":'
        + orjson.dumps(policy_hash)
        + b',"now":'
        + orjson.dumps(iso(now))
        + b"}"
    )


# A chunk's verdicts by agent id, OPA's decision id, and the time the chunk was judged at
_Judged = tuple[dict[str, PolicyVerdict], str | None, datetime]


def _judged_without_opa(rows: list[_Row]) -> dict[str, PolicyVerdict]:
    """The verdicts of the rows whose stored spec is never sent to OPA: no version row, bytes
    edited outside agov, too large, or not one JSON object."""
    # A spec whose stored bytes no longer hash to the recorded spec hash was edited outside
    # agov: it is invalidated, and its bytes are never spliced into the input.
    verdicts = {r.agent_id: _NO_VERSION for r in rows if r.version_row_gone}
    tampered = {r.agent_id for r in rows if sha256_hex(r.canonical) != r.spec_hash}
    verdicts |= {agent_id: _TAMPERED for agent_id in tampered - set(verdicts)}
    for r in rows:
        if r.agent_id in verdicts:
            continue
        if len(r.canonical) > _CHUNK_SPEC_BYTES:  # agov refuses such a spec (limits.max_spec_bytes)
            verdicts[r.agent_id] = PolicyVerdict(
                False,
                (
                    Reason(
                        "REVALIDATION_SPEC_UNREADABLE",
                        f"the stored spec is {len(r.canonical)} bytes, more than one revalidation query"
                        f" carries ({_CHUNK_SPEC_BYTES}): it was changed outside agov",
                    ),
                ),
            )
        elif not _one_json_object(r.canonical):
            # Bytes that hash right but are not one JSON object (edited outside agov together
            # with the hash) would be spliced into the input unparsed: they could break it, or
            # rewrite it (another "agents" key) so that another agent is judged on other bytes.
            verdicts[r.agent_id] = _UNREADABLE
    return verdicts


def _verdicts(
    evaluator: Evaluator,
    rows: list[_Row],
    org_canonical: bytes,
    policy_hash: str,
    now: datetime,
    timeout_s: float,
) -> _Judged:
    verdicts = _judged_without_opa(rows)
    intact = [r for r in rows if r.agent_id not in verdicts]
    evaluation = evaluator.evaluate(
        REVALIDATION_PATH,
        _chunk_input(intact, org_canonical, policy_hash, now),
        expected_revision=policy_hash,
        timeout_s=timeout_s,
    )
    results = evaluation.result
    if not isinstance(results, dict):
        raise DecisionError(f"revalidation results are not an object: {type(results).__name__}")
    for row in intact:
        try:
            verdict = parse_verdict(results.get(row.agent_id), f"verdict for {row.agent_id}")
        except DecisionError as exc:
            # One agent without a usable verdict is invalidated, never waved through.
            verdicts[row.agent_id] = PolicyVerdict(False, (Reason("REVALIDATION_NO_VERDICT", exc.message),))
        else:
            verdicts[row.agent_id] = _renewable(row, verdict, now)
    return verdicts, evaluation.decision_id, now


def _one_json_object(document: bytes) -> bool:
    try:
        return isinstance(orjson.loads(document), dict)
    except orjson.JSONDecodeError:
        return False


def _renewable(row: _Row, verdict: PolicyVerdict, now: datetime) -> PolicyVerdict:
    """``verdict``, unless it allows an agent whose proof on record cannot be renewed: an
    agent with no current proof for its version (its status was set outside a promotion), or
    with an expired one. Such an agent is invalidated; a promotion can govern it again."""
    if not verdict.allow:
        return verdict
    if not row.has_proof:
        return PolicyVerdict(False, (_NO_PROOF,))
    if row.proof_expires_at is not None and row.proof_expires_at <= now:
        expired = Reason(
            "REVALIDATION_PROOF_EXPIRED",
            f"its proof expired at {iso(row.proof_expires_at)}; revalidation does not extend a proof,"
            " promote the agent again",
        )
        return PolicyVerdict(False, (expired,))
    return verdict


def _vouched(
    store: Store, rows: list[_Row], verdicts: dict[str, PolicyVerdict], vouching: ProofVouching, now: datetime
) -> dict[str, PolicyVerdict]:
    """``verdicts``, with each agent they allow invalidated when its proof row is not one agov
    wrote: renewing it would sign, on the strength of a row in agov.db alone, an approval that
    no promotion gave."""
    vouched = dict(verdicts)
    for row in rows:
        if vouched[row.agent_id].allow:
            problem = _unvouched(store, row, vouching, now)
            if problem is not None:
                vouched[row.agent_id] = PolicyVerdict(
                    False, (Reason("REVALIDATION_PROOF_UNVERIFIED", problem + "; promote the agent again"),)
                )
    return vouched


def _unvouched(store: Store, row: _Row, vouching: ProofVouching, now: datetime) -> str | None:
    """Why ``row``'s proof may not be renewed, or None: its row carries agov's seal, or its envelope
    verifies against the workspace's keys and binds what the row says. Rows without the seal are
    those written before seals, or under a seal key since replaced, or outside agov."""
    proof = row.stored
    if proof is None:  # _renewable lets no agent without a current proof through; be sure
        return "no current proof row"
    if _sealed(vouching.seal, row, proof):
        return None
    unsealed = "its proof row does not carry agov's seal"
    # read only now: a sealed row's envelope is never read (the renewal signs a new one)
    stored = store.query_one(
        "SELECT CAST(envelope AS BLOB) AS envelope FROM agent_proofs WHERE id = ?", (proof.row_id,)
    )
    if stored is None:
        return f"{unsealed}, and it was removed during the revalidation"
    try:
        key = vouching.trusted_key(proof.keyid)
        if key is None:
            return f"{unsealed}, and its signer {proof.keyid[:12]} is not a key of this workspace"
        verified = verify_proof(_as_bytes(stored["envelope"]), {key.keyid: key}, now)
    except InfrastructureError:  # the store failed, not the proof: the run stops and resumes
        raise
    except AgovError as exc:
        return f"{unsealed}, and the proof does not verify: {exc.message}"
    except (TypeError, ValueError) as exc:  # a column agov never wrote (its key id, say)
        return f"{unsealed}, and the proof does not verify: {type(exc).__name__}: {exc}"
    mismatched = check_binding(
        verified,
        agent_id=row.agent_id,
        version=row.version,
        spec_hash=row.spec_hash,
        policy_hash=proof.policy_hash,
    )
    if verified.claims.expires_at != row.proof_expires_at:
        mismatched.append("expires_at")  # a renewal keeps the expiry, so it must be the signed one
    if mismatched:
        return f"{unsealed}, and its signed {', '.join(mismatched)} differ from the row's"
    return None


def _sealed(seal: ProofSeal, row: _Row, proof: _StoredProof) -> bool:
    """Whether the row carries agov's seal over the columns it holds now."""
    try:
        expected = seal.seal(
            agent_id=row.agent_id,
            version=row.version,
            policy_hash=proof.policy_hash,
            spec_hash=row.spec_hash,
            keyid=proof.keyid,
            governance_status=proof.governance_status,
            issued_at=proof.issued_at,
            expires_at=proof.expires_at,
        )
    except TypeError:  # a column of a type agov never writes (bytes, say): not a row it sealed
        return False
    found = proof.seal
    return isinstance(found, str) and found.isascii() and hmac.compare_digest(found, expected)


def _as_bytes(value: Any) -> bytes:
    """An envelope read as BLOB; NULL (which no agov row holds) is no envelope."""
    return value if isinstance(value, bytes) else b""


def _judged_chunks(
    store: Store,
    evaluator: Evaluator,
    cursor: str,
    size: int,
    org_canonical: bytes,
    policy_hash: str,
    now_fn: Callable[[], datetime],
    timeout_s: float,
) -> Generator[tuple[list[_Row], _Judged], None, None]:
    """The chunks after ``cursor`` with their verdicts, in cursor order whatever order OPA
    answers in. ``_QUERIES_IN_FLIGHT`` chunk queries run while the caller works on the chunk it
    was given. Reading ahead is safe: chunks are disjoint, and every write checks the row it read.
    """
    queued: deque[tuple[list[_Row], Future[_Judged]]] = deque()
    after: str | None = cursor  # None once every chunk is queued
    remaining = _governed_after(store, cursor)  # a sizing hint: agents may come and go meanwhile

    def top_up() -> None:
        nonlocal after, remaining
        while after is not None and len(queued) < _QUERIES_IN_FLIGHT:
            ahead = _chunk(store, after, _chunk_size(size, remaining))
            if not ahead:
                after = None
                return
            after = ahead[-1].agent_id
            remaining -= len(ahead)
            judged = _in_background(
                _verdicts, evaluator, ahead, org_canonical, policy_hash, now_fn(), timeout_s
            )
            queued.append((ahead, judged))

    top_up()
    while queued:
        rows, pending = queued.popleft()
        judged = pending.result()
        top_up()
        yield rows, judged


def _governed_after(store: Store, cursor: str) -> int:
    """How many governed agents sort after ``cursor``."""
    counted = store.query_one(
        f"SELECT COUNT(*) AS n FROM agents WHERE status IN {_GOVERNED_PARAMS} AND id > ?",
        (*_GOVERNED, cursor),
    )
    return int(counted["n"]) if counted is not None else 0


def _chunk_size(size: int, remaining: int) -> int:
    """The agents the next chunk takes at most: ``size``, until fewer than ``_TAIL_SPLIT`` chunks
    of it remain; from there a share of the rest, down to ``_TAIL_CHUNK_MIN`` (or ``size``, if
    smaller)."""
    return max(min(size, _TAIL_CHUNK_MIN), min(size, remaining // _TAIL_SPLIT))


def _in_background(fn: Callable[..., _Judged], *args: Any) -> Future[_Judged]:
    """Run ``fn(*args)`` on a daemon thread. After an error nobody waits for a query still in
    flight, not even the interpreter at exit: it ends by its own deadline, and its verdicts are
    never applied."""
    future: Future[_Judged] = Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # handed to the caller through the future
            future.set_exception(exc)

    threading.Thread(target=run, name="agov-revalidate", daemon=True).start()
    return future


def org_digest(org_canonical: bytes) -> str:
    """What a run records of the org limits it judges with: SHA-256 of their RFC 8785 form."""
    return sha256_hex(org_canonical)


def judged_org(store: Store, policy_hash: str) -> str | None:
    """The org digest of the last finished run under ``policy_hash``: the org limits every
    governed agent was last judged with (None when no run recorded one)."""
    row = store.query_one(
        "SELECT org_digest FROM revalidation_runs WHERE policy_hash = ? AND finished_at IS NOT NULL"
        " ORDER BY id DESC",
        (policy_hash,),
    )
    return None if row is None else row["org_digest"]


def record_empty_run(tx: Tx, policy_hash: str, org_canonical: bytes, now: datetime) -> None:
    """A finished run over no agent: what a new workspace's first policy and org limits judged."""
    tx.execute(
        "INSERT INTO revalidation_runs (policy_hash, started_at, finished_at, org_digest) VALUES (?, ?, ?, ?)",
        (policy_hash, iso(now), iso(now), org_digest(org_canonical)),
    )


def unfinished_run_digest(store: Store, policy_hash: str) -> tuple[bool, str | None]:
    """Whether ``policy_hash`` has an unfinished run, and the org digest it judges with (None
    for a run opened without one that has not judged anything yet: an activation by
    ``agov policy build``, or an older agov's)."""
    row = store.query_one(
        "SELECT org_digest FROM revalidation_runs WHERE policy_hash = ? AND finished_at IS NULL ORDER BY id DESC",
        (policy_hash,),
    )
    return (False, None) if row is None else (True, row["org_digest"])


def unfinished_run(store: Store, policy_hash: str) -> bool:
    return (
        store.query_one(
            "SELECT 1 FROM revalidation_runs WHERE policy_hash = ? AND finished_at IS NULL", (policy_hash,)
        )
        is not None
    )


def _open_run(
    store: Store,
    policy_hash: str,
    previous_hash: str | None,
    org_canonical: bytes,
    now: datetime,
    org_change: OrgChange | None,
) -> tuple[int, str, bool]:
    """The run to work on: the unfinished one (opened by the activation, or interrupted), or a
    new one. An unfinished run that judged with other org limits starts again from the first
    agent, so no agent stays judged by the old limits. ``org_change`` is audited with the run."""
    org = org_digest(org_canonical)
    with store.transaction() as tx:
        active = tx.execute("SELECT hash FROM policy_versions WHERE active = 1").fetchone()
        if active is None or active[0] != policy_hash:
            # another process switched policies since the caller read the active one: activating
            # it closed the runs of the others, so a run opened now would be left unfinished
            raise ConflictError(
                f"the revalidation under {policy_hash[:12]} was not begun: another process activated"
                f" {'policy ' + str(active[0])[:12] if active else 'no policy'} meanwhile",
                hint="the run of the policy now active judges every agent; `agov revalidate` finishes it",
            )
        row = tx.execute(
            "SELECT id, cursor, org_digest FROM revalidation_runs WHERE policy_hash = ? AND finished_at IS NULL"
            " ORDER BY id DESC",
            (policy_hash,),
        ).fetchone()
        if row is None:
            cur = tx.execute(
                "INSERT INTO revalidation_runs (policy_hash, previous_hash, started_at, org_digest)"
                " VALUES (?, ?, ?, ?)",
                (policy_hash, previous_hash, iso(now), org),
            )
            run_id = int(cur.lastrowid or 0)
            if org_change is not None:
                _audit_org_change(
                    tx, org_change, run_id, policy_hash, org, org_canonical, now, restarted=False
                )
            else:  # a run no activation opened (`agov revalidate`): its row gets its own event
                tx.audit(
                    Code.REVALIDATION_STARTED,
                    actor=REVALIDATION_ACTOR,
                    policy_hash=policy_hash,
                    now=now,
                    payload={"run_id": run_id, "previous_hash": previous_hash, "org_digest": org},
                )
            return run_id, "", False
        run_id, cursor, digest = int(row[0]), str(row[1]), row[2]
        if digest == org:
            if not (cursor and _signed_by_a_revoked_key(tx, policy_hash, cursor)):
                return run_id, cursor, bool(cursor)  # resumed if it got anywhere
            # the agents before the cursor were re-signed by a key revoked since: resuming would
            # leave them on proofs no admission accepts, reported as valid by no run
            _restart_in(
                tx,
                run_id,
                policy_hash,
                "a key that signed proofs in this run was revoked before it finished",
                now,
            )
            return run_id, "", False
        tx.execute("UPDATE revalidation_runs SET org_digest = ? WHERE id = ?", (org, run_id))
        if org_change is None and digest is not None:
            # agov.yaml's limits changed since the run recorded its own (at the switch, or when
            # it began): the run's last ORG_LIMITS_CHANGED must name the limits it judges with
            since = OrgChange(
                REVALIDATION_ACTOR, "the org limits in agov.yaml changed since the run was opened", digest
            )
            _audit_org_change(tx, since, run_id, policy_hash, org, org_canonical, now, restarted=bool(cursor))
        if org_change is None and cursor:
            why = (
                "the org limits in agov.yaml changed during the run"
                if digest is not None
                else "the run recorded no org limits (begun by an agov from before they were recorded)"
            )
            _restart_in(tx, run_id, policy_hash, why, now)
            return run_id, "", False
        _reset(tx, run_id)
        if org_change is not None:
            _audit_org_change(
                tx, org_change, run_id, policy_hash, org, org_canonical, now, restarted=bool(cursor)
            )
        return run_id, "", False


def _signed_by_a_revoked_key(tx: Tx, policy_hash: str, cursor: str) -> bool:
    """Whether an agent the run has passed, and left admissible, holds its current proof under
    this policy from a key revoked since."""
    return (
        tx.execute(
            "SELECT 1 FROM agent_proofs p JOIN signing_keys k ON k.keyid = p.keyid"
            " JOIN agents a ON a.id = p.agent_id AND a.status IN (?, ?)"
            " WHERE p.superseded_at IS NULL AND p.policy_hash = ? AND p.agent_id <= ?"
            " AND k.revoked_at IS NOT NULL LIMIT 1",
            (Status.GOVERNED_VALID.value, Status.GOVERNED_RESTRICTED.value, policy_hash, cursor),
        ).fetchone()
        is not None
    )


@dataclass(frozen=True)
class RunOrg:
    """The org limits a run judges with (``org`` of agov.yaml, RFC 8785), and, when they differ
    from those of the previous policy's last run, who changed them and why."""

    canonical: bytes
    change: OrgChange | None


def audit_org_change(tx: Tx, run_org: RunOrg, run_id: int, policy_hash: str, now: datetime) -> None:
    """Audit ``run_org.change`` with the run that opens with them (``policy.mark_active``)."""
    assert run_org.change is not None
    _audit_org_change(
        tx,
        run_org.change,
        run_id,
        policy_hash,
        org_digest(run_org.canonical),
        run_org.canonical,
        now,
        restarted=False,
    )


def _audit_org_change(
    tx: Tx,
    change: OrgChange,
    run_id: int,
    policy_hash: str,
    org: str,
    org_canonical: bytes,
    now: datetime,
    *,
    restarted: bool,
) -> None:
    tx.audit(
        Code.ORG_LIMITS_CHANGED,
        actor=change.actor,
        policy_hash=policy_hash,
        now=now,
        payload={
            "reason": change.reason,
            "previous_org_digest": change.previous_digest,
            "org_digest": org,
            "org": json.loads(org_canonical),
            "run_id": run_id,
            "restarts_from_the_first_agent": restarted,
        },
    )


_SIGNER_CHANGES = 3  # a key taking over is rare: more in one chunk means something is wrong


def revalidate(
    store: Store,
    config: Config,
    evaluator: Evaluator,
    signer_loader: Callable[[], ProofSigner],
    vouching: ProofVouching,
    *,
    policy_hash: str,
    now_fn: Callable[[], datetime],
    dry_run: bool = False,
    previous_hash: str | None = None,
    progress: Callable[[int], None] | None = None,
    org_change: OrgChange | None = None,
) -> RevalidationReport:
    """Re-evaluate every governed agent under ``policy_hash``.

    Raises:
        EngineUnavailableError, DecisionError: OPA could not evaluate a chunk; the run stops at
            its last committed chunk and the next call resumes from there.
        KeyMaterialError: no key may sign (at the start: nothing is changed then; during the run:
            it stops, and is resumed from the first agent), or the run's key was revoked.
    """
    report = RevalidationReport(policy_hash=policy_hash, dry_run=dry_run)
    org_canonical = canonical_json(asdict(config.org))
    cursor = ""
    signer: ProofSigner | None = None
    if not dry_run:
        signer = signer_loader()
        report.run_id, cursor, report.resumed = _open_run(
            store, policy_hash, previous_hash, org_canonical, now_fn(), org_change
        )
        if report.resumed:
            saved = store.query_one("SELECT * FROM revalidation_runs WHERE id = ?", (report.run_id,))
            assert saved is not None
            for name in ("total", "valid", "restricted", "invalidated", "newly_invalidated", "restored"):
                setattr(report, name, int(saved[name]))
    size = config.limits.revalidation_chunk_size
    timeout_s = config.limits.revalidation_timeout_s
    # On any error the run stops at once: the queries still in flight are left to their deadline.
    chunks = _judged_chunks(store, evaluator, cursor, size, org_canonical, policy_hash, now_fn, timeout_s)
    for rows, (judged, decision_id, now) in chunks:
        verdicts = _vouched(store, rows, judged, vouching, now)
        if dry_run:
            _tally_dry(report, rows, verdicts)
        else:
            assert signer is not None and report.run_id is not None
            try:
                for attempt in range(_SIGNER_CHANGES):
                    try:
                        _apply(
                            store,
                            report,
                            cursor,
                            rows,
                            verdicts,
                            signer,
                            vouching.seal,
                            decision_id,
                            org_canonical,
                            policy_hash,
                            now,
                            now_fn,
                        )
                        break
                    except _SignerChanged as changed:
                        if attempt == _SIGNER_CHANGES - 1:
                            raise KeyMaterialError(
                                f"the proof signing key changed {_SIGNER_CHANGES} times during one chunk"
                                f" (now {changed}); the revalidation is stopped",
                                hint="run `agov revalidate` again",
                            ) from None
                        signer = signer_loader()  # the key that took over signs the rest
                cursor = rows[-1].agent_id
            except KeyMaterialError as exc:
                # the proofs this run signed so far carry a key that may no longer sign: the run
                # starts again from the first agent when it is resumed, so it re-signs them too
                _restart(store, report.run_id, policy_hash, exc, now_fn())
                raise
        if progress is not None:
            progress(len(rows))
    if not dry_run:
        assert signer is not None and report.run_id is not None
        try:
            _finish(store, report, cursor, signer, org_digest(org_canonical), policy_hash, now_fn())
        except KeyMaterialError as exc:
            _restart(store, report.run_id, policy_hash, exc, now_fn())
            raise
    return report


def _finish(
    store: Store,
    report: RevalidationReport,
    cursor: str,
    signer: ProofSigner,
    org: str,
    policy_hash: str,
    now: datetime,
) -> None:
    """Close the run, if it is still this process's to close: another process may have
    restarted it (other org limits) or closed it (another policy) after its last chunk."""
    with store.transaction() as tx:
        _still_current(tx, report.run_id, cursor, policy_hash, org, signer.keyid, now, signing=False)
        tx.execute("UPDATE revalidation_runs SET finished_at = ? WHERE id = ?", (iso(now), report.run_id))
        tx.audit(
            Code.POLICY_REVALIDATION,
            actor=REVALIDATION_ACTOR,
            policy_hash=policy_hash,
            now=now,
            payload={
                "run_id": report.run_id,
                "resumed": report.resumed,
                "total": report.total,
                "valid": report.valid,
                "restricted": report.restricted,
                "invalidated": report.invalidated,
                "newly_invalidated": report.newly_invalidated,
                "restored": report.restored,
            },
        )


def _tally(report: RevalidationReport, status: Status) -> None:
    report.total += 1
    if status is Status.GOVERNED_VALID:
        report.valid += 1
    elif status is Status.GOVERNED_RESTRICTED:
        report.restricted += 1
    else:
        report.invalidated += 1


def _change(row: _Row, verdict: PolicyVerdict) -> dict[str, Any]:
    return {
        "agent_id": row.agent_id,
        "from": row.status,
        "to": verdict.status.value,
        "deny": [r.as_dict() for r in verdict.deny],
        "warn": [r.as_dict() for r in verdict.warn],
    }


def _tally_dry(report: RevalidationReport, rows: list[_Row], verdicts: dict[str, PolicyVerdict]) -> None:
    for row in rows:
        verdict = verdicts[row.agent_id]
        _tally(report, verdict.status)
        if verdict.status.value != row.status:
            if row.status == Status.GOVERNED_INVALIDATED.value:
                report.restored += 1
            elif not verdict.allow:
                report.newly_invalidated += 1
            report.note_change(row, verdict)


def _input_digest(row: _Row, org_canonical: bytes) -> str:
    """SHA-256 of the RFC 8785 form of ``{"agent": {"agent": spec, "id": id}, "org": org}``: this
    agent's part of the chunk input, assembled from the canonical bytes the store already holds
    (keys in RFC 8785 order) instead of canonicalizing the spec again."""
    body = b'{"agent":{"agent":' + row.canonical + b',"id":' + canonical_json(row.agent_id) + b'},"org":'
    return sha256_hex(body + org_canonical + b"}")


def _renewal(
    row: _Row,
    verdict: PolicyVerdict,
    signer: ProofSigner,
    seal: ProofSeal,
    policy_hash: str,
    decision_id: str | None,
    org_canonical: bytes,
    now: datetime,
) -> SignedProof:
    """The proof that renews ``row``'s under ``policy_hash``: issued ``now``, keeping its expiry."""
    return sign_for(
        ProofTarget(row.agent_id, row.version, row.spec_hash, row.row_version),
        verdict,
        signer,
        seal,
        policy_hash=policy_hash,
        decision_id=decision_id,
        input_digest=_input_digest(row, org_canonical),
        actor=REVALIDATION_ACTOR,
        role="system",
        now=now,
        expires_at=row.proof_expires_at,
    )


def _apply(
    store: Store,
    report: RevalidationReport,
    cursor: str,
    rows: list[_Row],
    verdicts: dict[str, PolicyVerdict],
    signer: ProofSigner,
    seal: ProofSeal,
    decision_id: str | None,
    org_canonical: bytes,
    policy_hash: str,
    now: datetime,
    clock: Callable[[], datetime],
) -> None:
    """Sign, transition and commit one chunk (read after ``cursor``, where this process left the
    run), with the run's new cursor, in one transaction. ``now`` is when the chunk was judged.
    The proofs are issued when they are signed, just before the write lock is taken, and the key
    is checked under that lock at that same time: another key may have taken over since the
    chunk was judged, and a key's proofs must not be issued before its window opened. Signing
    outside the lock keeps other writers (a start renewing its own proof) waiting only for the
    commit, not for a thousand signatures."""
    now = max(now, clock())
    stamp = iso(now)
    # judged earlier, issued now: a proof that expired in between is not renewed
    renewable = {row.agent_id: _renewable(row, verdicts[row.agent_id], now) for row in rows}
    proofs = {
        row.agent_id: _renewal(
            row, renewable[row.agent_id], signer, seal, policy_hash, decision_id, org_canonical, now
        )
        for row in rows
        if renewable[row.agent_id].allow
    }
    with store.transaction() as tx:
        _still_current(
            tx, report.run_id, cursor, policy_hash, org_digest(org_canonical), signer.keyid, now, signing=True
        )
        # Agents another writer changed since the chunk was read are skipped (their proofs signed
        # above are dropped): that write (an update, a promotion under this same policy, or a
        # start renewing its proof) judged them itself. Under BEGIN IMMEDIATE nothing changes them now.
        unchanged = _unchanged(tx, rows)
        tallied = RevalidationReport(policy_hash=policy_hash, dry_run=False)
        signed: list[SignedProof] = []
        invalidated: list[tuple[Any, ...]] = []
        # judged as this run judges, though not by it: a start renewed their proofs since the
        # run read them
        for status in _renewed_at_start(tx, [r for r in rows if r.agent_id not in unchanged], policy_hash):
            _tally(tallied, Status(status))
        for row in rows:
            if row.agent_id not in unchanged:
                continue
            verdict = renewable[row.agent_id]
            if verdict.allow:
                signed.append(proofs[row.agent_id])
                if row.status == Status.GOVERNED_INVALIDATED.value:
                    tallied.restored += 1
                    _audit_restored(tx, row, verdict, policy_hash, now)
            else:
                deny = [r.as_dict() for r in verdict.deny]
                invalidated.append(
                    (
                        Status.GOVERNED_INVALIDATED.value,
                        json.dumps(deny),
                        stamp,
                        row.agent_id,
                        row.row_version,
                    )
                )
                if row.status != Status.GOVERNED_INVALIDATED.value:
                    tallied.newly_invalidated += 1
                    tx.audit(
                        Code.AGENT_INVALIDATED,
                        agent_id=row.agent_id,
                        actor=REVALIDATION_ACTOR,
                        policy_hash=policy_hash,
                        now=now,
                        payload={"deny": deny},
                    )
            _tally(tallied, verdict.status)
            if verdict.status.value != row.status:  # noted as the counts are: before the commit
                report.note_change(row, verdict)
        store_proofs(tx, signed)  # all unchanged (checked above), so it cannot refuse
        if signed:  # each renewal is a change: recorded in its own transaction, as any other
            tx.audit(
                Code.PROOFS_RENEWED,
                actor=REVALIDATION_ACTOR,
                policy_hash=policy_hash,
                now=now,
                payload={
                    "run_id": report.run_id,
                    "agents": len(signed),
                    "first": signed[0].target.agent_id,
                    "last": signed[-1].target.agent_id,
                    "keyid": signer.keyid,
                    "decision_id": decision_id,
                },
            )
        tx.executemany(
            "UPDATE agents SET status = ?, reasons = ?, row_version = row_version + 1, updated_at = ?"
            " WHERE id = ? AND row_version = ?",
            invalidated,
        )
        report.total += tallied.total
        report.valid += tallied.valid
        report.restricted += tallied.restricted
        report.invalidated += tallied.invalidated
        report.restored += tallied.restored
        report.newly_invalidated += tallied.newly_invalidated
        tx.execute(
            "UPDATE revalidation_runs SET cursor = ?, total = ?, valid = ?, restricted = ?, invalidated = ?,"
            " restored = ?, newly_invalidated = ? WHERE id = ?",
            (
                rows[-1].agent_id,
                report.total,
                report.valid,
                report.restricted,
                report.invalidated,
                report.restored,
                report.newly_invalidated,
                report.run_id,
            ),
        )


@dataclass(frozen=True)
class StartRenewal:
    """What judging one agent at its start did. ``decide_again``: its start is to be decided
    afresh, because a proof was issued here, or the agent or the run changed meanwhile (another
    writer may have judged it). ``note``: what a deny that stands should add, if anything."""

    decide_again: bool
    note: str = ""
    renewed: bool = False  # a proof was issued here


def _not_judged(why: str, *, decide_again: bool = False) -> StartRenewal:
    return StartRenewal(decide_again, f"not judged ahead of the revalidation run: {why}")


def _keeps_no_proof(row: _Row, verdict: PolicyVerdict) -> StartRenewal:
    reasons = "; ".join(f"{r.code}: {r.message}" for r in verdict.deny)
    if row.status == Status.GOVERNED_INVALIDATED.value:
        return StartRenewal(False, f"judged ahead of the revalidation run, it stays invalidated ({reasons})")
    return StartRenewal(
        False, f"judged ahead of the revalidation run, it keeps no proof ({reasons}); the run invalidates it"
    )


def ahead_of_run(store: Store, policy_hash: str, agent_id: str) -> bool:
    """Whether the open run of ``policy_hash`` has yet to judge ``agent_id``: it walks the agents
    in id order, and its cursor is the last one it committed."""
    found = store.query_one(
        "SELECT 1 FROM revalidation_runs WHERE policy_hash = ? AND finished_at IS NULL AND cursor < ?",
        (policy_hash, agent_id),
    )
    return found is not None


def renew_at_start(
    store: Store,
    evaluator: Evaluator,
    signer_loader: Callable[[], ProofSigner],
    vouching: ProofVouching,
    *,
    agent_id: str,
    org_canonical: bytes,
    policy_hash: str,
    now_fn: Callable[[], datetime],
    timeout_s: float,
) -> StartRenewal:
    """Judge one agent ahead of the open run of ``policy_hash``, because it is starting and its
    proof is still bound to an earlier policy, or it is invalidated and the run has yet to judge
    it: otherwise its start is denied until the run reaches it (seconds, for a large fleet). It is
    judged as the run judges it (the same query, org limits, verdict rules and seal check) and, if
    the policy allows it, gets the proof the run would sign, which restores an invalidated agent.
    Nothing is written otherwise: the run invalidates an agent the policy denies. The write waits
    for SQLite's lock no longer than ``timeout_s``, a decision's deadline.

    Raises:
        AgovError: OPA, the store or the keys failed; the start stays denied.
    """
    is_open, digest = unfinished_run_digest(store, policy_hash)
    if not is_open:  # or it has just closed, having judged the agent
        return _not_judged("no revalidation run is open under the active policy", decide_again=True)
    org = org_digest(org_canonical)
    if digest is None:  # opened without org limits (not by a switch), and not begun yet
        return _not_judged(
            "the run has recorded no org limits yet: it has not begun (should no process be working"
            " it, `agov revalidate` finishes it), or an older agov began it"
        )
    if digest != org:
        return _not_judged("the open revalidation run judges with other org limits than agov.yaml holds now")
    found = store.query(_ROWS_SQL + " WHERE a.id = ?", (agent_id,))
    if not found:
        return _not_judged("the agent is gone", decide_again=True)
    row = _row(found[0])
    if row.status not in _GOVERNED:
        return _not_judged(f"its status is now {row.status}", decide_again=True)
    restore = row.status == Status.GOVERNED_INVALIDATED.value
    if restore and not ahead_of_run(store, policy_hash, agent_id):
        return StartRenewal(True)  # the run has judged it (invalidated it, or restored it since)
    # (an invalidated agent's proof may be bound to this policy already: a run that invalidates
    # keeps the proof, and a rollback, or org limits changed back, brings its policy back)
    if not restore and row.stored is not None and row.stored.policy_hash == policy_hash:
        return StartRenewal(True)  # another writer renewed it since the start was decided
    judged, decision_id, now = _verdicts(evaluator, [row], org_canonical, policy_hash, now_fn(), timeout_s)
    verdict = _vouched(store, [row], judged, vouching, now)[agent_id]
    if not verdict.allow:
        return _keeps_no_proof(row, verdict)
    for _ in range(2):  # a key that took over meanwhile signs: one more try, as a run has
        signer = signer_loader()
        try:
            with store.transaction(lock_wait_s=timeout_s) as tx:
                return _renew_in(
                    tx,
                    row,
                    verdict,
                    signer,
                    vouching.seal,
                    decision_id,
                    org_canonical,
                    policy_hash,
                    org,
                    max(now, now_fn()),
                )
        except _SignerChanged:
            continue
    return _not_judged("the signing key changed twice while the agent was judged")


def _renew_in(
    tx: Tx,
    row: _Row,
    verdict: PolicyVerdict,
    signer: ProofSigner,
    seal: ProofSeal,
    decision_id: str | None,
    org_canonical: bytes,
    policy_hash: str,
    org: str,
    now: datetime,
) -> StartRenewal:
    """The write of ``renew_at_start``, under the write lock: what the run checks before it
    commits a chunk, then the renewal of this one agent, or nothing.

    Raises:
        _SignerChanged: another key signs now.
    """
    run = tx.execute(
        "SELECT id, cursor < ? FROM revalidation_runs"
        " WHERE policy_hash = ? AND finished_at IS NULL ORDER BY id DESC",
        (row.agent_id, policy_hash),
    ).fetchone()
    if run is None:  # the run judged it meanwhile, and closed
        return _not_judged("the revalidation run closed while the agent was judged", decide_again=True)
    restore = row.status == Status.GOVERNED_INVALIDATED.value
    if restore and not run[1]:  # the run has reached it meanwhile: what it decided stands
        return _not_judged("the revalidation run judged it meanwhile", decide_again=True)
    try:
        _still_current(tx, int(run[0]), None, policy_hash, org, signer.keyid, now, signing=True)
    except ConflictError:
        return _not_judged(
            "another policy was activated, or the run was restarted, while the agent was judged",
            decide_again=True,
        )
    except KeyMaterialError:  # its message speaks of the run, which this start did not stop
        return _not_judged(
            f"the signing key {signer.keyid[:12]} was revoked, or no key may sign now; `agov keys list` shows why"
        )
    if not _unchanged(tx, [row]):
        return _not_judged("the agent changed while it was judged", decide_again=True)
    verdict = _renewable(row, verdict, now)  # its proof may have expired since it was judged
    if not verdict.allow:
        return _keeps_no_proof(row, verdict)
    signed = _renewal(row, verdict, signer, seal, policy_hash, decision_id, org_canonical, now)
    store_proofs(tx, [signed])
    if restore:  # as the run audits a restore, and in the same order
        _audit_restored(tx, row, verdict, policy_hash, now, run_id=int(run[0]), at_start=True)
    tx.audit(
        Code.PROOFS_RENEWED,
        agent_id=row.agent_id,
        actor=REVALIDATION_ACTOR,
        policy_hash=policy_hash,
        now=now,
        payload={
            "run_id": int(run[0]),
            "agents": 1,
            "first": row.agent_id,
            "last": row.agent_id,
            "keyid": signer.keyid,
            "decision_id": decision_id,
            "at_start": True,
        },
    )
    return StartRenewal(True, renewed=True)


def _audit_restored(
    tx: Tx, row: _Row, verdict: PolicyVerdict, policy_hash: str, now: datetime, **more: Any
) -> None:
    tx.audit(
        Code.AGENT_RESTORED,
        agent_id=row.agent_id,
        actor=REVALIDATION_ACTOR,
        policy_hash=policy_hash,
        now=now,
        payload={"status": verdict.status.value, **more},
    )


def _restart(store: Store, run_id: int, policy_hash: str, cause: KeyMaterialError, now: datetime) -> None:
    with store.transaction() as tx:
        _restart_in(tx, run_id, policy_hash, cause.message, now)


def _reset(tx: Tx, run_id: int) -> None:
    """Send an unfinished run back to its first agent, with nothing counted."""
    tx.execute(
        "UPDATE revalidation_runs SET cursor = '', total = 0, valid = 0, restricted = 0, invalidated = 0,"
        " restored = 0, newly_invalidated = 0 WHERE id = ? AND finished_at IS NULL",
        (run_id,),
    )


def _restart_in(tx: Tx, run_id: int, policy_hash: str, why: str, now: datetime) -> None:
    """Send an unfinished run back to its first agent, and audit why."""
    _reset(tx, run_id)
    tx.audit(
        Code.POLICY_REVALIDATION,
        actor=REVALIDATION_ACTOR,
        policy_hash=policy_hash,
        now=now,
        payload={"run_id": run_id, "stopped": why, "restarts_from_the_first_agent": True},
    )


class _SignerChanged(Exception):
    """Another key took over as signer during the run (a staged key's window opened, or a key
    was generated): the run goes on with that key. Never leaves this module."""


def _still_current(
    tx: Tx,
    run_id: int | None,
    cursor: str | None,
    policy_hash: str,
    org: str,
    keyid: str,
    now: datetime,
    *,
    signing: bool,
) -> None:
    """Stop a run whose policy is no longer active (another process activated one, and closed
    this run): its proofs would be bound to a policy that no longer decides anything, and they
    could overwrite what the new policy's own run already judged. Stop it too when its signing
    key was revoked since the run began: admission refuses every proof that key signed. Before
    ``signing``, the run's key must also still be the one whose turn it is, inside its window.
    (A key whose window closed after it signed leaves its proofs valid: they were issued inside
    it.)

    Stop it also when the run's cursor is no longer where this process left it: another process
    works the same run (``agov revalidate`` beside ``serve`` finishing it), and has committed the
    chunk this one would commit again, counting its agents twice. A ``cursor`` of None is a
    writer that does not move the cursor (a start judged ahead of the run): not checked.

    Raises:
        ConflictError: the active policy changed, or the run was closed, or restarted by another
            process judging with other org limits, or moved on by another process, during the run.
        KeyMaterialError: the run's key was revoked, or no key may sign now.
        _SignerChanged: another key signs now.
    """
    key = tx.execute("SELECT revoked_at FROM signing_keys WHERE keyid = ?", (keyid,)).fetchone()
    if key is None or key[0] is not None:
        raise KeyMaterialError(
            f"proof signing key {keyid} was revoked during the revalidation; it is stopped",
            hint="run `agov keys list`; if no key is signing, run `agov keys generate`, then `agov revalidate`",
        )
    if signing:
        # a key that took over is asked about first: the run's own key may have reached the end
        # of its window exactly when the next one opened, as a planned rotation has it
        try:
            current = keyring.signer_keyid(tx, now)
        except KeyMaterialError as exc:
            raise KeyMaterialError(
                f"the revalidation is stopped: {exc.message}", hint=exc.hint or "run `agov keys list`"
            ) from exc
        if current != keyid:
            raise _SignerChanged(current)
    active = tx.execute("SELECT hash FROM policy_versions WHERE active = 1").fetchone()
    run = tx.execute(
        "SELECT finished_at, org_digest, cursor FROM revalidation_runs WHERE id = ?", (run_id,)
    ).fetchone()
    if active is None or active[0] != policy_hash or run is None or run[0] is not None or run[1] != org:
        raise ConflictError(
            f"the revalidation under {policy_hash[:12]} was stopped: another process activated a policy,"
            " closed this run, or restarted it with other org limits, while it ran",
            hint="the run of the policy now active judges every agent; `agov revalidate` finishes it",
        )
    if cursor is None:
        return
    if isinstance(run[2], str) and run[2] < cursor:  # a cursor only moves back to restart
        raise ConflictError(
            f"the revalidation under {policy_hash[:12]} was stopped: another process sent the run back"
            " to its first agent (a key that signed in it was revoked, or another key took over)",
            hint="should no process be working it, `agov revalidate` finishes it once a key may sign",
        )
    if run[2] != cursor:
        raise ConflictError(
            f"the revalidation under {policy_hash[:12]} was stopped: another process is working the"
            " same run and has moved it on, so this one leaves the run to it",
            hint="that process finishes the run; should it stop first, `agov revalidate` finishes it",
        )


def _renewed_at_start(tx: Tx, changed: list[_Row], policy_hash: str) -> list[str]:
    """The statuses of those ``changed`` rows that a start renewed under ``policy_hash`` since they
    were read, and that the proof it issued still governs. A start judges with the run's org limits (it
    checks their digest), so these count as judged; a promotion, which reads agov.yaml afresh,
    does not. Only such a start audits ``PROOFS_RENEWED`` with an agent id (a chunk's has none)."""
    if not changed:
        return []
    # The events since the read are scanned once (a range of the primary key), not once per changed
    # row: this runs under the write lock, and other writers may have added thousands meanwhile.
    since = min(row.read_after_seq for row in changed)
    renewals = {
        (r[0], r[1])
        for r in tx.execute(
            "SELECT agent_id, time FROM audit_events WHERE seq > ? AND type = ? AND policy_hash = ?"
            " AND agent_id IS NOT NULL",
            (since, Code.PROOFS_RENEWED.value, policy_hash),
        )
    }
    renewed = {agent_id for agent_id, _ in renewals}
    ids = [row.agent_id for row in changed if row.agent_id in renewed]
    statuses: list[str] = []
    for start in range(0, len(ids), _IN_BATCH):
        part = ids[start : start + _IN_BATCH]
        for status, agent_id, issued_at in tx.execute(
            "SELECT a.status, a.id, p.issued_at FROM agents a"
            " JOIN agent_proofs p ON p.agent_id = a.id AND p.superseded_at IS NULL"
            f" WHERE a.id IN ({','.join('?' * len(part))}) AND a.status IN (?, ?) AND p.policy_hash = ?",
            (*part, Status.GOVERNED_VALID.value, Status.GOVERNED_RESTRICTED.value, policy_hash),
        ):
            # the renewal that issued the current proof (audited at the time it was issued), not
            # one that a later promotion replaced
            if (agent_id, issued_at) in renewals:
                statuses.append(status)
    return statuses


def _unchanged(tx: Tx, rows: list[_Row]) -> set[str]:
    """The ids of ``rows`` whose agent still has the version and row version that was read."""
    read = {(r.agent_id, r.version, r.row_version) for r in rows}
    found: set[str] = set()
    ids = [r.agent_id for r in rows]
    for start in range(0, len(ids), _IN_BATCH):
        part = ids[start : start + _IN_BATCH]
        for r in tx.execute(
            f"SELECT id, current_version, row_version FROM agents WHERE id IN ({','.join('?' * len(part))})",
            tuple(part),
        ):
            if (r[0], r[1], r[2]) in read:
                found.add(r[0])
    return found


# Chunk queries in flight while a chunk is signed and committed. OPA evaluates one query on one
# core and takes longer per chunk than agov takes to sign and commit one: with a second query, OPA
# also uses the core agov leaves idle while it waits for verdicts (100k agents on 2 cores, three
# interleaved trials each: median 20.7 s with one query in flight, 17.6 s with two).
_QUERIES_IN_FLIGHT = 2

# The last chunks of a run are smaller (_chunk_size). OPA has nothing left to evaluate while agov
# signs and commits the last chunk, and a run of one chunk is evaluated on one core and then
# committed on one core; smaller chunks at the tail keep both cores busy to the end. Default chunk
# size, 5-7 alternating trials each: 1,000 agents 0.43 -> 0.29 s, 3,000 0.79 -> 0.70 s; at 10,000
# the difference is within the noise. The floor keeps a chunk's fixed costs (a query, a synced
# commit) small beside its agents.
_TAIL_SPLIT = 4
_TAIL_CHUNK_MIN = 64

# The spec bytes one chunk query carries at most, so that specs of a few KiB each cannot push a
# chunk of limits.revalidation_chunk_size agents over the evaluator's request limit (8 MiB) and
# stop every run. limits.max_spec_bytes may not exceed it.
_CHUNK_SPEC_BYTES = MAX_SPEC_BYTES

# SQLite's default limit on bound parameters is 32766 (999 before 3.32); stay far below either.
_IN_BATCH = 500
