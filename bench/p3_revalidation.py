"""P3: revalidation after a policy hash change, end to end, through ``Engine.revalidate()``.

Setup (not timed): a workspace whose policy P0 governs N synthetic agents, then a stricter
policy P1 (``temperature_limits.analysis`` 0.7 -> 0.4) built and made active, as a reload does
before it revalidates. The N agents are written in bulk with the rows ``create_agent`` +
``promote`` leave: ``agents`` (GOVERNED_VALID, row_version 2), ``agent_versions`` (RFC 8785 spec
and its hash) and one current ``agent_proofs`` row bound to P0. The stored envelope is one real
signed proof copied to every agent, and each row carries the seal agov would write (revalidation
checks the seal and never reads a sealed row's envelope; it re-signs). The temperature
is 0.00, 0.05, ... 0.45 by ``i % 10``, so exactly 10% of the agents exceed 0.4 and fall.

Timed: ``Engine.revalidate(previous_hash=P0)`` in a fresh process per trial (evaluate each chunk
in OPA, transition, re-sign, commit), against the naive loop ``naive_revalidate``: one HTTP
decision and one commit per agent, in turn, with the engine's own OPA client, ``sign_for`` +
``store_proofs`` and the audit chain. The two run alternately on copies of the same store. Each
trial is a child process, so its ``ru_maxrss`` is its own; one extra 100k trial runs under
``tracemalloc`` for the Python heap peak.

Goals: 100k agents <= 10 s; >= 10x the naive loop (naive measured on 10k, not extrapolated from
less).

    python bench/p3_revalidation.py [--quick] [--no-100k] [--json out.json] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import select
import subprocess
import sys
import threading
import time
import tracemalloc
from contextlib import nullcontext
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import _common as c
from agov import keyring, policy
from agov.config import Config, Limits
from agov.decisions import Code, PolicyVerdict, Reason, Status
from agov.engine import Engine
from agov.hashing import canonical_json, sha256_hex
from agov.keys import ensure_proof_seal
from agov.proofs import ProofClaims, ProofSeal, sign_proof
from agov.spec import validate_spec
from agov.store.sqlite import iso, parse_iso

REVALIDATION_PATH = "agov/revalidation/results"
TEMPERATURES = [round(0.05 * k, 2) for k in range(10)]  # 0.45 > 0.4: one agent in ten falls
STRICT_LIMIT = 0.4
START_INTERVAL_S = 0.01  # agents started during the "starts" trial: 100 a second
STARTS_AGENTS = 10_000  # the run size the "starts" trial is measured at
STARTS_PROVEN = 1_000  # the agents, from the last down, that get a proof of their own to start with
FALLING = sum(1 for t in TEMPERATURES if t > STRICT_LIMIT)


# --- setup -----------------------------------------------------------------------------------


def build_base(root: Path) -> tuple[Path, str, str]:
    """A workspace with P0 active (and its proof key) and the stricter P1 built and recorded."""
    home = root / "base"
    engine = Engine.init(home, Config(), actor=c.ACTOR)
    try:
        p0 = engine.active_policy().hash
        c.set_data_json(
            engine.workspace.policies,
            lambda d: d["temperature_limits"].__setitem__("analysis", STRICT_LIMIT),
        )
        p1 = engine.build_policy(actor=c.ACTOR, reason="bench: stricter analysis temperature").hash
        assert p1 != p0
    finally:
        engine.close()
    return home, p0, p1


def populate(home: Path, n: int, p0: str, p1: str) -> None:
    """Write ``n`` governed agents in bulk (proofs bound to P0), then activate P1."""
    engine = Engine.open(home)
    try:
        store = engine.store
        now = engine.clock()
        signer = keyring.active_signer(store, engine.workspace.keys, now)
        keyid = signer.keyid
        created, issued, expires = iso(now - timedelta(days=2)), iso(now - timedelta(days=1)), None
        if engine.config.proof_ttl_days:
            expires = iso(now - timedelta(days=1) + timedelta(days=engine.config.proof_ttl_days))
        template = c.research_agent("template", 0.0)
        # one real signed proof, copied to every agent, each row sealed as agov seals it:
        # revalidation checks a row's seal and renews it, and never reads a sealed row's envelope
        seal = ensure_proof_seal(engine.workspace.keys)
        sample = validate_spec(_agent_doc(template, 0))
        envelope = sign_proof(
            ProofClaims(
                agent_id=sample.id,
                version="1",
                spec_hash=sample.hash,
                policy_hash=p0,
                decision_id="bench-bulk",
                input_digest=sha256_hex(b"bench"),
                actor=c.ACTOR,
                role="agent_admin",
                governance_status=Status.GOVERNED_VALID.value,
                issued_at=now - timedelta(days=1),
            ),
            signer,
        )
        # what create_agent stores must be what this bulk path stores
        assert canonical_json(sample.document) == sample.canonical
        assert sha256_hex(sample.canonical) == sample.hash

        def rows() -> Any:
            for i in range(n):
                doc = _agent_doc(template, i)
                canonical = canonical_json(doc)
                yield doc["metadata"]["id"], doc, canonical.decode(), sha256_hex(canonical)

        batch: list[tuple[str, dict[str, Any], str, str]] = []
        with store.transaction() as tx:
            for row in rows():
                batch.append(row)
                if len(batch) == 5000:
                    _insert(tx, batch, p0, keyid, envelope, seal, created, issued, expires)
                    batch = []
            if batch:
                _insert(tx, batch, p0, keyid, envelope, seal, created, issued, expires)
        policy.mark_active(store, p1, event=Code.POLICY_HOTRELOAD, actor=c.ACTOR, reason="bench: P1")
    finally:
        engine.close()
    c.sqlite_checkpoint(home / "agov.db")


def _agent_doc(template: dict[str, Any], i: int) -> dict[str, Any]:
    doc = copy.deepcopy(template)
    agent_id = f"bench-agent-{i:06d}"
    doc["metadata"]["id"] = agent_id
    doc["metadata"]["name"] = f"Bench agent {i}"
    doc["spec"]["anatomy"]["reasoning"]["temperature"] = TEMPERATURES[i % len(TEMPERATURES)]
    return doc


def _insert(
    tx: Any,
    batch: list[tuple[str, dict[str, Any], str, str]],
    p0: str,
    keyid: str,
    envelope: bytes,
    seal: ProofSeal,
    created: str | None,
    issued: str | None,
    expires: str | None,
) -> None:
    tx.executemany(
        "INSERT INTO agents (id, workspace, name, type, role_class, status, current_version,"
        " sandbox_expires_at, reasons, row_version, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, 1, NULL, '[]', 2, ?, ?)",
        [
            (
                agent_id,
                doc["metadata"].get("workspace", "default"),
                doc["metadata"]["name"],
                doc["spec"]["agent_type"],
                doc["spec"]["role_class"],
                Status.GOVERNED_VALID.value,
                created,
                issued,
            )
            for agent_id, doc, _spec, _hash in batch
        ],
    )
    tx.executemany(
        "INSERT INTO agent_versions (agent_id, version, spec, spec_hash, creation_mode, source, created_by,"
        " created_at, notes) VALUES (?, 1, ?, ?, 'template', 'research-analyst', ?, ?, '')",
        [(agent_id, spec, h, c.ACTOR, created) for agent_id, _doc, spec, h in batch],
    )
    tx.executemany(
        "INSERT INTO agent_proofs (agent_id, version, policy_hash, spec_hash, envelope, keyid,"
        " governance_status, issued_at, expires_at, seal) VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                agent_id,
                p0,
                h,
                envelope,
                keyid,
                Status.GOVERNED_VALID.value,
                issued,
                expires,
                seal.seal(
                    agent_id=agent_id,
                    version=1,
                    policy_hash=p0,
                    spec_hash=h,
                    keyid=keyid,
                    governance_status=Status.GOVERNED_VALID.value,
                    issued_at=issued or "",
                    expires_at=expires,
                ),
            )
            for agent_id, _doc, _spec, h in batch
        ],
    )


# --- one trial, in a child process ------------------------------------------------------------


def naive_revalidate(engine: Engine) -> dict[str, int]:
    """The baseline: one OPA decision and one commit per agent, one after the other.

    What a first implementation would write with the engine's own parts (its OPA client, the
    same policy entry point, ``sign_for`` + ``store_proofs``, the audit chain): read every governed agent, then
    for each one parse its spec, ask OPA about it alone, and sign + commit in its own
    transaction. No chunks, no overlap between OPA and Python, no batched SQL.
    """
    from agov import keyring
    from agov.decisions import parse_verdict
    from agov.hashing import digest
    from agov.promotion import ProofTarget, sign_for, store_proofs

    evaluator = engine.evaluator()
    store = engine.store
    signer = keyring.active_signer(store, engine.workspace.keys)
    seal = ensure_proof_seal(engine.workspace.keys)
    policy_hash = engine.active_policy().hash
    org = asdict(engine.config.org)
    governed = (
        Status.GOVERNED_VALID.value,
        Status.GOVERNED_RESTRICTED.value,
        Status.GOVERNED_INVALIDATED.value,
    )
    rows = store.query(
        "SELECT a.id, a.current_version, a.row_version, a.status, v.spec, v.spec_hash,"
        " p.version AS proof_version, p.spec_hash AS proof_spec_hash, p.expires_at AS proof_expires_at,"
        " p.policy_hash AS proof_policy_hash, p.keyid, p.governance_status, p.issued_at, p.seal"
        " FROM agents a JOIN agent_versions v ON v.agent_id = a.id AND v.version = a.current_version"
        " LEFT JOIN agent_proofs p ON p.agent_id = a.id AND p.superseded_at IS NULL"
        " WHERE a.status IN (?, ?, ?) ORDER BY a.id",
        governed,
    )
    counts = {"total": 0, "valid": 0, "invalidated": 0}
    for r in rows:
        spec = json.loads(r["spec"])
        now = engine.clock()
        entry = {"id": r["id"], "agent": spec}
        answer = evaluator.evaluate(
            REVALIDATION_PATH,
            {"agents": [entry], "org": org, "policy_hash": policy_hash, "now": iso(now)},
            expected_revision=policy_hash,
        )
        verdict = parse_verdict(answer.result.get(r["id"]), f"verdict for {r['id']}")
        # the proof on record is renewed with its own expiry, if agov sealed its row, as the engine does
        expires = parse_iso(r["proof_expires_at"])
        renewable = (
            r["proof_version"] == r["current_version"]
            and r["proof_spec_hash"] == r["spec_hash"]
            and (expires is None or expires > now)
            and r["seal"]
            == seal.seal(
                agent_id=r["id"],
                version=r["proof_version"],
                policy_hash=r["proof_policy_hash"],
                spec_hash=r["proof_spec_hash"],
                keyid=r["keyid"],
                governance_status=r["governance_status"],
                issued_at=r["issued_at"],
                expires_at=r["proof_expires_at"],
            )
        )
        if verdict.allow and not renewable:
            verdict = PolicyVerdict(False, (Reason("REVALIDATION_PROOF_MISSING", "no renewable proof"),))
        with store.transaction() as tx:
            if verdict.allow:
                signed = sign_for(
                    ProofTarget(r["id"], r["current_version"], r["spec_hash"], r["row_version"]),
                    verdict,
                    signer,
                    seal,
                    policy_hash=policy_hash,
                    decision_id=answer.decision_id,
                    input_digest=digest({"agent": entry, "org": org}),
                    actor="agov-revalidation",
                    role="system",
                    now=now,
                    expires_at=expires,
                )
                store_proofs(tx, [signed])
                counts["valid"] += 1
            else:
                deny = [x.as_dict() for x in verdict.deny]
                tx.execute(
                    "UPDATE agents SET status = ?, reasons = ?, row_version = row_version + 1, updated_at = ?"
                    " WHERE id = ? AND row_version = ?",
                    (
                        Status.GOVERNED_INVALIDATED.value,
                        json.dumps(deny),
                        iso(now),
                        r["id"],
                        r["row_version"],
                    ),
                )
                tx.audit(
                    Code.AGENT_INVALIDATED,
                    agent_id=r["id"],
                    actor="agov-revalidation",
                    policy_hash=policy_hash,
                    now=now,
                    payload={"deny": deny},
                )
                counts["invalidated"] += 1
        counts["total"] += 1
    return counts


def child(args: argparse.Namespace) -> int:
    """Open the workspace copy, start its sidecar, revalidate once, print the measurements."""
    engine = Engine.open(Path(args.workspace))
    try:
        evaluator: Any = engine.evaluator()
        active = engine.active_policy().hash
        warm = c.research_agent("warm-up", 0.1)
        evaluator.evaluate(
            REVALIDATION_PATH,
            {
                "agents": [{"id": "warm-up", "agent": warm}],
                "org": asdict(engine.config.org),
                "policy_hash": active,
                "now": iso(engine.clock()),
            },
            expected_revision=active,
        )
        stages = _instrument(evaluator)
        gc.collect()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if args.tracemalloc:
            tracemalloc.start()
        opa_pid = getattr(evaluator, "pid", None)
        opa_cpu0, agov_cpu0 = _cpu_seconds(opa_pid), time.process_time()
        profiling = (
            c.profiled(f"of Engine.revalidate ({args.mode})", lines=60) if args.profile else nullcontext()
        )
        starter = None
        if args.mode == "starts":
            _own_proofs(engine, args.previous, range(max(0, args.agents - STARTS_PROVEN), args.agents))
            starter = _StarterProcess(Path(args.workspace), evaluator, args.agents)
        # the starts begin once the run has committed its first chunk: by then it has recorded the
        # org limits it judges with, which a start must match (before, it is denied, and says so)
        first_chunk = starter.start if starter is not None else None
        t0 = time.perf_counter()
        report: Any
        try:
            with profiling:
                if args.mode == "naive":
                    counts = naive_revalidate(engine)
                    # every agent starts GOVERNED_VALID, so each one invalidated is newly invalidated
                    report = SimpleNamespace(**counts, restricted=0, newly_invalidated=counts["invalidated"])
                else:
                    report = engine.revalidate(
                        previous_hash=args.previous,
                        progress=(lambda _: first_chunk()) if first_chunk else None,
                    )
            seconds = time.perf_counter() - t0
            starts = starter.stop() if starter is not None else None
        finally:
            if starter is not None:
                starter.close()
        agov_cpu, opa_cpu1 = time.process_time() - agov_cpu0, _cpu_seconds(opa_pid)
        peak = tracemalloc.get_traced_memory()[1] if args.tracemalloc else None
        if args.tracemalloc:
            tracemalloc.stop()
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        opa_hwm = _vm_hwm_kb(getattr(evaluator, "pid", None))
        bound_count = c.one(
            engine.store,
            "SELECT COUNT(*) AS n FROM agent_proofs WHERE policy_hash = ? AND superseded_at IS NULL",
            (active,),
        )["n"]
        opa_chunk = _opa_chunk_timers(engine, evaluator, active) if args.mode == "batch" else None
        if starts is not None:
            starts["renewed_at_start"] = c.one(
                engine.store,
                "SELECT COUNT(*) AS n FROM audit_events WHERE type = 'PROOFS_RENEWED'"
                " AND json_extract(payload, '$.at_start') = 1",
            )["n"]
        out = {
            "mode": args.mode,
            "stages": {k: {"seconds": v[0] / 1e9, "calls": v[1]} for k, v in stages.items()},
            "opa_chunk_timers_ms": opa_chunk,
            "seconds": seconds,
            "cpu_agov_s": agov_cpu,
            "cpu_opa_s": None if opa_cpu0 is None or opa_cpu1 is None else opa_cpu1 - opa_cpu0,
            "total": report.total,
            "valid": report.valid,
            "restricted": report.restricted,
            "invalidated": report.invalidated,
            "newly_invalidated": report.newly_invalidated,
            "proofs_bound_to_new_policy": bound_count,
            "chunk_size": engine.config.limits.revalidation_chunk_size,
            "rss_before_kb": rss_before,
            "rss_after_kb": rss_after,
            "tracemalloc_peak_bytes": peak,
            "opa_vm_hwm_kb": opa_hwm,
            "starts": starts,
            "agents": args.agents,
        }
    finally:
        engine.close()
    print(json.dumps(out))
    return 0


class _StarterProcess:
    """A ``_Starter`` in a process of its own, as a runtime admitting agents is, with its own
    Engine on the same store and the run's OPA sidecar (``opa_url``, over its Unix socket): so
    a start competes with the run for OPA, the CPU and SQLite's write lock, not for the GIL."""

    def __init__(self, workspace: Path, evaluator: Any, agents: int) -> None:
        socket = evaluator.connection.unix_socket
        self._proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--starter",
                str(workspace),
                str(socket),
                str(agents),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._stdin, self._stdout = self._proc.stdin, self._proc.stdout
        self._started = False
        ready = self._line(60)
        if ready != "ready":
            self.close()
            raise RuntimeError(f"the starter process did not start: {ready!r}")

    def _line(self, timeout_s: float) -> str:
        readable, _, _ = select.select([self._stdout], [], [], timeout_s)
        if not readable:
            raise RuntimeError(f"the starter process said nothing for {timeout_s:g} s")
        return self._stdout.readline().strip()

    def start(self) -> None:
        """Begin the starts (once; later calls do nothing)."""
        if not self._started:
            self._started = True
            self._stdin.write("go\n")
            self._stdin.flush()

    def stop(self) -> dict[str, Any]:
        self.start()  # a run too short to commit a chunk: the figures say so (n = 0)
        self._stdin.write("stop\n")
        self._stdin.flush()
        out: dict[str, Any] = json.loads(self._line(60))
        self._proc.wait(timeout=60)
        return out

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)


def starter_main(workspace: str, socket: str, agents: int) -> int:
    """The starter process: ``ready`` once warm, starts on ``go``, its figures on ``stop``."""
    with Engine.open(Path(workspace), opa_url=f"unix://{socket}") as engine:
        # warm-up without a start (any agent's would renew its proof): the store, and OPA
        active = engine.active_policy().hash
        facts: dict[str, Any] = {
            "agent_id": "warm-up",
            "status": "SANDBOX",
            "facts": {},
            "now": iso(engine.clock()),
        }
        engine.evaluator().evaluate("agov/admission/decision", facts, expected_revision=active)
        print("ready", flush=True)
        sys.stdin.readline()
        starter = _Starter(engine, agents, lowest=max(0, agents - STARTS_PROVEN))
        starter.start()
        sys.stdin.readline()
        print(json.dumps(starter.stop()), flush=True)
    return 0


def _own_proofs(engine: Engine, previous: str, indexes: range) -> None:
    """Give the agents at ``indexes`` a proof of their own, bound to ``previous`` as the bulk proof
    is (not timed): the bulk rows share one envelope, which admission rightly refuses for any
    other agent than the one it was signed for."""
    from agov.promotion import ProofTarget, sign_for, store_proofs

    now = engine.clock()
    signer = keyring.active_signer(engine.store, engine.workspace.keys, now)
    seal = ensure_proof_seal(engine.workspace.keys)
    ids = [f"bench-agent-{i:06d}" for i in indexes]
    rows = engine.store.query(
        "SELECT a.id, a.current_version, a.row_version, v.spec_hash, p.expires_at FROM agents a"
        " JOIN agent_versions v ON v.agent_id = a.id AND v.version = a.current_version"
        " JOIN agent_proofs p ON p.agent_id = a.id AND p.superseded_at IS NULL"
        f" WHERE a.id IN ({','.join('?' * len(ids))})",
        tuple(ids),
    )
    signed = [
        sign_for(
            ProofTarget(r["id"], r["current_version"], r["spec_hash"], r["row_version"]),
            PolicyVerdict(True),
            signer,
            seal,
            policy_hash=previous,
            decision_id="bench-own-proof",
            input_digest=sha256_hex(b"bench"),
            actor=c.ACTOR,
            role="agent_admin",
            now=now,
            expires_at=parse_iso(r["expires_at"]),  # the bulk proof's expiry, which a renewal keeps
        )
        for r in rows
    ]
    with engine.store.transaction() as tx:
        store_proofs(tx, signed)


class _Starter:
    """Starts agents while the run goes on, one every ``START_INTERVAL_S``, from the last id down:
    agents the run (which walks the ids upwards) has not reached yet, still holding proofs bound
    to the previous policy, down to ``lowest`` (the agents below share the bulk proof, which
    admission refuses). Each start must be decided as the new policy judges the agent."""

    def __init__(self, engine: Engine, agents: int, *, lowest: int) -> None:
        self._engine, self._agents, self._lowest = engine, agents, lowest
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-starts", daemon=True)
        self.latencies_us: list[float] = []
        self.allowed = self.expected_allowed = self.mismatched = 0
        self.codes: dict[str, int] = {}
        self.first_mismatch: list[str] | None = None  # its reasons

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._done.set()
        self._thread.join()
        lat = sorted(self.latencies_us)
        return {
            "n": len(lat),
            "p50_us": c.percentile(lat, 50) if lat else None,
            "p99_us": c.percentile(lat, 99) if lat else None,
            "max_us": lat[-1] if lat else None,
            "allowed": self.allowed,
            "expected_allowed": self.expected_allowed,
            "mismatched": self.mismatched,
            "first_mismatch": self.first_mismatch,
            "codes": self.codes,
            "interval_s": START_INTERVAL_S,
        }

    def _run(self) -> None:
        i = self._agents - 1
        while i >= self._lowest and not self._done.wait(START_INTERVAL_S):
            passes = TEMPERATURES[i % len(TEMPERATURES)] <= STRICT_LIMIT
            t0 = time.perf_counter()
            decision = self._engine.admit(f"bench-agent-{i:06d}")
            self.latencies_us.append((time.perf_counter() - t0) * 1e6)
            self.allowed += decision.allow
            self.expected_allowed += passes
            if decision.allow != passes:
                self.mismatched += 1
                self.first_mismatch = self.first_mismatch or [r.message for r in decision.reasons]
            self.codes[decision.code] = self.codes.get(decision.code, 0) + 1
            i -= 1


def _instrument(evaluator: Any) -> dict[str, list[int]]:
    """Wrap the stages of a revalidation with wall-clock counters (about 1 µs per call).

    Only names that exist are wrapped, so the bench survives refactors of the engine.
    """
    from agov import promotion, revalidation
    from agov.store import sqlite as store_sqlite

    totals: dict[str, list[int]] = {}

    def wrap(owner: Any, attr: str, label: str) -> None:
        inner = getattr(owner, attr, None)
        if inner is None:
            return
        slot = totals.setdefault(label, [0, 0])

        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter_ns()
            try:
                return inner(*a, **k)
            finally:
                slot[0] += time.perf_counter_ns() - t0
                slot[1] += 1

        setattr(owner, attr, timed)

    wrap(revalidation, "_chunk", "read chunk: SQL, stored spec bytes (_chunk)")
    wrap(revalidation, "_verdicts", "OPA chunk query + verdict parsing (_verdicts)")
    wrap(evaluator, "evaluate", "  of which evaluator.evaluate (HTTP, OPA eval, JSON)")
    wrap(revalidation, "_apply", "transition + re-sign + commit (_apply)")
    wrap(revalidation, "_unchanged", "  re-read row versions under the write lock (_unchanged)")
    wrap(revalidation, "sign_for", "  sign_for (claims + sign_proof)")
    wrap(promotion, "sign_proof", "    of which sign_proof (statement and envelope templates + Ed25519)")
    wrap(revalidation, "store_proofs", "  store_proofs (3 executemany statements)")
    wrap(store_sqlite.Tx, "audit", "  audit events (hash-chained)")
    return totals


def _opa_chunk_timers(engine: Engine, evaluator: Any, active: str) -> dict[str, float] | None:
    """OPA's own timers (?metrics=true) for one chunk of the configured size, in ms."""

    if not getattr(evaluator, "url", ""):
        return None
    size = engine.config.limits.revalidation_chunk_size
    rows = engine.store.query("SELECT agent_id, spec FROM agent_versions ORDER BY agent_id LIMIT ?", (size,))
    payload = {
        "agents": [{"id": r["agent_id"], "agent": json.loads(r["spec"])} for r in rows],
        "org": asdict(engine.config.org),
        "policy_hash": active,
        "now": iso(engine.clock()),
    }
    body = json.dumps({"input": payload}, separators=(",", ":")).encode()
    conn = c.http_connection(evaluator, timeout=60)
    try:
        timers: dict[str, list[float]] = {}
        for _ in range(3):
            conn.request(
                "POST",
                f"/v1/data/{REVALIDATION_PATH}?metrics=true&strict-builtin-errors=true",
                body=body,
                headers={"Content-Type": "application/json"},
            )
            doc = json.loads(conn.getresponse().read())
            for name, value in (doc.get("metrics") or {}).items():
                if name.endswith("_ns"):
                    timers.setdefault(name[:-3], []).append(value / 1e6)
        out = {k: sorted(v)[len(v) // 2] for k, v in timers.items()}
        out["agents"] = float(len(rows))
        out["request_bytes"] = float(len(body))
        return out
    finally:
        conn.close()


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of process ``pid`` (all its threads), from /proc."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _vm_hwm_kb(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def trial(
    template: Path,
    scratch: Path,
    mode: str,
    p0: str,
    agents: int,
    *,
    tracemalloc_on: bool = False,
    profile: bool = False,
) -> dict[str, Any]:
    ws = c.copy_workspace(template, scratch / f"trial-{mode}-{time.monotonic_ns()}")
    try:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, str(ws), p0, str(agents)]
        if tracemalloc_on:
            cmd.append("--tracemalloc")
        if profile:
            cmd.append("--profile")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
        if profile or proc.returncode != 0:
            sys.stderr.write(proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} trial failed (exit {proc.returncode})")
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return out
    finally:
        import shutil

        shutil.rmtree(ws, ignore_errors=True)


# --- orchestration ---------------------------------------------------------------------------


def commit_sync_us(root: Path, commits: int = 200) -> dict[str, float]:
    """Median time of a one-row commit in a WAL-mode SQLite file on this disk, with the log synced
    at each commit (``synchronous=FULL``, as agov's store runs) and without (``NORMAL``),
    interleaved; and of the fsync agov makes of the audit anchor at each commit with an event."""
    import sqlite3
    import statistics

    times: dict[str, list[float]] = {"FULL": [], "NORMAL": [], "anchor": []}
    conns: dict[str, sqlite3.Connection] = {}
    for mode in ("FULL", "NORMAL"):
        conn = sqlite3.connect(root / f"sync-{mode}.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {mode}")
        conn.execute("CREATE TABLE t (x)")
        conns[mode] = conn
    for i in range(commits):
        for mode, conn in conns.items():
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t VALUES (?)", (i,))
            conn.execute("COMMIT")
            times[mode].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with open(root / "sync-anchor", "w") as out:
            out.write(f'{{"seq": {i}}}')
            out.flush()
            os.fsync(out.fileno())
        times["anchor"].append(time.perf_counter() - t0)
    for conn in conns.values():
        conn.close()
    return {mode: statistics.median(got) * 1e6 for mode, got in times.items()}


def _interleaved(batch_trials: int, naive_trials: int) -> list[str]:
    """The trials in the order they run: each mode's trials spread evenly over the run (5 and 3:
    batch naive batch batch naive batch naive batch), so that both see the same drift; where two
    fall on the same place (3 and 3), who goes first alternates."""
    slots = [((i + 0.5) / batch_trials, i % 2, "batch") for i in range(batch_trials)]
    slots += [((i + 0.5) / naive_trials, 1 - i % 2, "naive") for i in range(naive_trials)]
    return [mode for _position, _first, mode in sorted(slots)]


def run(quick: bool, with_100k: bool, do_profile: bool) -> dict[str, Any]:
    if quick:
        plan = [(200, 1, 1)]  # (agents, batch trials, naive trials)
    else:
        # five batch trials at 10k: one lasts ~1.5 s, and its spread here is +-20% (shared machine);
        # three naive ones (~15 s each), spread among them, as the machine's speed drifts over a run
        plan = [(1_000, 3, 3), (10_000, 5, 3)]
        if with_100k:
            plan.append((100_000, 1, 0))
    metrics: list[dict[str, Any]] = []
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {}
    memory: dict[str, Any] | None = None
    starts: dict[str, Any] | None = None
    setup_s: dict[int, float] = {}
    with c.tempdir("agov-bench-p3-") as root:
        base, p0, p1 = build_base(root)
        sync_us = commit_sync_us(root)
        for n, batch_trials, naive_trials in plan:
            t0 = time.perf_counter()
            template = c.copy_workspace(base, root / f"template-{n}")
            populate(template, n, p0, p1)
            setup_s[n] = time.perf_counter() - t0
            print(f"P3: {n} agents written in {setup_s[n]:.1f} s", file=sys.stderr)
            got: dict[str, list[dict[str, Any]]] = {"batch": [], "naive": []}
            for mode in _interleaved(batch_trials, naive_trials):
                got[mode].append(trial(template, root, mode, p0, n))
                _check(got[mode][-1], n)
                print(f"P3: {n} {mode}: {got[mode][-1]['seconds']:.2f} s", file=sys.stderr)
            if n == plan[-1][0]:
                memory = trial(template, root, "batch", p0, n, tracemalloc_on=True)
                _check(memory, n)
            if n == (200 if quick else STARTS_AGENTS):
                starts = trial(template, root, "starts", p0, n)
                _check(starts, n)
                print(f"P3: {n} with starts: {starts['seconds']:.2f} s", file=sys.stderr)
            if do_profile and n == (200 if quick else 10_000):
                trial(template, root, "batch", p0, n, profile=True)
            runs[n] = got
            import shutil

            shutil.rmtree(template, ignore_errors=True)

    ratios: list[dict[str, Any]] = []
    goals: list[dict[str, Any]] = []
    naive_rate: tuple[int, float] | None = None  # (agents, seconds per agent) of the largest naive run
    for n, got in runs.items():
        for mode in ("batch", "naive"):
            secs = [t["seconds"] for t in got[mode]]
            if not secs:
                continue
            secs.sort()
            label = (
                "Engine.revalidate (chunks of up to 1000)"
                if mode == "batch"
                else "naive loop (one decision + one commit per agent)"
            )
            metrics.append(
                {
                    "name": f"{label}, {n:,} agents",
                    "unit": "s",
                    "n": len(secs),
                    "p50": secs[len(secs) // 2],
                    "p99": secs[-1],
                    "max": secs[-1],
                    "min": secs[0],
                    "per_agent_us": secs[len(secs) // 2] / n * 1e6,
                    "agents": n,
                    "mode": mode,
                }
            )
        if got["batch"] and got["naive"]:
            b = sorted(t["seconds"] for t in got["batch"])[len(got["batch"]) // 2]
            v = sorted(t["seconds"] for t in got["naive"])[len(got["naive"]) // 2]
            target = (">=", 10.0) if n >= 10_000 else (None, None)
            ratios.append(c.ratio(f"naive / Engine.revalidate, {n:,} agents (same run)", v / b, *target))
            if naive_rate is None or n >= naive_rate[0]:
                naive_rate = (n, v / n)
    if 100_000 in runs and runs[100_000]["batch"]:
        s = runs[100_000]["batch"][0]["seconds"]
        goals.append(c.goal("100k agents <= 10 s", s, "<=", 10, "s"))
        if naive_rate is not None and naive_rate[0] >= 10_000:
            ratios.append(
                c.ratio(
                    f"naive rate at {naive_rate[0]:,} x 100k / Engine.revalidate 100k",
                    naive_rate[1] * 100_000 / s,
                    ">=",
                    10.0,
                )
            )
    if starts is not None and starts["starts"]["n"]:
        st = starts["starts"]
        metrics.append(
            {
                "name": f"start of an agent the run has not reached, during Engine.revalidate of "
                f"{starts['agents']:,} agents (one start every {st['interval_s'] * 1000:g} ms)",
                "unit": "µs",
                "n": st["n"],
                "p50": st["p50_us"],
                "p99": st["p99_us"],
                "max": st["max_us"],
                "mode": "starts",
            }
        )
        plain = [t["seconds"] for t in runs.get(STARTS_AGENTS if not quick else 200, {}).get("batch", [])]
        if plain:
            ratios.append(
                c.ratio(
                    f"Engine.revalidate with those starts / without, {STARTS_AGENTS if not quick else 200:,} "
                    "agents (same run)",
                    starts["seconds"] / sorted(plain)[len(plain) // 2],
                )
            )
    mem = None
    if memory is not None:
        mem = {
            "agents": memory["total"],
            "tracemalloc_peak_mb": memory["tracemalloc_peak_bytes"] / 2**20,
            "ru_maxrss_mb": memory["rss_after_kb"] / 1024,
            "ru_maxrss_before_mb": memory["rss_before_kb"] / 1024,
            "opa_vm_hwm_mb": (memory["opa_vm_hwm_kb"] or 0) / 1024,
            "seconds_under_tracemalloc": memory["seconds"],
        }
        largest = runs[max(runs)]["batch"]
        if largest:
            mem["ru_maxrss_mb_untraced"] = largest[0]["rss_after_kb"] / 1024
            mem["ru_maxrss_before_mb_untraced"] = largest[0]["rss_before_kb"] / 1024
            mem["opa_vm_hwm_mb_untraced"] = (largest[0]["opa_vm_hwm_kb"] or 0) / 1024
    result: dict[str, Any] = {
        "figure": "P3",
        "title": "revalidation after a policy hash change (evaluate, transition, re-sign, commit)",
        "quick": quick,
        "metrics": metrics,
        "ratios": ratios,
        "goals": goals,
        "memory": mem,
        "trials": {str(n): got for n, got in runs.items()},
        "starts": starts,
        "setup_seconds": {str(k): v for k, v in setup_s.items()},
        "policy": {"p0": p0, "p1": p1, "falling_fraction": FALLING / len(TEMPERATURES)},
        "notes": [
            f"Each trial is a fresh process on a copy of the same store; {FALLING}/{len(TEMPERATURES)} of the "
            "agents exceed the new temperature limit and are invalidated, the others are re-signed.",
            f"The workspace has the default limits: a chunk query's deadline is limits.revalidation_timeout_s "
            f"({Limits().revalidation_timeout_s:g} s), a single decision's limits.opa_timeout_s "
            f"({Limits().opa_timeout_s:g} s).",
            "The naive loop (naive_revalidate in this script) uses the engine's own parts: for each agent in "
            "turn it parses the stored spec, asks OPA about that agent alone over the same keep-alive client, "
            "and signs and commits in its own transaction (sign_for + store_proofs, the audit chain); no chunks, no "
            "overlap, no batched SQL.",
            "Every commit is durable, the naive loop's and the engine's: the store runs synchronous=FULL, and the "
            "audit anchor is synced after each commit with an event. On this disk, in this run, a one-row WAL commit "
            f"took {sync_us['FULL']:.0f} µs with the log synced (FULL) and {sync_us['NORMAL']:.0f} µs without "
            f"(NORMAL), and the anchor's sync {sync_us['anchor']:.0f} µs: the naive loop pays both for every agent, "
            "the engine once per chunk.",
        ],
    }
    if starts is not None and starts["starts"]["n"]:
        st = starts["starts"]
        result["notes"].append(
            f"Starts during a run ({starts['agents']:,} agents, one start every {st['interval_s'] * 1000:g} ms from "
            "the run's first commit on, from the last agent down, where the run arrives last, by Engine.admit in "
            "a process of its own on the same "
            f"store and the run's OPA sidecar): {st['allowed']} of {st['n']} allowed, exactly those the new policy "
            f"passes (mismatches: {st['mismatched']}); {st['renewed_at_start']} agents were judged ahead of the "
            "run and re-signed at their start (one single-agent revalidation query and one commit, which waits "
            "for the chunk the run may be committing). Until this was built, such a start was denied "
            "(ADMISSION_DENY_POLICY_HASH_MISMATCH) until the run reached the agent."
        )
    result["breakdown"] = _breakdown(runs)
    result["bound"] = bound(result)
    return result


def _breakdown(runs: dict[int, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Per-agent cost of each stage, from the largest batch trial and the largest naive trial."""
    rows: list[dict[str, Any]] = []
    for mode in ("batch", "naive"):
        sized = [(n, got[mode][0]) for n, got in runs.items() if got[mode]]
        if not sized:
            continue
        n, t = max(sized, key=lambda x: x[0])
        label = "Engine.revalidate" if mode == "batch" else "naive loop"
        run = f"{label}, {n:,} agents"
        rows.append(
            {"run": run, "name": "total", "per_agent_us": t["seconds"] / n * 1e6, "share": 1.0, "mode": mode}
        )
        for stage, v in t.get("stages", {}).items():
            if not v["calls"]:
                continue  # a stage this mode never runs (the naive loop has no chunks)
            rows.append(
                {
                    "run": run,
                    "name": stage,
                    "per_agent_us": v["seconds"] / n * 1e6,
                    "share": v["seconds"] / t["seconds"],
                    "calls": v["calls"],
                    "mode": mode,
                }
            )
        cores = os.cpu_count() or 1
        if t.get("cpu_opa_s") is not None:
            cpu = {
                "CPU: the agov process, all threads (of the total's wall time)": t["cpu_agov_s"],
                "CPU: the OPA sidecar": t["cpu_opa_s"],
                f"CPU: both together, spread over {cores} cores (the floor on this machine)": (
                    t["cpu_agov_s"] + t["cpu_opa_s"]
                )
                / cores,
            }
            for name, secs in cpu.items():
                rows.append(
                    {
                        "run": run,
                        "name": name,
                        "per_agent_us": secs / n * 1e6,
                        "share": secs / t["seconds"],
                        "mode": mode,
                    }
                )
        timers = t.get("opa_chunk_timers_ms")
        if timers:
            per = timers["agents"]
            for key, label2 in (
                ("timer_server_handler", "OPA handler"),
                ("timer_rego_input_parse", "  OPA input parse"),
                ("timer_rego_query_eval", "  OPA query eval"),
            ):
                if key in timers:
                    rows.append(
                        {
                            "run": run,
                            "name": f"{label2} (OPA's timer, one {int(per)}-agent chunk, separate query)",
                            "per_agent_us": timers[key] * 1000 / per,
                            "mode": mode,
                        }
                    )
    return rows


def _check(out: dict[str, Any], n: int) -> None:
    """The end state every trial must reach (an agent renewed at its start counts as judged)."""
    falling = (n // len(TEMPERATURES)) * FALLING + sum(
        1 for i in range(n % len(TEMPERATURES)) if TEMPERATURES[i] > STRICT_LIMIT
    )
    expected = {"total": n, "newly_invalidated": falling, "proofs_bound_to_new_policy": n - falling}
    starts = out.get("starts")
    if starts is not None and starts["mismatched"]:
        raise AssertionError(
            f"starts during the run were not decided as the new policy judges them: {starts}"
        )
    got = {k: out[k] for k in expected}
    if got != expected:
        raise AssertionError(f"revalidation of {n} agents ({out['mode']}) gave {got}, expected {expected}")


def bound(result: dict[str, Any]) -> str:
    """What bounds the figure, in one sentence, from its result document."""
    rows = {r["name"]: r for r in result["breakdown"] if r["mode"] == "batch"}
    total = next((r for r in result["breakdown"] if r["mode"] == "batch"), None)
    if total is None:
        return ""

    def us(prefix: str) -> float:
        return next((r["per_agent_us"] for k, r in rows.items() if k.strip().startswith(prefix)), 0.0)

    text = f"{total['run']} spends ~{total['per_agent_us']:.0f} µs per agent"
    floor = us("CPU: both together")
    if floor:
        text += (
            f", and both processes are busy: agov uses ~{us('CPU: the agov process'):.0f} µs of CPU per agent "
            f"and OPA ~{us('CPU: the OPA sidecar'):.0f} µs, so on {os.cpu_count()} cores, at these CPU costs, "
            f"the run cannot take less than ~{floor:.0f} µs per agent"
        )
    text += (
        f". In OPA (its own timers on a separate chunk query): handler ~{us('OPA handler'):.0f} µs per agent, "
        f"of which JSON input parse ~{us('OPA input parse'):.0f} and eval ~{us('OPA query eval'):.0f}; "
        f"in agov: sign and commit ~{us('transition'):.0f} µs per agent (sign_proof "
        f"~{us('of which sign_proof'):.0f}, of which Ed25519 is most; SQL ~{us('store_proofs'):.0f}). "
        "The engine keeps two chunk queries in flight while it signs and commits a third, so the stage "
        "times overlap and add up to more than the total"
    )
    naive = next((r for r in result["breakdown"] if r["mode"] == "naive"), None)
    if naive is not None:
        text += (
            f". The naive loop pays a whole OPA round trip and a commit per agent (~{naive['per_agent_us']:.0f} µs "
            "per agent), one after the other"
        )
    return text + "."


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--starter":
        return starter_main(argv[1], argv[2], int(argv[3]))
    if argv and argv[0] == "--child":
        cp = argparse.ArgumentParser()
        cp.add_argument("--child", dest="mode", choices=("batch", "naive", "starts"))
        cp.add_argument("workspace")
        cp.add_argument("previous")
        cp.add_argument("agents", type=int)
        cp.add_argument("--tracemalloc", action="store_true")
        cp.add_argument("--profile", action="store_true")
        return child(cp.parse_args(argv))
    p = c.parser(__doc__ or "")
    p.add_argument("--no-100k", action="store_true", help="skip the 100,000-agent run (minutes)")
    args = p.parse_args(argv)
    result = run(args.quick, not args.no_100k, args.profile)
    result["machine"] = c.machine()
    c.emit(result, args.json)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
