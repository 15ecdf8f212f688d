"""Writes judged under one policy do not commit after another policy became active.

A revalidation skips agents written after it read them, trusting that write to have judged
them. A promotion judged under the old policy that committed after a reload broke that trust:
its agent kept a proof bound to the old policy and was never judged by the new one. Likewise a
revalidation run whose policy was replaced meanwhile (by another process) kept signing proofs
bound to it, which could overwrite what the new policy's own run had judged.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from _reload_support import ACTOR, agent_doc, create_governed, edit_data, metric, set_analysis_limit

from agov import keyring, policy, revalidation
from agov.config import Config, Limits
from agov.decisions import Code, Status
from agov.engine import Engine
from agov.errors import ConflictError, KeyMaterialError, UsageError
from agov.registry import CreationMode

HOT, COOL = "a-hot", "b-cool"  # temperature 0.5 fails once the analysis limit is 0.4


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "ws"


@pytest.fixture
def engine(home: Path, opa_bin: Path) -> Iterator[Engine]:
    with Engine.init(home, Config(limits=Limits(revalidation_chunk_size=1)), actor=ACTOR) as eng:
        yield eng


def _state(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    return {
        table: [tuple(r) for r in engine.store.query(f"SELECT * FROM {table} ORDER BY 1")]
        for table in ("agents", "agent_proofs")
    }


def test_a_promotion_judged_before_a_reload_does_not_commit_after_it(
    engine: Engine, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.create_agent(agent_doc(HOT, temperature=0.5), mode=CreationMode.IMPORT, source="x", actor=ACTOR)
    load_signer = keyring.active_signer
    reloaded: list[str] = []

    def reload_meanwhile(*args: Any) -> Any:
        # between the promotion's verdict (under P1) and its commit, another process reloads
        monkeypatch.setattr(keyring, "active_signer", load_signer)  # once
        edit_data(home, set_analysis_limit(0.4))
        with Engine.open(home) as other:
            reloaded.append(other.reload_policy(actor="other", reason="P2")["policy_hash"])
        return load_signer(*args)

    monkeypatch.setattr(keyring, "active_signer", reload_meanwhile)
    with pytest.raises(UsageError, match="active policy changed while agent 'a-hot' was being promoted"):
        engine.promote(HOT, actor=ACTOR, role="agent_admin")
    monkeypatch.setattr(keyring, "active_signer", load_signer)

    assert engine.active_policy().hash == reloaded[0]
    assert engine.get_agent(HOT).status is Status.SANDBOX
    assert engine.store.query("SELECT 1 FROM agent_proofs WHERE agent_id = ?", (HOT,)) == []
    # a race lost, not a deny by policy: one REQUEST_REJECTED naming what changed
    last = engine.store.query_one("SELECT type, payload FROM audit_events ORDER BY seq DESC")
    assert last["type"] == Code.REQUEST_REJECTED
    rejected = json.loads(last["payload"])
    assert rejected["operation"] == "promote" and rejected["reason"] == "concurrent change"
    assert "active policy changed" in rejected["message"] and rejected["decision_id"]
    assert engine.store.query("SELECT 1 FROM audit_events WHERE type = ?", (Code.PROMOTION_DENIED,)) == []
    # promoted again, it is judged by the policy now active
    again = engine.promote(HOT, actor=ACTOR, role="agent_admin")
    assert [r.code for r in again.deny] == ["PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT"]


def _reload_to_p2_and(engine: Engine, home: Path, after_first_chunk: Callable[[str, str], None]) -> str:
    """Govern HOT and COOL, then reload to P2 (analysis limit 0.4) in chunks of one. Once HOT's
    chunk is committed, ``after_first_chunk(p1, p2)`` acts as another process would; the run
    must then stop with ``ConflictError`` before it commits anything more. Returns P1's hash."""
    create_governed(engine, HOT, temperature=0.5)
    create_governed(engine, COOL, temperature=0.3)
    p1 = engine.active_policy().hash
    before: dict[str, list[tuple[Any, ...]]] = {}

    def once(done: int) -> None:
        if not before:
            before.update(_state(engine))
            after_first_chunk(p1, engine.active_policy().hash)

    edit_data(home, set_analysis_limit(0.4))
    with pytest.raises(ConflictError, match="another process activated a policy, closed this run"):
        engine.reload_policy(actor=ACTOR, reason="P2", progress=once)

    assert before["agents"], "setup: the first chunk was committed"
    assert _state(engine) == before, "nothing was committed after the change"
    # the other process owns the run now: not a run left stopped, for an alert to see
    assert metric(engine, "revalidation_stopped_total") == 0
    return p1


def test_a_run_whose_policy_was_replaced_stops_before_its_next_chunk(engine: Engine, home: Path) -> None:
    def rollback(p1: str, p2: str) -> None:
        with Engine.open(home) as other:
            policy.mark_active(other.store, p1, event=Code.POLICY_ROLLBACK, actor="other", reason="back")

    p1 = _reload_to_p2_and(engine, home, rollback)

    assert engine.active_policy().hash == p1
    proof = engine.store.query_one(
        "SELECT policy_hash FROM agent_proofs WHERE agent_id = ? AND superseded_at IS NULL", (COOL,)
    )
    assert proof["policy_hash"] == p1, "COOL kept its P1 proof"
    run = engine.store.query_one(
        "SELECT finished_at, cursor FROM revalidation_runs WHERE policy_hash != ? ORDER BY id DESC", (p1,)
    )
    assert run["finished_at"] is not None and run["cursor"] == HOT, "closed by the rollback, not finished"


def test_a_run_another_process_restarted_with_other_org_limits_stops_before_its_next_chunk(
    engine: Engine, home: Path
) -> None:
    def restart_with_other_limits(p1: str, p2: str) -> None:
        # what another process's reload does after agov.yaml's org limits changed
        with Engine.open(home) as other:
            revalidation._open_run(other.store, p2, p1, b'{"other":1}', other.clock(), None)

    _reload_to_p2_and(engine, home, restart_with_other_limits)

    run = engine.store.query_one("SELECT finished_at, cursor FROM revalidation_runs ORDER BY id DESC")
    assert (run["finished_at"], run["cursor"]) == (None, ""), "left to the process that restarted it"


def test_a_long_lived_engine_follows_a_reload_made_by_another_process(engine: Engine, home: Path) -> None:
    create_governed(engine, COOL, temperature=0.3)
    assert engine.admit(COOL).allow
    serving = engine.evaluator()

    edit_data(home, set_analysis_limit(0.4))
    with Engine.open(home) as other:
        p2 = other.reload_policy(actor="other", reason="P2")["policy_hash"]
        assert other.admit(COOL).allow

    decision = engine.admit(COOL)

    assert (decision.allow, decision.policy_hash) == (True, p2)
    assert getattr(serving, "active_revision", None) == p2, "the same sidecar, moved to P2"
    # and this engine's own reload of the same tree is a no-op that keeps deciding
    assert engine.reload_policy(actor=ACTOR, reason="same tree")["changed"] is False
    assert engine.admit(COOL).allow


def test_a_reload_with_no_key_that_may_sign_is_refused_before_anything_changes(
    engine: Engine, home: Path
) -> None:
    create_governed(engine, COOL, temperature=0.3)
    p1 = engine.active_policy().hash
    now = engine.clock()
    engine.generate_key(alg="ed25519", actor=ACTOR, not_after=now + timedelta(hours=1))
    engine.clock = lambda: now + timedelta(hours=2)  # the new signer's window has closed
    runs = engine.store.query("SELECT * FROM revalidation_runs")
    versions = engine.store.query("SELECT * FROM policy_versions")
    seq = engine.store.audit_events()[-1].seq

    edit_data(home, set_analysis_limit(0.4))
    with pytest.raises(KeyMaterialError, match="stopped being valid at"):
        engine.reload_policy(actor=ACTOR, reason="P2 without a key")

    assert engine.active_policy().hash == p1
    assert getattr(engine.evaluator(), "active_revision", None) == p1, "OPA was not switched either"
    assert engine.store.query("SELECT * FROM revalidation_runs") == runs
    # not even recorded as a version a rollback could later activate
    assert engine.store.query("SELECT * FROM policy_versions") == versions
    (refused,) = engine.store.audit_events(after_seq=seq)
    assert refused.type == "POLICY_RELOAD_REFUSED" and "stopped being valid at" in refused.payload["error"]
    assert engine.admit(COOL).allow


def test_a_switch_that_died_before_its_revalidation_is_finished_by_the_next_reload(
    engine: Engine, home: Path
) -> None:
    create_governed(engine, HOT, temperature=0.5)
    create_governed(engine, COOL, temperature=0.3)
    edit_data(home, set_analysis_limit(0.4))
    p2 = engine.build_policy(actor=ACTOR, reason="P2").hash
    # a process that activated P2 and died before revalidating
    policy.mark_active(engine.store, p2, event=Code.POLICY_HOTRELOAD, actor="gone", reason="P2")

    again = engine.reload_policy(actor=ACTOR, reason="same tree")

    assert again["changed"] is False and again["revalidation"] is not None
    assert again["revalidation"]["total"] == 2
    assert engine.get_agent(HOT).status is Status.GOVERNED_INVALIDATED
    assert engine.admit(COOL).allow


def test_a_run_closed_by_a_re_activation_of_its_own_policy_stops(engine: Engine, home: Path) -> None:
    def back_and_forth(p1: str, p2: str) -> None:
        with Engine.open(home) as other:  # P1 and then P2 again: P2 is active, this run is closed
            policy.mark_active(other.store, p1, event=Code.POLICY_ROLLBACK, actor="other", reason="back")
            policy.mark_active(other.store, p2, event=Code.POLICY_ROLLBACK, actor="other", reason="forth")

    _reload_to_p2_and(engine, home, back_and_forth)

    report = engine.revalidate()  # the re-activation's own run judges everyone
    assert (report.resumed, report.total) == (False, 2)
    assert engine.get_agent(HOT).status is Status.GOVERNED_INVALIDATED


def test_a_run_whose_policy_is_no_longer_active_stops(engine: Engine, home: Path) -> None:
    def active_flag_moved(p1: str, p2: str) -> None:
        conn = sqlite3.connect(engine.workspace.db_path)  # outside agov: the run is not closed
        try:
            conn.execute("UPDATE policy_versions SET active = 0 WHERE active = 1")
            conn.execute("UPDATE policy_versions SET active = 1 WHERE hash = ?", (p1,))
            conn.commit()
        finally:
            conn.close()

    _reload_to_p2_and(engine, home, active_flag_moved)


def test_a_decision_never_moves_the_sidecar_back_to_a_hash_it_read_before_a_switch(
    engine: Engine, home: Path
) -> None:
    create_governed(engine, COOL, temperature=0.3)
    p1 = engine.active_policy().hash
    edit_data(home, set_analysis_limit(0.4))
    p2 = engine.reload_policy(actor=ACTOR, reason="P2")["policy_hash"]

    # what an admission that read the active hash just before the switch asks for
    sidecar = engine._evaluator_for(p1)

    assert getattr(sidecar, "active_revision", None) == p2


class _StopAfterOneChunk(Exception):
    pass


def test_a_run_another_process_moved_on_stops_instead_of_counting_agents_twice(
    engine: Engine, home: Path
) -> None:
    """Two processes working one unfinished run (`agov revalidate` beside `serve` finishing it):
    the one overtaken stops at its next chunk. Before, it committed a chunk the other had
    committed already, and wrote its own counts over the run's."""
    agents = [create_governed(engine, f"agent-{i}") for i in range(4)]
    edit_data(home, set_analysis_limit(0.4))  # a new policy every agent still passes
    moved_on: list[int] = []

    def other_process_works_the_run(judged: int) -> None:
        if moved_on:
            return
        with Engine.open(home) as other:  # resumes the run after this process's first chunk

            def stop(judged: int) -> None:
                raise _StopAfterOneChunk

            with pytest.raises(_StopAfterOneChunk):
                other.revalidate(progress=stop)
        moved_on.append(judged)

    with pytest.raises(ConflictError, match="another process is working the same run"):
        engine.reload_policy(actor=ACTOR, reason="P2", progress=other_process_works_the_run)

    run = engine.store.query_one("SELECT * FROM revalidation_runs ORDER BY id DESC")
    assert run["finished_at"] is None and (run["cursor"], run["total"]) == (agents[1], 2), dict(run)
    report = engine.revalidate()  # finishes the same run, counting each agent once
    run = engine.store.query_one("SELECT * FROM revalidation_runs ORDER BY id DESC")
    assert report.run_id == run["id"] and report.resumed
    assert (run["total"], run["valid"], run["finished_at"] is not None) == (4, 4, True), dict(run)


def test_a_run_another_process_sent_back_to_its_first_agent_says_so(engine: Engine, home: Path) -> None:
    """An overtaken process whose key was revoked restarts the run (its proofs must be signed
    again) and stops; the process that was working the run then stops too, and is told why."""
    create_governed(engine, HOT, temperature=0.3)
    create_governed(engine, COOL, temperature=0.3)
    edit_data(home, set_analysis_limit(0.4))
    restarted: list[int] = []

    def other_process_restarts_the_run(judged: int) -> None:
        if restarted:
            return
        with Engine.open(home) as other, other.store.transaction() as tx:
            (run_id,) = tx.execute("SELECT id FROM revalidation_runs WHERE finished_at IS NULL").fetchone()
            revalidation._restart_in(
                tx, run_id, other.active_policy().hash, "its key was revoked", other.clock()
            )
        restarted.append(run_id)

    with pytest.raises(ConflictError, match="another process sent the run back to its first agent"):
        engine.reload_policy(actor=ACTOR, reason="P2", progress=other_process_restarts_the_run)
    run = engine.store.query_one("SELECT * FROM revalidation_runs WHERE id = ?", (restarted[0],))
    assert (run["cursor"], run["total"], run["finished_at"]) == ("", 0, None), dict(run)


def test_a_revalidate_that_read_a_policy_replaced_before_its_run_opened_opens_none(
    engine: Engine, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`agov revalidate` reads the active policy, then opens its run. A reload by another process
    in between closed the runs of every other policy; the run opened after it, for the policy it
    had just replaced, was left unfinished (helper-41)."""
    create_governed(engine, COOL, temperature=0.3)
    p1 = engine.active_policy().hash
    open_run = revalidation._open_run

    def reload_first(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(revalidation, "_open_run", open_run)  # the other process's own run opens
        edit_data(home, set_analysis_limit(0.4))
        with Engine.open(home) as other:
            other.reload_policy(actor="other", reason="P2, meanwhile")
        return open_run(*args, **kwargs)

    monkeypatch.setattr(revalidation, "_open_run", reload_first)
    with pytest.raises(ConflictError, match=f"under {p1[:12]} was not begun: another process activated"):
        engine.revalidate()

    assert engine.active_policy().hash != p1
    assert engine.store.query("SELECT id FROM revalidation_runs WHERE finished_at IS NULL") == []
