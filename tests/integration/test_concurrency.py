"""Reliability row R12: concurrent promotions of one agent: one winner per version, no lost
update; and a promotion racing an update never leaves a proof for a version it did not judge."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agov.engine import Engine
from agov.errors import UsageError
from agov.registry import CreationMode, from_template

AGENTS = 10
THREADS = 8


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, opa_bin: Path) -> Iterator[Engine]:
    with Engine.init(tmp_path_factory.mktemp("r12") / "ws", actor="tester") as eng:
        yield eng


def _create(engine: Engine, agent_id: str) -> None:
    engine.create_agent(
        from_template("finance-reconciler", agent_id=agent_id),
        mode=CreationMode.TEMPLATE,
        source="finance-reconciler",
        actor="tester",
    )


def _race(engine: Engine, agent_id: str) -> tuple[int, int]:
    barrier = threading.Barrier(THREADS)
    wins, conflicts = [], []

    def attempt(n: int) -> None:
        barrier.wait()
        try:
            result = engine.promote(agent_id, actor=f"admin-{n}", role="agent_admin")
        except UsageError:
            conflicts.append(n)
            return
        if result.allow:
            wins.append(n)

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return len(wins), len(conflicts)


def test_r12_concurrent_promotions_have_one_winner_per_version(engine: Engine) -> None:
    one_winner = lost = 0
    for index in range(AGENTS):
        agent_id = f"racer-{index:02d}"
        _create(engine, agent_id)
        winners, conflicts = _race(engine, agent_id)
        assert winners + conflicts == THREADS
        proofs = engine.store.query("SELECT * FROM agent_proofs WHERE agent_id = ?", (agent_id,))
        successes = [e for e in engine.store.audit_events(agent_id=agent_id) if e.type == "PROMOTION_SUCCESS"]
        one_winner += winners == 1 and len(proofs) == 1 and len(successes) == 1
        # a lost update: a success recorded whose proof is not the one on record, or a status without a proof
        record = engine.get_agent(agent_id)
        lost += record.status.value != proofs[0]["governance_status"] if proofs else 1
    print(
        f"R12 concurrent promotions: {AGENTS} agents x {THREADS} threads, one winner per version "
        f"{one_winner}/{AGENTS}, lost updates = {lost}"
    )
    assert one_winner == AGENTS
    assert lost == 0
    assert engine.verify_audit().ok


def test_promotion_racing_an_update_never_proves_the_new_version(engine: Engine) -> None:
    agent_id = "update-racer"
    _create(engine, agent_id)
    stale = engine.get_agent(agent_id)
    changed = from_template("finance-reconciler", agent_id=agent_id)
    changed["spec"]["economics"]["monthly_budget_usd"] = 150
    engine.update_agent(agent_id, changed, actor="tester", notes="budget cut")
    # The promotion judged version 1; version 2 was written meanwhile: its write must lose.
    from agov import keyring, keys, policy, promotion

    with pytest.raises(UsageError, match="changed while it was being promoted"):
        promotion.promote(
            engine.store,
            lambda: engine.config,
            stale,
            engine.evaluator,
            lambda: keyring.active_signer(engine.store, engine.workspace.keys),
            lambda: keys.ensure_proof_seal(engine.workspace.keys),
            actor="tester",
            role="agent_admin",
            policy_hash=policy.require_active(engine.store).hash,
            now=engine.clock(),
        )
    assert engine.store.query("SELECT * FROM agent_proofs WHERE agent_id = ?", (agent_id,)) == []
    assert engine.get_agent(agent_id).version == 2
    last = engine.store.query_one("SELECT type, payload FROM audit_events ORDER BY seq DESC")
    assert last["type"] == "REQUEST_REJECTED" and "changed while it was being promoted" in last["payload"]
    result = engine.promote(agent_id, actor="tester", role="agent_admin")
    assert result.allow
    proof = engine.store.query_one("SELECT version FROM agent_proofs WHERE agent_id = ?", (agent_id,))
    assert proof is not None and proof["version"] == 2


def test_an_update_that_lost_a_race_is_refused_as_such(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agov import registry

    agent_id = "update-loser"
    _create(engine, agent_id)
    winner = from_template("finance-reconciler", agent_id=agent_id)
    winner["spec"]["economics"]["monthly_budget_usd"] = 150
    loser = from_template("finance-reconciler", agent_id=agent_id)
    loser["spec"]["economics"]["monthly_budget_usd"] = 120
    validate = registry.validate_spec

    def another_update_wins_meanwhile(document: object) -> object:
        # after the loser read version 1, before its transaction: the winner writes version 2
        monkeypatch.setattr(registry, "validate_spec", validate)
        engine.update_agent(agent_id, winner, actor="winner")
        return validate(document)  # type: ignore[arg-type]

    monkeypatch.setattr(registry, "validate_spec", another_update_wins_meanwhile)
    with pytest.raises(UsageError, match="changed while it was being updated"):
        engine.update_agent(agent_id, loser, actor="loser")

    record = engine.get_agent(agent_id)
    assert record.version == 2 and record.spec.document["spec"]["economics"]["monthly_budget_usd"] == 150
    rejected = engine.store.query_one(
        "SELECT actor FROM audit_events WHERE type = 'REQUEST_REJECTED' AND agent_id = ?", (agent_id,)
    )
    assert rejected is not None and rejected["actor"] == "loser"


def test_integrity_after_the_races(engine: Engine) -> None:
    conn = sqlite3.connect(engine.workspace.db_path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
