"""A start during a revalidation run: the agent is judged ahead of the run, not denied until the
run reaches it (for 100k agents the run takes seconds; every start in that window was denied).

Setup: four agents, chunks of two, and a reload to P2 (analysis temperature <= 0.4) that OPA
stops at the second chunk, so the first chunk holds proofs bound to P2 and the second still
holds proofs bound to P1. That is the state of every agent the run has not reached yet.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _reload_support import (
    ACTOR,
    create_governed,
    edit_config,
    edit_data,
    metric,
    reload_interrupted_at,
    reload_killed_after_switch,
    set_analysis_limit,
    snapshot,
)

from agov.config import Config, Limits
from agov.decisions import Code, Status
from agov.engine import Engine

pytestmark = pytest.mark.integration

FIRST, SECOND = ("a1-pass", "a2-pass"), ("b1-pass", "b2-fail")  # chunks of two, in id order


@pytest.fixture
def engine(tmp_path: Path, opa_bin: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    with Engine.init(tmp_path / "ws", Config(limits=Limits(revalidation_chunk_size=2)), actor=ACTOR) as eng:
        for agent_id in (*FIRST, SECOND[0]):
            create_governed(eng, agent_id, temperature=0.3)  # passes P1 (<= 0.7) and P2 (<= 0.4)
        create_governed(eng, SECOND[1], temperature=0.5)  # passes P1, fails P2
        eng.p1 = eng.active_policy().hash  # type: ignore[attr-defined]
        reload_interrupted_at(eng, SECOND[0], monkeypatch)
        yield eng


def _current_proof(engine: Engine, agent_id: str) -> Any:
    rows = engine.store.query(
        "SELECT policy_hash, keyid, seal FROM agent_proofs WHERE agent_id = ? AND superseded_at IS NULL",
        (agent_id,),
    )
    assert len(rows) == 1
    return rows[0]


def _last_seq(engine: Engine) -> int:
    return int(engine.store.query_one("SELECT MAX(seq) AS seq FROM audit_events")["seq"])


def _events_since(engine: Engine, seq: int) -> list[Any]:
    return engine.store.query(
        "SELECT type, agent_id, actor, policy_hash, payload FROM audit_events WHERE seq > ? ORDER BY seq",
        (seq,),
    )


def _open_run(engine: Engine) -> Any:
    return engine.store.query_one(
        "SELECT id, cursor, total FROM revalidation_runs WHERE finished_at IS NULL ORDER BY id DESC"
    )


def test_setup_leaves_the_second_chunk_on_the_old_policy(engine: Engine) -> None:
    p2 = engine.active_policy().hash
    assert p2 != engine.p1  # type: ignore[attr-defined]
    assert {a: _current_proof(engine, a)["policy_hash"] for a in (*FIRST, *SECOND)} == {
        **dict.fromkeys(FIRST, p2),
        **dict.fromkeys(SECOND, engine.p1),  # type: ignore[attr-defined]
    }
    assert _open_run(engine)["cursor"] == FIRST[-1]


def test_a_passing_agent_the_run_has_not_reached_is_judged_and_admitted(engine: Engine) -> None:
    p2 = engine.active_policy().hash
    run_before = dict(_open_run(engine))
    audit_before = _last_seq(engine)

    decision = engine.admit(SECOND[0])

    assert (decision.allow, decision.code, decision.policy_hash) == (True, Code.ADMISSION_ALLOW, p2)
    assert decision.status == Status.GOVERNED_VALID.value
    proof = _current_proof(engine, SECOND[0])
    assert proof["policy_hash"] == p2 and proof["seal"]
    events = _events_since(engine, audit_before)
    assert [(e["type"], e["agent_id"], e["actor"], e["policy_hash"]) for e in events] == [
        (Code.PROOFS_RENEWED, SECOND[0], "agov-revalidation", p2)
    ]
    payload = json.loads(events[0]["payload"])
    assert (payload["run_id"], payload["agents"], payload["at_start"]) == (run_before["id"], 1, True)
    assert dict(_open_run(engine)) == run_before  # the run's cursor and counts are its own
    assert metric(engine, "agent_starts_renewed_total") == 1
    assert engine.verify_audit().ok

    # a second start finds the renewed proof: nothing more is signed
    assert engine.admit(SECOND[0]).allow
    assert (
        engine.store.query_one("SELECT COUNT(*) AS n FROM audit_events WHERE seq > ?", (audit_before,))["n"]
        == 1
    )

    # the run then finishes as before, and governs every agent under P2
    report = engine.revalidate()
    assert (report.total, report.valid, report.newly_invalidated) == (4, 3, 1)
    assert engine.get_agent(SECOND[0]).status is Status.GOVERNED_VALID
    assert _current_proof(engine, SECOND[0])["policy_hash"] == p2
    assert engine.get_agent(SECOND[1]).status is Status.GOVERNED_INVALIDATED


def test_a_failing_agent_stays_denied_and_nothing_is_written(engine: Engine) -> None:
    before = snapshot(engine.workspace.home)

    decision = engine.admit(SECOND[1])

    assert (decision.allow, decision.code, decision.status) == (
        False,
        Code.ADMISSION_DENY_POLICY_HASH_MISMATCH,
        None,
    )
    notes = [r.message for r in decision.reasons]
    assert any(
        "PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT" in n and "the run invalidates it" in n for n in notes
    )
    assert snapshot(engine.workspace.home) == before  # the run invalidates it, not the start


def test_org_limits_other_than_the_runs_leave_the_start_denied(engine: Engine) -> None:
    edit_config(engine.workspace.home, lambda raw: raw["org"].__setitem__("max_monthly_budget_usd", 5000))
    before = snapshot(engine.workspace.home)

    decision = engine.admit(SECOND[0])

    assert (decision.allow, decision.code) == (False, Code.ADMISSION_DENY_POLICY_HASH_MISMATCH)
    assert any("other org limits" in r.message for r in decision.reasons)
    assert snapshot(engine.workspace.home) == before


def test_a_signing_key_it_cannot_read_leaves_the_start_denied(engine: Engine) -> None:
    signer = _current_proof(engine, SECOND[0])["keyid"]
    private = engine.workspace.keys / f"{signer}.ed25519.key"
    private.rename(private.with_name("moved-away"))  # the public half still verifies its proofs
    before = snapshot(engine.workspace.home)

    decision = engine.admit(SECOND[0])

    assert (decision.allow, decision.code) == (False, Code.ADMISSION_DENY_POLICY_HASH_MISMATCH)
    assert any(
        "not judged ahead of the revalidation run" in r.message and f"no key {signer}" in r.message
        for r in decision.reasons
    )
    assert snapshot(engine.workspace.home) == before


def test_an_admitted_agent_with_a_current_proof_is_not_judged_again(engine: Engine) -> None:
    before = snapshot(engine.workspace.home)
    assert engine.admit(FIRST[0]).allow
    assert snapshot(engine.workspace.home) == before


def _denied_with(engine: Engine, agent_id: str, note: str) -> None:
    decision = engine.admit(agent_id)
    assert (decision.allow, decision.code) == (False, Code.ADMISSION_DENY_POLICY_HASH_MISMATCH)
    assert any(note in r.message for r in decision.reasons), decision.reasons


def test_a_run_not_begun_yet_leaves_the_start_denied_and_says_so(engine: Engine) -> None:
    # the state an activation by `agov policy build`, or an older agov's switch, leaves before
    # a run has begun (a switch now records the org limits with the run it opens)
    with engine.store.transaction() as tx:
        tx.execute("UPDATE revalidation_runs SET org_digest = NULL WHERE finished_at IS NULL")
    before = snapshot(engine.workspace.home)
    _denied_with(engine, SECOND[0], "the run has recorded no org limits yet")
    assert snapshot(engine.workspace.home) == before


def test_a_missing_seal_key_leaves_the_start_denied_and_makes_no_key(engine: Engine) -> None:
    seal = engine.workspace.keys / "proof-seal.key"
    seal.rename(seal.with_name("moved-away"))
    before = snapshot(engine.workspace.home)
    _denied_with(engine, SECOND[0], "proof seal key")
    assert not seal.exists()
    assert snapshot(engine.workspace.home) == before


def test_a_store_locked_past_the_decision_deadline_leaves_the_start_denied(engine: Engine) -> None:
    engine.config = dataclasses.replace(
        engine.config, limits=dataclasses.replace(engine.config.limits, opa_timeout_s=0.5)
    )
    before = snapshot(engine.workspace.home)
    holder = sqlite3.connect(engine.workspace.home / "agov.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another writer holding the lock
        started = time.monotonic()
        _denied_with(engine, SECOND[0], "locked")
        assert time.monotonic() - started < 5  # the decision's deadline, not the 10 s busy timeout
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert snapshot(engine.workspace.home) == before


def test_a_start_renewed_after_the_run_read_its_chunk_is_counted_by_the_run(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agov import revalidation

    apply_chunk = revalidation._apply

    def start_first(store: Any, report: Any, cursor: str, rows: list[Any], *args: Any) -> Any:
        if rows[0].agent_id == SECOND[0]:  # read by the run, not yet committed: the agent starts
            assert engine.admit(SECOND[0]).allow
        return apply_chunk(store, report, cursor, rows, *args)

    monkeypatch.setattr(revalidation, "_apply", start_first)
    report = engine.revalidate()

    assert (report.total, report.valid, report.invalidated, report.newly_invalidated) == (4, 3, 1, 1)
    finished = engine.store.query_one(
        "SELECT payload FROM audit_events WHERE type = 'POLICY_REVALIDATION' ORDER BY seq DESC LIMIT 1"
    )
    assert json.loads(finished["payload"])["total"] == 4
    renewals = engine.store.query(
        "SELECT payload FROM audit_events WHERE type = 'PROOFS_RENEWED' AND agent_id = ?", (SECOND[0],)
    )
    assert [json.loads(r["payload"]).get("at_start") for r in renewals] == [
        True
    ]  # the run did not sign it again
    assert _current_proof(engine, SECOND[0])["policy_hash"] == engine.active_policy().hash


def test_a_key_revoked_while_the_start_is_judged_leaves_it_denied_in_its_own_words(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agov import keyring

    load_signer = keyring.active_signer

    def load_then_revoke(*args: Any, **kwargs: Any) -> Any:
        signer = load_signer(*args, **kwargs)
        engine.revoke_key(signer.keyid, reason="test: revoked as the start is judged", actor=ACTOR)
        return signer

    monkeypatch.setattr(keyring, "active_signer", load_then_revoke)
    decision = engine.admit(SECOND[0])

    assert (decision.allow, decision.code) == (False, Code.ADMISSION_DENY_POLICY_HASH_MISMATCH)
    notes = [r.message for r in decision.reasons]
    assert any("was revoked, or no key may sign now" in n for n in notes), notes
    assert not any("stopped" in n for n in notes), notes  # the start stopped no run
    assert _current_proof(engine, SECOND[0])["policy_hash"] == engine.p1  # type: ignore[attr-defined]


def test_a_switch_between_the_renewal_and_the_second_decision_is_explained(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agov import policy, revalidation

    renew = revalidation.renew_at_start

    def renew_then_roll_back(*args: Any, **kwargs: Any) -> Any:
        renewal = renew(*args, **kwargs)
        with Engine.open(engine.workspace.home) as other:  # another process rolls back meanwhile
            policy.mark_active(
                other.store, engine.p1, event=Code.POLICY_ROLLBACK, actor="other", reason="back"
            )  # type: ignore[attr-defined]
        return renewal

    monkeypatch.setattr(revalidation, "renew_at_start", renew_then_roll_back)
    decision = engine.admit(SECOND[0])

    assert (decision.allow, decision.code) == (False, Code.ADMISSION_DENY_POLICY_HASH_MISMATCH)
    assert any(
        "another policy became active before its start was decided again" in r.message
        for r in decision.reasons
    )


@pytest.mark.parametrize("renewed_first", [False, True], ids=["promoted", "renewed-then-promoted"])
def test_a_promotion_under_other_org_limits_after_the_run_read_its_chunk_is_not_counted_by_the_run(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, renewed_first: bool
) -> None:
    """A promotion reads agov.yaml afresh, a run judges with the limits it opened with: the run
    may report as judged only what it, or a start checking its limits, judged (helper-42)."""
    from _reload_support import ADMIN_ROLE, agent_doc

    from agov import revalidation

    apply_chunk = revalidation._apply

    def promote_first(store: Any, report: Any, cursor: str, rows: list[Any], *args: Any) -> Any:
        if rows[0].agent_id == SECOND[0]:  # read by the run; a budget its org limits refuse
            if renewed_first:  # a start renews it first: the promotion still replaces that proof
                assert engine.admit(SECOND[0]).allow
            edit_config(
                engine.workspace.home, lambda raw: raw["org"].__setitem__("max_monthly_budget_usd", 5000)
            )
            engine.update_agent(SECOND[0], agent_doc(SECOND[0], temperature=0.3, budget=3000), actor=ACTOR)
            assert engine.promote(SECOND[0], actor=ACTOR, role=ADMIN_ROLE).allow
        return apply_chunk(store, report, cursor, rows, *args)

    monkeypatch.setattr(revalidation, "_apply", promote_first)
    report = engine.revalidate()

    # FIRST (2, before the stop) and SECOND[1] (invalidated); SECOND[0] was judged by no run
    assert (report.total, report.valid, report.invalidated) == (3, 2, 1)
    assert engine.get_agent(SECOND[0]).status is Status.GOVERNED_VALID  # the promotion governs it


# --- an invalidated agent the new policy passes -------------------------------------------------
#
# P1 (analysis limit 0.7) passes all four; P2 (0.4) invalidates the three above 0.4; P3 (0.6) is
# reloaded and stopped at the second chunk: its run has judged JUDGED (a2-fail stays
# invalidated) but not AHEAD, where c1-back passes P3 and c2-fail does not.

JUDGED, AHEAD = ("a1-pass", "a2-fail"), ("c1-back", "c2-fail")


@pytest.fixture
def restoring(tmp_path: Path, opa_bin: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    from _reload_support import edit_data, set_analysis_limit

    with Engine.init(tmp_path / "ws", Config(limits=Limits(revalidation_chunk_size=2)), actor=ACTOR) as eng:
        for agent_id, temperature in zip((*JUDGED, *AHEAD), (0.3, 0.65, 0.5, 0.65), strict=True):
            create_governed(eng, agent_id, temperature=temperature)
        edit_data(eng.workspace.home, set_analysis_limit(0.4))
        assert eng.reload_policy(actor=ACTOR, reason="P2")["revalidation"]["newly_invalidated"] == 3
        reload_interrupted_at(eng, AHEAD[0], monkeypatch, limit=0.6)
        yield eng


def _statuses(engine: Engine) -> dict[str, str]:
    return {a: engine.get_agent(a).status.value for a in (*JUDGED, *AHEAD)}


def test_setup_leaves_the_run_short_of_two_invalidated_agents(restoring: Engine) -> None:
    invalidated = Status.GOVERNED_INVALIDATED.value
    assert _statuses(restoring) == {
        JUDGED[0]: Status.GOVERNED_VALID.value,
        JUDGED[1]: invalidated,
        AHEAD[0]: invalidated,
        AHEAD[1]: invalidated,
    }
    assert _open_run(restoring)["cursor"] == JUDGED[-1]


def test_an_invalidated_agent_the_active_policy_passes_is_restored_at_its_start(restoring: Engine) -> None:
    p3 = restoring.active_policy().hash
    run_before = dict(_open_run(restoring))
    audit_before = _last_seq(restoring)

    decision = restoring.admit(AHEAD[0])

    assert (decision.allow, decision.code, decision.policy_hash) == (True, Code.ADMISSION_ALLOW, p3)
    assert restoring.get_agent(AHEAD[0]).status is Status.GOVERNED_VALID
    assert _current_proof(restoring, AHEAD[0])["policy_hash"] == p3
    events = _events_since(restoring, audit_before)
    assert [(e["type"], e["agent_id"], e["actor"], e["policy_hash"]) for e in events] == [
        (Code.AGENT_RESTORED, AHEAD[0], "agov-revalidation", p3),
        (Code.PROOFS_RENEWED, AHEAD[0], "agov-revalidation", p3),
    ]
    assert json.loads(events[0]["payload"]) == {
        "status": Status.GOVERNED_VALID.value,
        "run_id": run_before["id"],
        "at_start": True,
    }
    assert json.loads(events[1]["payload"])["at_start"] is True
    assert dict(_open_run(restoring)) == run_before
    assert metric(restoring, "agent_starts_renewed_total") == 1
    assert restoring.verify_audit().ok

    report = restoring.revalidate()
    # the run counts the restores it made itself: c1-back was restored at its start
    assert (report.total, report.valid, report.invalidated, report.restored) == (4, 2, 2, 0)
    assert _statuses(restoring)[AHEAD[0]] == Status.GOVERNED_VALID.value


def test_an_invalidated_agent_the_active_policy_still_fails_stays_denied_and_nothing_is_written(
    restoring: Engine,
) -> None:
    before = snapshot(restoring.workspace.home)

    decision = restoring.admit(AHEAD[1])

    assert (decision.allow, decision.code) == (False, Code.ADMISSION_DENY_INVALIDATED)
    notes = [r.message for r in decision.reasons]
    assert any(
        "it stays invalidated" in n and "PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT" in n for n in notes
    ), notes
    assert snapshot(restoring.workspace.home) == before


@pytest.mark.parametrize("run_open", [True, False], ids=["judged-by-the-run", "no-run-open"])
def test_an_invalidated_agent_no_open_run_has_yet_to_judge_is_not_judged_at_its_start(
    restoring: Engine, monkeypatch: pytest.MonkeyPatch, run_open: bool
) -> None:
    from agov import revalidation

    agent_id = JUDGED[1]
    if not run_open:
        restoring.revalidate()
        agent_id = AHEAD[1]
    before = snapshot(restoring.workspace.home)
    plain = restoring._admit_once(agent_id)

    def not_called(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("judged at its start")

    monkeypatch.setattr(revalidation, "renew_at_start", not_called)
    decision = restoring.admit(agent_id)

    assert (decision.allow, decision.code) == (False, Code.ADMISSION_DENY_INVALIDATED)
    assert decision.reasons == plain.reasons  # the deny's own advice, nothing added
    assert snapshot(restoring.workspace.home) == before


def test_an_invalidated_agent_restored_after_the_run_read_its_chunk_is_counted_once(
    restoring: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agov import revalidation

    apply_chunk = revalidation._apply

    def start_first(store: Any, report: Any, cursor: str, rows: list[Any], *args: Any) -> Any:
        if rows[0].agent_id == AHEAD[0]:  # read by the run as invalidated, not yet committed
            assert restoring.admit(AHEAD[0]).allow
        return apply_chunk(store, report, cursor, rows, *args)

    monkeypatch.setattr(revalidation, "_apply", start_first)
    report = restoring.revalidate()

    assert (report.total, report.valid, report.invalidated) == (4, 2, 2)
    renewals = restoring.store.query(
        "SELECT payload FROM audit_events WHERE type = 'PROOFS_RENEWED' AND agent_id = ?", (AHEAD[0],)
    )
    assert [json.loads(r["payload"]).get("at_start") for r in renewals] == [True]  # not signed again
    restored = restoring.store.query(
        "SELECT payload FROM audit_events WHERE type = 'AGENT_RESTORED' AND agent_id = ?", (AHEAD[0],)
    )
    assert len(restored) == 1  # by its start, not again by the run
    assert _statuses(restoring)[AHEAD[0]] == Status.GOVERNED_VALID.value


def test_an_invalidated_agent_whose_proof_is_bound_to_the_active_policy_is_restored_at_its_start(
    tmp_path: Path, opa_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that invalidates keeps the agent's proof; org limits changed back (or a rollback)
    bring that proof's policy back under a new run, which would restore the agent (helper-44)."""
    from _reload_support import reload_stopped_at

    with Engine.init(tmp_path / "ws", Config(limits=Limits(revalidation_chunk_size=2)), actor=ACTOR) as eng:
        for agent_id, budget in zip((*JUDGED, *AHEAD), (100, 100, 300, 300), strict=True):
            create_governed(eng, agent_id, budget=budget)
        active = eng.active_policy().hash
        edit_config(eng.workspace.home, lambda raw: raw["org"].__setitem__("max_monthly_budget_usd", 250))
        assert (
            eng.reload_policy(actor=ACTOR, reason="org limits down")["revalidation"]["newly_invalidated"] == 2
        )
        edit_config(eng.workspace.home, lambda raw: raw["org"].__setitem__("max_monthly_budget_usd", 1000))
        reload_stopped_at(eng, AHEAD[0], monkeypatch, reason="org limits up, interrupted")
        assert eng.get_agent(AHEAD[0]).status is Status.GOVERNED_INVALIDATED
        assert _current_proof(eng, AHEAD[0])["policy_hash"] == active  # as before the limits fell

        decision = eng.admit(AHEAD[0])

        assert (decision.allow, decision.code) == (True, Code.ADMISSION_ALLOW), decision.reasons
        assert eng.get_agent(AHEAD[0]).status is Status.GOVERNED_VALID


def test_a_start_is_judged_ahead_of_a_run_whose_process_died_right_after_the_switch(
    tmp_path: Path, opa_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The switch records the org limits its run judges with: before, a process killed between
    the switch and the run's first step left every start denied ("the run has recorded no org
    limits yet") until `agov revalidate`."""
    home = tmp_path / "ws"
    with Engine.init(home, actor=ACTOR) as eng:
        create_governed(eng, "c1-pass", temperature=0.3)  # passes P1 and P2
        p1 = eng.active_policy().hash
        edit_data(home, set_analysis_limit(0.4))
        reload_killed_after_switch(eng, monkeypatch, reason="analysis limit 0.4, then killed")
        p2 = eng.active_policy().hash
        assert p2 != p1 and _current_proof(eng, "c1-pass")["policy_hash"] == p1, "setup"
        run = eng.store.query_one(
            "SELECT cursor, org_digest FROM revalidation_runs WHERE finished_at IS NULL"
        )
        assert (run["cursor"], run["org_digest"] is not None) == ("", True)

    with Engine.open(home) as after:  # the next process
        decision = after.admit("c1-pass")
        assert (decision.allow, decision.policy_hash) == (True, p2), decision.reasons
        assert _current_proof(after, "c1-pass")["policy_hash"] == p2
        report = after.revalidate()  # the run is finished as before
        assert (report.total, report.valid) == (1, 1)
        assert after.verify_audit().ok
