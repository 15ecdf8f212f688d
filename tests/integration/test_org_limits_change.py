"""The org limits in agov.yaml judge agents too, though they are not part of the policy hash: a
change of them alone makes the next reload judge every governed agent again, under the same
hash, with the limits in force. A run interrupted under other limits starts again from the
first agent. Before, an agent over a lowered budget stayed governed until the next policy change.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _reload_support import (
    ACTOR,
    agent_doc,
    create_governed,
    edit_config,
    edit_data,
    metric,
    reload_interrupted_at,
    reload_killed_after_switch,
    set_analysis_limit,
    snapshot,
)

from agov import revalidation
from agov.config import Config, Limits
from agov.decisions import Code
from agov.engine import Engine
from agov.errors import ConflictError, KeyMaterialError, WorkspaceError
from agov.registry import CreationMode
from agov.store.sqlite import SCHEMA_VERSION
from agov.watch import PolicyWatcher

# chunks of one, in id order
CAST = {"a-small": 100, "b-spender": 300, "c-hot": 100}  # monthly budgets; c-hot runs at 0.5


@pytest.fixture
def engine(tmp_path: Path, opa_bin: Path) -> Iterator[Engine]:
    with Engine.init(tmp_path / "ws", Config(limits=Limits(revalidation_chunk_size=1)), actor=ACTOR) as eng:
        for agent_id, budget in CAST.items():
            create_governed(eng, agent_id, temperature=0.5 if agent_id == "c-hot" else 0.3, budget=budget)
        yield eng


def _statuses(engine: Engine) -> dict[str, str]:
    return {a.id: a.status.value for a in engine.list_agents()}


def _set_org_budget(engine: Engine, budget: float) -> None:
    edit_config(engine.workspace.home, lambda raw: raw["org"].update(max_monthly_budget_usd=budget))


def test_lowering_the_org_budget_alone_rejudges_every_agent_at_the_next_reload(engine: Engine) -> None:
    policy_hash = engine.active_policy().hash
    _set_org_budget(engine, 250)  # b-spender's 300 is now over it

    # this engine was opened before the edit: it judges with the limits agov.yaml holds now
    result = engine.reload_policy(actor=ACTOR, reason="org budget lowered")

    assert (result["changed"], result["org_changed"], result["policy_hash"]) == (False, True, policy_hash)
    assert metric(engine, "policy_reload_success_total") == 1, "new limits, as good as a new policy"
    assert {k: result["revalidation"][k] for k in ("total", "valid", "newly_invalidated")} == {
        "total": 3,
        "valid": 2,
        "newly_invalidated": 1,
    }
    assert _statuses(engine) == {
        "a-small": "GOVERNED_VALID",
        "b-spender": "GOVERNED_INVALIDATED",
        "c-hot": "GOVERNED_VALID",
    }
    assert [r["code"] for r in engine.get_agent("b-spender").reasons] == [
        "PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT"
    ]
    assert engine.admit("b-spender").code == "ADMISSION_DENY_INVALIDATED"
    assert engine.admit("a-small").allow, "re-signed under the same policy hash"
    changed = engine.store.query_one(
        "SELECT actor, policy_hash, payload FROM audit_events WHERE type = ?", (Code.ORG_LIMITS_CHANGED,)
    )
    assert (changed["actor"], changed["policy_hash"]) == (ACTOR, policy_hash)
    payload = json.loads(changed["payload"])
    assert payload["reason"] == "org budget lowered" and payload["org"] == {"max_monthly_budget_usd": 250}
    assert payload["previous_org_digest"] != payload["org_digest"]

    # judged once: the next reload, with nothing changed, changes nothing
    before = snapshot(engine.workspace.home)
    again = engine.reload_policy(actor=ACTOR, reason="nothing changed")
    assert (again["org_changed"], again["revalidation"]) == (False, None)
    assert snapshot(engine.workspace.home) == before
    assert metric(engine, "policy_reload_success_total") == 1

    # raising it again restores the agent
    _set_org_budget(engine, 1000)
    restored = engine.reload_policy(actor=ACTOR, reason="org budget raised")
    assert restored["org_changed"] is True and restored["revalidation"]["restored"] == 1
    assert metric(engine, "policy_reload_success_total") == 2
    assert engine.admit("b-spender").allow


def test_a_dry_run_shows_who_an_org_change_would_invalidate_and_changes_nothing(engine: Engine) -> None:
    _set_org_budget(engine, 250)
    before = snapshot(engine.workspace.home)

    result = engine.reload_policy(actor=ACTOR, reason="what if", dry_run=True)

    assert (result["changed"], result["org_changed"]) == (False, True)
    assert [c["agent_id"] for c in result["revalidation"]["changes"]] == ["b-spender"]
    assert snapshot(engine.workspace.home) == before


def test_a_dry_run_beside_an_unfinished_run_names_an_org_change_only_if_there_is_one(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, a policy with no finished run yet read as one whose org limits had changed."""
    reload_interrupted_at(engine, "b-spender", monkeypatch)
    assert engine.reload_policy(actor=ACTOR, reason="what if", dry_run=True)["org_changed"] is False
    _set_org_budget(engine, 250)
    assert engine.reload_policy(actor=ACTOR, reason="what if", dry_run=True)["org_changed"] is True


def test_a_run_interrupted_under_other_org_limits_starts_again_from_the_first_agent(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a reload to P2 (analysis 0.4) judges a-small and b-spender under budget 1000, then stops
    reload_interrupted_at(engine, "c-hot", monkeypatch)
    run = engine.store.query_one("SELECT id, cursor FROM revalidation_runs WHERE finished_at IS NULL")
    assert run is not None and run["cursor"] == "b-spender"
    assert _statuses(engine)["b-spender"] == "GOVERNED_VALID", "judged under budget 1000"

    _set_org_budget(engine, 250)
    # resuming alone (no later full run to hide a resume from the cursor)
    report = engine.resume_revalidation()

    assert report is not None and (report.total, report.resumed) == (3, False), "every agent, not the rest"
    assert _statuses(engine) == {
        "a-small": "GOVERNED_VALID",
        "b-spender": "GOVERNED_INVALIDATED",  # before the cursor: judged again, with 250
        "c-hot": "GOVERNED_INVALIDATED",
    }
    restarted = engine.store.query_one(
        "SELECT payload FROM audit_events WHERE type = ? AND payload LIKE '%org limits%'",
        (Code.POLICY_REVALIDATION,),
    )
    assert restarted is not None
    assert json.loads(restarted["payload"]) == {
        "run_id": run["id"],
        "stopped": "the org limits in agov.yaml changed during the run",
        "restarts_from_the_first_agent": True,
    }
    assert engine.reload_policy(actor=ACTOR, reason="done")["org_changed"] is False


def test_a_store_from_before_org_digests_is_migrated_and_judged_once(engine: Engine) -> None:
    home = engine.workspace.home
    engine.close()
    conn = sqlite3.connect(home / "agov.db")
    with conn:  # back to schema 1, as agov before this change left it
        conn.execute("ALTER TABLE revalidation_runs DROP COLUMN org_digest")
        conn.execute("ALTER TABLE agent_proofs DROP COLUMN seal")  # schema 3's
        conn.execute("PRAGMA user_version = 1")
    conn.close()

    with Engine.open(home) as upgraded:
        assert upgraded.store.schema_version() == SCHEMA_VERSION
        # no run recorded the limits the agents were judged with: judged again, once
        first = upgraded.reload_policy(actor=ACTOR, reason="after the upgrade")
        assert first["org_changed"] is True and first["revalidation"]["total"] == 3
        assert upgraded.reload_policy(actor=ACTOR, reason="again")["org_changed"] is False
        assert all(upgraded.admit(agent_id).allow for agent_id in ("a-small", "b-spender"))


def test_a_run_restarted_by_another_process_after_its_last_chunk_is_not_closed_as_finished(
    engine: Engine,
) -> None:
    """Closing the run checks it is still this process's: else the run would be recorded as
    having judged everyone with the other process's limits, and no later reload would."""
    judged: list[int] = []
    policy_hash = engine.active_policy().hash

    def after_each_chunk(done: int) -> None:
        judged.append(done)
        if len(judged) == len(CAST):  # the last chunk is committed; another process restarts the run
            with Engine.open(engine.workspace.home) as other:
                revalidation._open_run(other.store, policy_hash, None, b"{}", other.clock(), None)

    with pytest.raises(ConflictError, match="restarted it with other org limits"):
        engine.revalidate(progress=after_each_chunk)

    run = engine.store.query_one(
        "SELECT finished_at, cursor, org_digest FROM revalidation_runs ORDER BY id DESC"
    )
    assert (run["finished_at"], run["cursor"]) == (None, ""), "left to the process that restarted it"
    assert run["org_digest"] == revalidation.org_digest(b"{}")


def test_an_unreadable_agov_yaml_denies_a_promotion_and_refuses_a_reload_before_anything_changes(
    engine: Engine,
) -> None:
    home = engine.workspace.home
    engine.create_agent(agent_doc("d-new"), mode=CreationMode.IMPORT, source="x", actor=ACTOR)
    edit_data(home, set_analysis_limit(0.4))
    config = (home / "agov.yaml").read_text()
    # unparseable; empty (as an in-place save may leave it for a moment); gone
    for broken in (config + "org: [not, a, mapping]\n", "", None):
        if broken is None:
            (home / "agov.yaml").unlink()
        else:
            (home / "agov.yaml").write_text(broken)
        before = snapshot(home)
        active = engine.active_policy().hash

        result = engine.promote("d-new", actor=ACTOR, role="agent_admin")
        assert not result.allow and [r.code for r in result.deny] == ["PROMOTION_DENY_ENGINE_UNAVAILABLE"]
        assert "agov.yaml" in result.deny[0].message
        with pytest.raises(WorkspaceError, match=r"agov\.yaml"):
            engine.reload_policy(actor=ACTOR, reason="P2 without org limits")

        assert engine.active_policy().hash == active, "the policy was not switched"
        after = snapshot(home)
        # only the audit log grows: the candidate is not even recorded as a version
        kept = (
            "agents",
            "agent_versions",
            "agent_proofs",
            "revalidation_runs",
            "signing_keys",
            "policy_versions",
        )
        assert {t: after[t] for t in kept} == {t: before[t] for t in kept}
        assert engine.store.query("SELECT hash FROM policy_versions WHERE active = 1")[0][0] == active
        types = [e[0] for e in engine.store.query("SELECT type FROM audit_events ORDER BY seq DESC LIMIT 3")]
        assert types == ["POLICY_RELOAD_REFUSED", "PROMOTION_DENIED", "PROMOTION_ATTEMPT"], types


def _events(engine: Engine, kind: str) -> list[dict[str, Any]]:
    rows = engine.store.query("SELECT actor, payload FROM audit_events WHERE type = ? ORDER BY seq", (kind,))
    return [{"actor": r["actor"], **json.loads(r["payload"])} for r in rows]


def test_an_org_change_with_no_key_that_may_sign_is_refused_and_audited_as_refused(engine: Engine) -> None:
    (key,) = engine.list_keys()
    engine.revoke_key(key.keyid, reason="compromised", actor=ACTOR)
    _set_org_budget(engine, 250)
    before = snapshot(engine.workspace.home)

    for attempt in ("first", "second"):
        with pytest.raises(KeyMaterialError):
            engine.reload_policy(actor=ACTOR, reason=f"org budget lowered, {attempt} try")

    after = snapshot(engine.workspace.home)
    kept = ("agents", "agent_versions", "agent_proofs", "revalidation_runs", "policy_versions")
    assert {t: after[t] for t in kept} == {t: before[t] for t in kept}
    assert _events(engine, Code.ORG_LIMITS_CHANGED) == [], "no re-judgement happened, none is recorded"
    assert len(_events(engine, Code.POLICY_RELOAD_REFUSED)) == 2


def test_an_unchanged_tree_whose_org_limits_cannot_be_read_is_a_refused_reload(engine: Engine) -> None:
    config = engine.workspace.home / "agov.yaml"
    config.write_text(config.read_text() + "org: [not, a, mapping]\n")

    with pytest.raises(WorkspaceError):
        engine.reload_policy(actor=ACTOR, reason="same tree")

    (refused,) = _events(engine, Code.POLICY_RELOAD_REFUSED)
    assert refused["actor"] == ACTOR and "agov.yaml" in refused["error"]


def test_an_org_change_picked_up_by_resuming_an_interrupted_run_is_audited_once(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    reload_interrupted_at(engine, "c-hot", monkeypatch)
    run = engine.store.query_one("SELECT id, org_digest FROM revalidation_runs WHERE finished_at IS NULL")
    _set_org_budget(engine, 250)

    result = engine.reload_policy(actor=ACTOR, reason="finish P2, with the lower budget")

    assert (result["changed"], result["org_changed"]) == (False, True)
    assert result["revalidation"]["total"] == 3
    (changed,) = _events(engine, Code.ORG_LIMITS_CHANGED)
    assert (changed["actor"], changed["reason"], changed["run_id"]) == (
        ACTOR,
        "finish P2, with the lower budget",
        run["id"],
    )
    assert changed["restarts_from_the_first_agent"] is True
    assert changed["org"] == {"max_monthly_budget_usd": 250}
    assert changed["previous_org_digest"] == run["org_digest"], "the limits the run had judged with"
    assert _statuses(engine)["b-spender"] == "GOVERNED_INVALIDATED"
    assert engine.reload_policy(actor=ACTOR, reason="again")["org_changed"] is False
    assert len(_events(engine, Code.ORG_LIMITS_CHANGED)) == 1


def test_a_policy_switch_that_meets_changed_org_limits_says_so_and_audits_them_with_its_run(
    engine: Engine,
) -> None:
    first = engine.active_policy().hash
    _set_org_budget(engine, 250)  # b-spender's 300 is over it
    edit_data(engine.workspace.home, set_analysis_limit(0.4))  # c-hot's 0.5 is over it

    preview = engine.reload_policy(actor=ACTOR, reason="what if", dry_run=True)
    assert (preview["changed"], preview["org_changed"]) == (True, True)
    assert _events(engine, Code.ORG_LIMITS_CHANGED) == [], "a dry run records nothing"

    result = engine.reload_policy(actor=ACTOR, reason="stricter policy, lower budget")

    assert (result["changed"], result["org_changed"]) == (True, True)
    assert _statuses(engine) == {
        "a-small": "GOVERNED_VALID",
        "b-spender": "GOVERNED_INVALIDATED",
        "c-hot": "GOVERNED_INVALIDATED",
    }
    run = engine.store.query_one(
        "SELECT id, org_digest FROM revalidation_runs WHERE policy_hash = ?", (result["policy_hash"],)
    )
    (changed,) = _events(engine, Code.ORG_LIMITS_CHANGED)
    assert (changed["actor"], changed["reason"], changed["run_id"]) == (
        ACTOR,
        "stricter policy, lower budget",
        run["id"],
    )
    assert changed["org_digest"] == run["org_digest"]
    assert changed["previous_org_digest"] == revalidation.judged_org(engine.store, first)
    assert changed["previous_org_digest"] != changed["org_digest"]

    # a policy change alone is no org change
    edit_data(engine.workspace.home, set_analysis_limit(0.6))
    assert engine.reload_policy(actor=ACTOR, reason="policy only")["org_changed"] is False
    # a rollback under other limits than those the policy it leaves was judged with says so too
    _set_org_budget(engine, 1000)
    rolled = engine.rollback_policy(first, actor=ACTOR, reason="back, and the budget too")
    assert rolled["org_changed"] is True
    assert [e["reason"] for e in _events(engine, Code.ORG_LIMITS_CHANGED)] == [
        "stricter policy, lower budget",
        "back, and the budget too",
    ]
    assert engine.admit("b-spender").allow and engine.admit("c-hot").allow


def test_each_committed_chunk_audits_the_proofs_it_renewed_and_a_stopped_run_no_more(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of one: the run stops at c-hot, after a-small and b-spender were committed; one
    event per committed chunk, none for the chunk that never committed."""
    reload_interrupted_at(engine, "c-hot", monkeypatch)
    renewed = _events(engine, Code.PROOFS_RENEWED)
    run = engine.store.query_one("SELECT id FROM revalidation_runs WHERE finished_at IS NULL")
    assert [(e["run_id"], e["agents"], e["first"], e["last"]) for e in renewed] == [
        (run["id"], 1, "a-small", "a-small"),
        (run["id"], 1, "b-spender", "b-spender"),
    ]
    assert engine.verify_audit().ok


def test_serve_watch_rejudges_the_agents_when_agov_yaml_is_saved(engine: Engine) -> None:
    """`serve --watch` watches agov.yaml too: a saved budget cut invalidates the agent over it."""
    failures: list[BaseException] = []

    def reload() -> None:  # as cli.py's serve wires it
        try:
            engine.reload_policy(actor=ACTOR, reason="watch: policy files or agov.yaml changed")
        except Exception as exc:
            failures.append(exc)

    watcher = PolicyWatcher(
        engine.workspace.policies, reload, config_file=engine.workspace.home / "agov.yaml"
    )
    watcher.start()
    try:
        time.sleep(0.2)
        _set_org_budget(engine, 250)
        deadline = time.monotonic() + 20
        while _statuses(engine)["b-spender"] != "GOVERNED_INVALIDATED" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watcher.stop()
    assert failures == []
    assert _statuses(engine)["b-spender"] == "GOVERNED_INVALIDATED"
    assert [e["reason"] for e in _events(engine, Code.ORG_LIMITS_CHANGED)] == [
        "watch: policy files or agov.yaml changed"
    ]


@pytest.mark.parametrize("command", [["policy", "reload"], ["revalidate"]])
def test_a_command_that_finishes_an_interrupted_run_says_so(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    """Before, `policy reload` said only "policy unchanged" after judging the rest of the run,
    and `revalidate` did not say it resumed one."""
    from click.testing import CliRunner

    from agov.cli import main

    reload_interrupted_at(engine, "c-hot", monkeypatch)
    said = CliRunner().invoke(main, [*command, "--home", str(engine.workspace.home)])
    assert said.exit_code == 0, said.output
    expected = (
        "; finished an interrupted run\nrevalidated 3 governed agents"
        if command[0] == "policy"
        else "resumed an interrupted run\nrevalidated"
    )
    assert expected in said.output, said.output


def test_a_switch_killed_before_its_run_leaves_one_org_change_and_a_later_edit_adds_its_own(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The switch audits the org change with the run it opens. Resumed by `agov revalidate`
    after agov.yaml changed again, the run records that change too, so that its last
    ORG_LIMITS_CHANGED names the limits it judged with."""
    _set_org_budget(engine, 250)
    edit_data(engine.workspace.home, set_analysis_limit(0.4))
    reload_killed_after_switch(engine, monkeypatch, reason="budget 250 and analysis 0.4")
    run = engine.store.query_one("SELECT id, org_digest FROM revalidation_runs WHERE finished_at IS NULL")
    (switched,) = _events(engine, Code.ORG_LIMITS_CHANGED)
    assert (switched["reason"], switched["run_id"], switched["org_digest"]) == (
        "budget 250 and analysis 0.4",
        run["id"],
        run["org_digest"],
    )

    _set_org_budget(engine, 200)
    with Engine.open(engine.workspace.home) as after:
        report = after.revalidate()
        assert report.total == 3
        changes = _events(after, Code.ORG_LIMITS_CHANGED)
        assert len(changes) == 2, changes
        since = changes[-1]
        assert since["run_id"] == run["id"] and since["previous_org_digest"] == run["org_digest"]
        assert since["actor"] == "agov-revalidation"
        assert since["org"] == {"max_monthly_budget_usd": 200}
        final = after.store.query_one("SELECT org_digest FROM revalidation_runs WHERE id = ?", (run["id"],))
        assert since["org_digest"] == final["org_digest"]
        assert after.verify_audit().ok
