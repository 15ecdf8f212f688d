"""A revalidation run left unfinished is closed when another policy is activated.

Before, the run was resumed from its cursor whenever its hash became active again, even after
another policy had judged every agent in between: the agents before the cursor were never
judged by the policy now active. Sequence: a reload to P2 stops after its first chunk, a
rollback to P1 judges everyone, a reload to P2 again must judge everyone again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _reload_support import ACTOR, create_governed, reload_interrupted_at

from agov.config import Config, Limits
from agov.decisions import Status
from agov.engine import Engine

HOT, COOL = "a-hot", "b-cool"  # chunks of one, in id order: HOT's chunk first


@pytest.fixture
def engine(tmp_path: Path, opa_bin: Path) -> Iterator[Engine]:
    home = tmp_path / "ws"
    with Engine.init(home, Config(limits=Limits(revalidation_chunk_size=1)), actor=ACTOR) as eng:
        create_governed(eng, HOT, temperature=0.5)  # passes P1 (analysis <= 0.7), fails P2 (<= 0.4)
        create_governed(eng, COOL, temperature=0.3)
        yield eng


def _statuses(engine: Engine) -> dict[str, str]:
    return {a.id: a.status.value for a in engine.list_agents()}


def _runs(engine: Engine) -> list[Any]:
    return engine.store.query(
        "SELECT id, policy_hash, finished_at, cursor FROM revalidation_runs ORDER BY id"
    )


def _reload_p2_interrupted_after_its_first_chunk(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reload to P2 (analysis limit 0.4); OPA fails on the second chunk, so HOT's is committed."""
    reload_interrupted_at(engine, COOL, monkeypatch)


def test_a_run_interrupted_before_a_rollback_is_not_resumed_later(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    p1 = engine.active_policy().hash
    _reload_p2_interrupted_after_its_first_chunk(engine, monkeypatch)
    p2 = engine.active_policy().hash
    interrupted = _runs(engine)[-1]
    assert (interrupted["policy_hash"], interrupted["finished_at"], interrupted["cursor"]) == (p2, None, HOT)

    engine.rollback_policy(p1, actor=ACTOR, reason="back to P1")
    assert _statuses(engine) == {HOT: Status.GOVERNED_VALID.value, COOL: Status.GOVERNED_VALID.value}
    closed = engine.store.query_one(
        "SELECT finished_at FROM revalidation_runs WHERE id = ?", (interrupted["id"],)
    )
    assert closed["finished_at"] is not None, "the P2 run is closed by the rollback"
    event = engine.store.query_one("SELECT payload FROM audit_events WHERE type = 'POLICY_ROLLBACK'")
    assert json.loads(event["payload"])["abandoned_revalidation_runs"] == [interrupted["id"]]

    again = engine.reload_policy(actor=ACTOR, reason="P2 again")

    assert again["policy_hash"] == p2
    assert (again["revalidation"]["resumed"], again["revalidation"]["total"]) == (False, 2)
    assert _statuses(engine) == {HOT: Status.GOVERNED_INVALIDATED.value, COOL: Status.GOVERNED_VALID.value}
    assert not engine.admit(HOT).allow
    assert engine.admit(COOL).allow


def test_a_run_of_the_active_policy_still_resumes(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    _reload_p2_interrupted_after_its_first_chunk(engine, monkeypatch)

    resumed = engine.reload_policy(actor=ACTOR, reason="unchanged: finish the run")

    assert resumed["changed"] is False
    assert resumed["revalidation"]["resumed"] is True
    assert resumed["revalidation"]["total"] == 2, "the committed chunk is counted once"
    assert _statuses(engine) == {HOT: Status.GOVERNED_INVALIDATED.value, COOL: Status.GOVERNED_VALID.value}
