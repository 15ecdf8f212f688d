"""R10: hot reload during 10k admissions; no decision is recorded under a hash that did not produce it.

Three threads call ``engine.admit`` in a loop while a fourth edits ``data.json`` and calls
``engine.reload_policy`` (the path ``agov serve --watch`` takes), alternating between two policy
contents: A (shipped) and B (analysis temperature <= 0.4, which invalidates the "fragile"
agents). Every decision is recorded with the wall-clock window of the call, then checked
against three independent records:

- the store's history: activation times (POLICY_HOTRELOAD audit events) and every proof row
  ever issued (``agent_proofs`` keeps superseded rows, with their times);
- OPA's own decision log (shipped by the sidecar to agov's bundle server): the bundle revision
  that evaluated each decision id;
- the reloader's own timestamps (each revalidation chunk reports when it committed).

The engine runs on a real managed sidecar built exactly as ``Engine`` builds its own, except
that its bundle server keeps every decision-log event (the default keeps 1000) and OPA ships
them every second; it is passed in with ``Engine.open(home, evaluator=...)``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from _reload_support import ACTOR, create_governed, data_file, edit_data, set_analysis_limit

from agov import keys
from agov.engine import Engine
from agov.opa.managed import ManagedConfig, ManagedSidecar
from agov.store.sqlite import parse_iso, utcnow

pytestmark = pytest.mark.integration

TARGET_DECISIONS = 10_000
RELOADS = 6  # B, A, B, A, B, A
ADMITTERS = 3
STEADY = [f"steady-{i:02d}" for i in range(8)]  # temperature 0.3: valid under A and B
FRAGILE = [f"fragile-{i:02d}" for i in range(4)]  # temperature 0.5: invalidated under B
ADMISSION_PATH = "agov/admission/decision"
FOREVER = datetime.max.replace(tzinfo=utcnow().tzinfo)


@dataclass(frozen=True)
class Record:
    agent_id: str
    started: datetime
    ended: datetime
    allow: bool
    code: str
    policy_hash: str | None
    decision_id: str | None
    facts: dict[str, bool]
    detail: str  # the reasons' messages


@dataclass
class Reload:
    target: str  # "A" or "B"
    started: datetime
    ended: datetime | None = None
    chunks: list[datetime] = field(default_factory=list)  # after each committed chunk
    policy_hash: str | None = None
    changed: bool | None = None


def _sidecar_for(home: Path) -> ManagedSidecar:
    """The sidecar ``Engine._start_managed`` would start, keeping the whole decision log."""
    with Engine.open(home) as probe:
        version = probe.active_policy()
        bundle = (probe.workspace.bundles / Path(version.bundle_path).name).read_bytes()
        bundle_key = keys.ensure_bundle_signing_key(probe.workspace.keys)
        limits = probe.config.limits
    return ManagedSidecar(
        bundle_bytes=bundle,
        revision=version.hash,
        verification_public_key_pem=bundle_key.public_pem_path.read_bytes(),
        keyid=bundle_key.keyid,
        start_timeout_s=limits.opa_start_timeout_s,
        managed=ManagedConfig(
            kept_log_events=200_000, decision_log_min_delay_s=1, decision_log_max_delay_s=1
        ),
    )


def _wait_for_logs(sidecar: ManagedSidecar, wanted: set[str], timeout_s: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        server = sidecar.bundle_server
        assert server is not None
        logs = {e.get("decision_id"): e for e in server.decision_logs()}
        if wanted <= logs.keys() or time.monotonic() > deadline:
            return {k: v for k, v in logs.items() if isinstance(k, str)}
        time.sleep(0.25)


def test_r10_hot_reload_during_10k_admissions(tmp_path: Path) -> None:
    home = tmp_path / "ws"
    with Engine.init(home, actor=ACTOR) as setup:
        for agent_id in STEADY:
            create_governed(setup, agent_id, temperature=0.3)
        for agent_id in FRAGILE:
            create_governed(setup, agent_id, temperature=0.5)
    contents = {"A": data_file(home).read_text()}
    edit_data(home, set_analysis_limit(0.4))
    contents["B"] = data_file(home).read_text()
    data_file(home).write_text(contents["A"])

    sidecar = _sidecar_for(home).start()
    engine = Engine.open(home, evaluator=sidecar)
    agents = STEADY + FRAGILE
    per_thread: list[list[Record]] = [[] for _ in range(ADMITTERS)]
    stop = threading.Event()
    reloads: list[Reload] = []
    errors: list[BaseException] = []

    def admitter(index: int) -> None:
        out = per_thread[index]
        i = index
        try:
            while not stop.is_set():
                agent_id = agents[i % len(agents)]
                i += ADMITTERS
                started = utcnow()
                d = engine.admit(agent_id)
                out.append(
                    Record(
                        agent_id,
                        started,
                        utcnow(),
                        d.allow,
                        str(d.code),
                        d.policy_hash,
                        d.decision_id,
                        dict(d.facts),
                        "; ".join(reason.message for reason in d.reasons),
                    )
                )
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    def reloader() -> None:
        try:
            for k in range(RELOADS):
                # spread the reloads over the run
                while sum(map(len, per_thread)) < (k + 1) * TARGET_DECISIONS // (RELOADS + 1):
                    if stop.wait(0.005):
                        return
                target = "B" if k % 2 == 0 else "A"
                data_file(home).write_text(contents[target])
                entry = Reload(target, utcnow())
                reloads.append(entry)
                result = engine.reload_policy(
                    actor=ACTOR,
                    reason=f"R10 reload {k}",
                    progress=lambda _n, e=entry: e.chunks.append(utcnow()),
                )
                entry.ended, entry.policy_hash, entry.changed = (
                    utcnow(),
                    result["policy_hash"],
                    result["changed"],
                )
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=admitter, args=(i,)) for i in range(ADMITTERS)]
    reload_thread = threading.Thread(target=reloader)
    began = time.perf_counter()
    try:
        for t in threads:
            t.start()
        reload_thread.start()
        reload_thread.join(timeout=240)
        while not stop.is_set() and sum(map(len, per_thread)) < TARGET_DECISIONS:
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        elapsed = time.perf_counter() - began
        assert not errors, errors
        records = [r for rs in per_thread for r in rs]
        logs = _wait_for_logs(sidecar, {r.decision_id for r in records if r.decision_id}, timeout_s=20)
        history = engine.policy_history()
        events = engine.store.audit_events()
        proof_rows = engine.store.query(
            "SELECT agent_id, policy_hash, issued_at, superseded_at FROM agent_proofs"
        )
    finally:
        stop.set()
        engine.close()
        sidecar.stop()

    # --- the run did what it claims -----------------------------------------------------------
    assert len(records) >= TARGET_DECISIONS
    assert len(reloads) == RELOADS and all(r.changed and r.ended and r.chunks for r in reloads)
    hashes = {"A": history[0].hash}
    hashes["B"] = reloads[0].policy_hash  # type: ignore[assignment]
    assert hashes["A"] != hashes["B"]
    assert [r.policy_hash for r in reloads] == [hashes[r.target] for r in reloads]
    built = {v.hash for v in history}
    assert built == set(hashes.values())

    # --- when was each hash active in the store? ----------------------------------------------
    # An activation's audit time is taken just before its commit, so it is a lower bound of
    # the moment it took effect; the next activation took effect before that reload's first
    # revalidation chunk committed (mark_active precedes revalidation).
    activations = [e for e in events if e.type in ("POLICY_HOTRELOAD", "POLICY_ROLLBACK")]
    assert [e.policy_hash for e in activations] == [hashes["A"]] + [hashes[r.target] for r in reloads]
    active_windows: list[tuple[str, datetime, datetime]] = []
    for i, event in enumerate(activations):
        until = reloads[i].chunks[0] if i < len(reloads) else FOREVER
        active_windows.append((str(event.policy_hash), parse_iso(event.time), until))  # type: ignore[arg-type]

    # --- when was each proof current? ---------------------------------------------------------
    # ``superseded_at`` is the revalidation chunk's clock, read before the chunk commits; the
    # supersession took effect when that chunk committed, before its progress timestamp.
    def superseded_by(ts: datetime) -> datetime:
        for r in reloads:
            assert r.ended is not None
            if r.started <= ts <= r.ended:
                return min(c for c in r.chunks if c >= ts)
        return ts  # superseded outside the race (setup): no admission was running then

    proofs: dict[str, list[tuple[str, datetime, datetime]]] = {}
    for row in proof_rows:
        issued = parse_iso(row["issued_at"])
        gone = parse_iso(row["superseded_at"])
        assert issued is not None
        proofs.setdefault(row["agent_id"], []).append(
            (row["policy_hash"], issued, FOREVER if gone is None else superseded_by(gone))
        )

    def overlaps(lo: datetime, hi: datetime, r: Record) -> bool:
        return lo <= r.ended and hi >= r.started

    # --- check every decision -----------------------------------------------------------------
    bad: dict[str, list[Record]] = {"a": [], "b": [], "c": [], "log": []}
    for r in records:
        # (b) every decision names a hash that was built
        if r.policy_hash not in built:
            bad["b"].append(r)
        log = logs.get(r.decision_id) if r.decision_id else None
        if r.decision_id is not None:
            # a decision OPA produced: OPA logged the same revision, path, agent and answer
            if log is None:
                bad["log"].append(r)
            elif (
                log.get("bundles", {}).get("agov", {}).get("revision") != r.policy_hash
                or log.get("path") != ADMISSION_PATH
                or log.get("input", {}).get("agent_id") != r.agent_id
                or log.get("result", {}).get("allow") is not r.allow
            ):
                bad["c"].append(r)
        if not r.allow:
            continue
        # (c) an allow is an answer from OPA, checked against the hash it reports
        if r.decision_id is None or not r.facts.get("policy_hash_match"):
            bad["c"].append(r)
        # (a) the hash was active at some moment of the call, and so was a proof bound to it
        was_active = any(h == r.policy_hash and overlaps(lo, hi, r) for h, lo, hi in active_windows)
        had_proof = any(
            h == r.policy_hash and overlaps(lo, hi, r) for h, lo, hi in proofs.get(r.agent_id, [])
        )
        if not (was_active and had_proof):
            bad["a"].append(r)
    wrong = {id(r) for rs in bad.values() for r in rs}

    allows = Counter(("A" if r.policy_hash == hashes["A"] else "B") for r in records if r.allow)
    fragile_under_b = sum(
        1 for r in records if r.allow and r.agent_id in FRAGILE and r.policy_hash == hashes["B"]
    )
    in_switch = {id(r) for r in records if any(overlaps(x.started, x.ended or FOREVER, r) for x in reloads)}
    deny_codes = Counter(r.code for r in records if not r.allow)
    # a timeout under load is a fail-closed deny too, but says nothing about the switch
    timeouts = sum(1 for r in records if "did not answer within" in r.detail)
    fail_closed = [
        r
        for r in records
        if not r.allow and r.code != "ADMISSION_DENY_INVALIDATED" and "did not answer within" not in r.detail
    ]
    switch_denies = Counter(r.code for r in fail_closed if id(r) in in_switch)
    outside_denies = Counter(r.code for r in fail_closed if id(r) not in in_switch)
    print(
        f"\nR10 hot reload: {len(records)} decisions, {len(reloads)} reloads, "
        f"decisions recorded with a hash that did not produce them = {len(wrong)}"
    )
    print(
        f"    {ADMITTERS} admitting threads, {elapsed:.1f} s, {len(records) / elapsed:.0f} decisions/s; "
        f"allows under A {allows['A']}, under B {allows['B']}; checks failed: "
        + ", ".join(f"{k}={len(v)}" for k, v in bad.items())
    )
    print(
        f"    denies {sum(deny_codes.values())}: {dict(deny_codes)}; fail-closed denies in switch windows "
        f"{sum(switch_denies.values())} {dict(switch_denies)} "
        f"(outside: {sum(outside_denies.values())}; OPA timeouts: {timeouts}); "
        f"reload durations "
        + ", ".join(f"{(x.ended - x.started).total_seconds() * 1000:.0f}" for x in reloads if x.ended)
        + " ms"
    )
    assert len(wrong) == 0, {k: v[:3] for k, v in bad.items() if v}
    assert fragile_under_b == 0
    # the run really exercised both hashes (otherwise the checks above prove little)
    assert allows["A"] > 0 and allows["B"] > 0
    assert deny_codes["ADMISSION_DENY_INVALIDATED"] > 0
    # outside the switch windows nothing but the invalidated agents is denied
    assert not outside_denies, outside_denies
