"""Policy hot reload and revalidation against a real managed OPA, through the Python API.

Each test gets a fresh workspace (``Engine.init``) whose agents are created and promoted through
OPA. Policies are changed the way a user does it: by editing ``<home>/policies``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _reload_support import (
    ACTOR,
    KnownBug,
    agent_doc,
    configmap_volume,
    create_governed,
    current_proofs,
    data_file,
    edit_config,
    edit_data,
    metric,
    reload_interrupted_at,
    set_analysis_limit,
    snapshot,
    statuses,
)

from agov import keys, policy, revalidation
from agov.bundle import Trial, compute_policy_hash
from agov.cli import _exit_for
from agov.engine import Engine
from agov.errors import (
    ConflictError,
    EngineUnavailableError,
    KeyMaterialError,
    NotFoundError,
    PolicyError,
    StoreError,
    UsageError,
)
from agov.opa.binary import find_opa
from agov.opa.managed import ManagedSidecar
from agov.proofs import verify_proof
from agov.store.sqlite import utcnow
from agov.watch import PolicyWatcher

pytestmark = pytest.mark.integration

SUCCESS = "policy_reload_success_total"
FAILURE = "policy_reload_failure_total"
STOPPED = "revalidation_stopped_total"
INVALIDATIONS = "agent_invalidation_events_total"

# The cast: under the shipped policy (analysis temperature <= 0.7, org budget 1000) all are
# governed. Lowering the analysis limit to 0.4 invalidates the two hot ones; lowering the org
# budget to 350 in agov.yaml puts `big-spender` (300 > 0.8 * 350) near the limit (RESTRICTED).
CAST: dict[str, dict[str, object]] = {
    "hot-analyst": {"temperature": 0.5},
    "warm-analyst": {"temperature": 0.45},
    "cool-analyst": {"temperature": 0.3},
    "big-spender": {"temperature": 0.3, "budget": 300},
    "auto-agent": {"temperature": 0.2, "agent_type": "autonomous"},
}
BEFORE = {
    "hot-analyst": "GOVERNED_VALID",
    "warm-analyst": "GOVERNED_VALID",
    "cool-analyst": "GOVERNED_VALID",
    "big-spender": "GOVERNED_VALID",
    "auto-agent": "GOVERNED_RESTRICTED",
}
INVALIDATED_BY_04 = {"hot-analyst", "warm-analyst"}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "ws"


@pytest.fixture
def engine(home: Path) -> Iterator[Engine]:
    """A workspace with the cast governed under the shipped policy."""
    with Engine.init(home, actor=ACTOR) as eng:
        for agent_id, knobs in CAST.items():
            create_governed(eng, agent_id, **knobs)
        assert statuses(home) == BEFORE
        yield eng


def _audit(engine: Engine, after: int, type_: str | None = None) -> list[dict[str, object]]:
    return [
        e.as_dict() for e in engine.store.audit_events(after_seq=after) if type_ is None or e.type == type_
    ]


def _last_seq(engine: Engine) -> int:
    events = engine.store.audit_events()
    return events[-1].seq if events else 0


def _assert_proofs_bound(engine: Engine, home: Path, policy_hash: str) -> None:
    """Every governed agent has exactly one current proof; every agent still allowed to run has
    one whose *signed* policy hash (not just the column) is ``policy_hash``."""
    now = utcnow()
    agent_status = statuses(home)
    for agent_id, rows in current_proofs(home).items():
        assert len(rows) == 1, f"{agent_id}: {len(rows)} current proofs"
        if agent_status[agent_id] == "GOVERNED_INVALIDATED":
            continue
        row = rows[0]
        assert row["policy_hash"] == policy_hash, agent_id
        trusted = keys.load_trusted_key(engine.workspace.keys, row["keyid"])
        claims = verify_proof(bytes(row["envelope"]), {row["keyid"]: trusted}, now).claims
        assert claims.policy_hash == policy_hash, agent_id
        assert claims.agent_id == agent_id
        assert claims.governance_status == agent_status[agent_id]


# --- reload activates ----------------------------------------------------------------------------


def test_reload_after_a_data_change_activates_the_new_hash_in_store_and_opa(
    engine: Engine, home: Path
) -> None:
    old = engine.active_policy().hash
    assert engine.evaluator().revision() == old
    versions_before = engine.policy_history()
    seq = _last_seq(engine)

    edit_data(home, set_analysis_limit(0.65))  # tighter, but every analyst still passes
    expected = compute_policy_hash(engine.workspace.policies)
    result = engine.reload_policy(actor=ACTOR, reason="tighten analysis")

    assert result["changed"] is True
    assert result["previous_hash"] == old
    assert result["policy_hash"] == expected != old
    # store: one new row, now the only active one
    versions = engine.policy_history()
    assert [v.hash for v in versions] == [*(v.hash for v in versions_before), expected]
    assert [v.hash for v in versions if v.active] == [expected]
    assert versions[-1].actor == ACTOR and versions[-1].reason == "tighten analysis"
    assert engine.active_policy().hash == expected
    # OPA: provenance names the new hash, and decisions carry it
    assert engine.evaluator().revision() == expected
    decision = engine.admit("cool-analyst")
    assert decision.allow and decision.policy_hash == expected
    # audit: one POLICY_HOTRELOAD naming both hashes, then the revalidation run
    reloads = _audit(engine, seq, "POLICY_HOTRELOAD")
    assert len(reloads) == 1
    assert reloads[0]["policy_hash"] == expected
    payload = reloads[0]["payload"]
    assert isinstance(payload, dict)
    assert payload["previous_hash"] == old and payload["reason"] == "tighten analysis"
    runs = _audit(engine, seq, "POLICY_REVALIDATION")
    assert [(r["policy_hash"], r["payload"]["total"]) for r in runs] == [(expected, len(CAST))]
    # each chunk's renewed proofs are audited in the transaction that stores them
    (renewed,) = _audit(engine, seq, "PROOFS_RENEWED")
    assert (renewed["policy_hash"], renewed["actor"]) == (expected, "agov-revalidation")
    assert {k: renewed["payload"][k] for k in ("run_id", "agents", "first", "last")} == {
        "run_id": runs[0]["payload"]["run_id"],
        "agents": len(CAST),
        "first": min(CAST),
        "last": max(CAST),
    }
    assert renewed["seq"] < runs[0]["seq"]
    assert statuses(home) == BEFORE
    _assert_proofs_bound(engine, home, expected)
    assert metric(engine, SUCCESS) == 1 and metric(engine, FAILURE) == 0
    assert engine.verify_audit().ok


# --- refused reloads -----------------------------------------------------------------------------


def _syntax_error(home: Path) -> Callable[[], None]:
    path = home / "policies" / "agov" / "lib" / "broken" / "broken.rego"
    path.parent.mkdir()
    path.write_text("package agov.lib.broken\n\nallow if {\n")
    return lambda: shutil.rmtree(path.parent)


def _builtin_error_on_the_fleet(home: Path) -> Callable[[], None]:
    # `opa test` passes: a builtin error there only leaves the rule undefined. The sidecar is
    # asked with strict builtin errors, where "1.0.0", every governed agent's version, fails the
    # whole query: before the trial run, this policy went live and every revalidation stopped.
    path = home / "policies" / "agov" / "promotion" / "promotion.rego"
    original = path.read_text()
    path.write_text(
        original
        + '\ndeny contains _finding("PROMOTION_DENY_OLD_VERSION", "version below 1") if {\n'
        + "\tto_number(input.agent.metadata.version) < 1\n}\n"
    )
    return lambda: path.write_text(original)


def _check_in_the_full_rules_alone(home: Path) -> Callable[[], None]:
    # A check added to spec_rules' _denials, not to deny_for's fast path: `opa test` passes (no
    # test agent is an analyst), but the fast path passes every governed analyst, so the check
    # would never run for them, in a revalidation or a promotion.
    path = home / "policies" / "agov" / "lib" / "spec_rules" / "spec_rules.rego"
    original = path.read_text()
    union = "_denials(agent, org) := union({\n"
    assert original.count(union) == 1, "setup: spec_rules.rego has the _denials union"
    path.write_text(
        original.replace(
            union, union + '\t_analyst_denials(object.get(doc, ["agent", "metadata", "id"], null)),\n'
        )
        + '\n_analyst_denials(id) := {_finding("PROMOTION_DENY_NO_ANALYSTS", "no analysts")} if {\n'
        + '\tendswith(id, "-analyst")\n} else := set()\n'
    )
    return lambda: path.write_text(original)


def _failing_test(home: Path) -> Callable[[], None]:
    # A test file is not part of the bundle (the hash does not change), but `opa test` gates it.
    path = home / "policies" / "agov" / "lib" / "spec_rules" / "zz_reload_test.rego"
    path.write_text("package agov.lib.zz_reload_test\n\ntest_always_fails if {\n\tfalse\n}\n")
    return path.unlink


def _failing_test_with_a_change(home: Path) -> Callable[[], None]:
    # The same, together with a real change (the hash would change): still refused.
    undo_test = _failing_test(home)
    original = data_file(home).read_text()
    edit_data(home, set_analysis_limit(0.4))

    def undo() -> None:
        undo_test()
        data_file(home).write_text(original)

    return undo


def _malformed_data(home: Path) -> Callable[[], None]:
    # `opa check` does not load data files; `opa test` does, and refuses this one.
    original = data_file(home).read_text()
    data_file(home).write_text('{"temperature_limits": {"analysis": 0.4},\n')
    return lambda: data_file(home).write_text(original)


def _repeated_data_key(home: Path) -> Callable[[], None]:
    # whoever reviews the file reads 0.4; OPA would judge with 0.9
    original = data_file(home).read_text()
    data_file(home).write_text('{"temperature_limits": {"analysis": 0.4, "analysis": 0.9}}\n')
    return lambda: data_file(home).write_text(original)


def _mistyped_limits(home: Path) -> Callable[[], None]:
    # well-formed JSON that every check but the workspace's config tests passes: once live, the
    # revalidation would fail on a builtin error (every governed agent's start then denied)
    original = data_file(home).read_text()
    data_file(home).write_text(
        original.replace('"temperature_limits": {', '"temperature_limits": "x", "was": {')
    )
    return lambda: data_file(home).write_text(original)


def _limit_as_a_string(home: Path) -> Callable[[], None]:
    # once live, every analysis agent would be invalidated as of an unknown role class
    original = data_file(home).read_text()
    data_file(home).write_text(original.replace('"analysis": 0.7', '"analysis": "0.7"'))
    return lambda: data_file(home).write_text(original)


def _data_file_a_bundle_ignores(home: Path) -> Callable[[], None]:
    # `opa test` on the directory loads blocked.json as data.agov.config; a bundle loads only
    # data.json/data.yaml, so a rule tested against it would never fire in the sidecar.
    path = data_file(home).with_name("blocked.json")
    path.write_text('{"blocked_models": ["gpt-x"]}\n')
    return path.unlink


def _rego_outside_the_bundle_root(home: Path) -> Callable[[], None]:
    path = home / "policies" / "lib" / "helpers.rego"
    path.parent.mkdir()
    path.write_text('package lib.helpers\n\nblocked_models := {"gpt-x"}\n')
    return lambda: shutil.rmtree(path.parent)


def _every_test_removed(home: Path) -> Callable[[], None]:
    # `opa test` passes with nothing to run: the policy would go live untested
    aside = home / "tests.aside"
    aside.mkdir()
    moved = [
        (path, aside / str(number))
        for number, path in enumerate(sorted((home / "policies").rglob("*_test.rego")))
    ]
    assert moved, "setup: the workspace has tests"
    for path, kept in moved:
        path.rename(kept)

    def undo() -> None:
        for path, kept in moved:
            kept.rename(path)
        aside.rmdir()

    return undo


def _admission_package_removed(home: Path) -> Callable[[], None]:
    # Checks and tests still pass without it; only the entrypoint check sees that no rule
    # answers agov/admission/decision (every start would then be denied as undefined).
    package = home / "policies" / "agov" / "admission"
    aside = home / "admission.aside"
    package.rename(aside)
    return lambda: aside.rename(package)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (_syntax_error, "opa check --strict failed"),
        (_failing_test, "opa test failed"),
        (_failing_test_with_a_change, "opa test failed"),
        (
            _malformed_data,
            "opa test could not load the policy tree:\n.*/agov/config/data.json: unexpected EOF",
        ),
        (_repeated_data_key, "config/data.json: the key 'analysis' appears twice in one object"),
        (_mistyped_limits, "(?s)opa test failed.*test_temperature_limits_map_role_classes_to_numbers"),
        (_limit_as_a_string, "(?s)opa test failed.*test_temperature_limits_map_role_classes_to_numbers"),
        (_data_file_a_bundle_ignores, "blocked.json: a bundle takes data only from files named data.json"),
        (_rego_outside_the_bundle_root, "helpers.rego: outside agov/, the bundle's only root"),
        (_every_test_removed, "opa test ran no tests: .*/policies has none that passed"),
        (_admission_package_removed, 'entrypoint "agov/admission/decision" does not refer to a rule'),
        (
            _builtin_error_on_the_fleet,
            "(?s)the trial run of the new policy on the first chunk of governed agents .* failed:"
            '.*/policies/agov/promotion/promotion.rego:[0-9]+: eval_builtin_error: to_number: .*"1.0.0"',
        ),
        (
            _check_in_the_full_rules_alone,
            "(?s)the trial run of the new policy on the first chunk of governed agents .* failed: the"
            r" policy's own check \(agov/revalidation/trial_failures\) found 3 problems:\n"
            r'- agent "cool-analyst": \["PROMOTION_DENY_NO_ANALYSTS"\] found by the full rules.*'
            '- agent "hot-analyst".*- agent "warm-analyst"',
        ),
    ],
    ids=[
        "rego-syntax-error",
        "failing-opa-test",
        "failing-opa-test-with-change",
        "malformed-data-json",
        "repeated-data-key",
        "mistyped-limits",
        "limit-as-a-string",
        "data-file-a-bundle-ignores",
        "rego-outside-the-bundle-root",
        "every-test-removed",
        "admission-package-removed",
        "builtin-error-on-the-fleet",
        "check-in-the-full-rules-alone",
    ],
)
def test_a_refused_reload_keeps_the_old_policy_in_store_and_opa(
    engine: Engine, home: Path, breakage: Callable[[Path], Callable[[], None]], message: str
) -> None:
    old = engine.active_policy().hash
    assert engine.evaluator().revision() == old
    before = snapshot(home)
    seq = _last_seq(engine)

    undo = breakage(home)
    with pytest.raises(PolicyError, match=message) as refused:
        engine.reload_policy(actor=ACTOR, reason="broken edit")
    # the error names the user's files, never the temporary snapshot they were checked in
    assert "agov-bundle-" not in refused.value.message
    if breakage is _syntax_error:
        assert str(home / "policies" / "agov") in refused.value.message

    # the old hash stays active, in the store and in OPA, and still decides
    assert engine.active_policy().hash == old
    assert engine.evaluator().revision() == old
    decision = engine.admit("cool-analyst")
    assert decision.allow and decision.policy_hash == old
    # nothing changed but the one audit row of the refusal
    after = snapshot(home)
    for table in before:
        if table not in ("audit_events", "__anchor__"):
            assert after[table] == before[table], table
    new_events = _audit(engine, seq)
    assert [e["type"] for e in new_events] == ["POLICY_RELOAD_REFUSED"]
    refused = new_events[0]
    assert refused["policy_hash"] == old and refused["actor"] == ACTOR
    assert re.search(message, refused["payload"]["error"])
    assert metric(engine, FAILURE) == 1 and metric(engine, SUCCESS) == 0
    assert statuses(home) == BEFORE
    assert engine.verify_audit().ok

    # once the edit is undone, the tree is the active policy again: nothing to do
    undo()
    assert engine.reload_policy(actor=ACTOR, reason="undone")["changed"] is False
    assert engine.active_policy().hash == old


@pytest.mark.parametrize(
    "query", ["agov/revalidation/no_such_rule", "agov/promotion/deny"], ids=["undefined", "a-set"]
)
def test_a_trial_run_that_gives_no_object_is_refused_saying_so(
    engine: Engine, home: Path, tmp_path: Path, query: str
) -> None:
    """`opa eval --fail` prints nothing for an undefined result: the message says what that means.
    A set (promotion's deny here) is no object either: a revalidation would stop on it."""
    trial = Trial("two agents", query, lambda _hash: b'{"agents": []}', timeout_s=30)
    out = tmp_path / "bundles"
    with pytest.raises(PolicyError, match="the result is undefined, or not an object") as refused:
        policy.build(find_opa(), home / "policies", out, home / "keys", trial=trial)
    assert refused.value.message.startswith("the trial run of the new policy on two agents")
    assert not out.exists()  # no bundle was written


def test_trial_failures_are_listed_five_at_most(engine: Engine, home: Path, tmp_path: Path) -> None:
    """The policy's own check, on a chunk of seven analysts: refused, with the first five named."""
    _check_in_the_full_rules_alone(home)
    names = [f"a{number}-analyst" for number in range(7)]
    chunk = {
        "agents": [{"id": name, "agent": agent_doc(name)} for name in names],
        "org": {"max_monthly_budget_usd": 1000},
        "policy_hash": "x",
        "now": "2026-03-01T12:00:00Z",
    }
    trial = Trial(
        "seven analysts",
        revalidation.REVALIDATION_PATH,
        lambda _hash: json.dumps(chunk).encode(),
        timeout_s=30,
        failures_rule=revalidation.TRIAL_FAILURES_PATH,
    )
    out = tmp_path / "bundles"
    with pytest.raises(PolicyError, match="found 7 problems:") as refused:
        policy.build(find_opa(), home / "policies", out, home / "keys", trial=trial)
    shown = re.findall(
        r'^- agent "(a[0-9]-analyst)": \["PROMOTION_DENY_NO_ANALYSTS"\]', refused.value.message, re.M
    )
    assert shown == names[:5]
    assert refused.value.message.endswith("\n(and 2 more)")
    assert not out.exists()


def test_a_built_bundle_is_on_disk_before_the_store_can_name_it(
    engine: Engine, home: Path, tmp_path: Path, file_syncs: list[tuple[str, str, str]]
) -> None:
    """The store commits durably (synchronous=FULL): the bundle it names must survive a power loss
    as well, content and name, so both are synced before a build returns."""
    out = tmp_path / "bundles"
    built = policy.build(find_opa(), home / "policies", out, home / "keys")
    mine = [step for step in file_syncs if step[1].startswith(str(out))]
    assert [step for step, *_ in mine] == ["fsync", "replace", "fsync"], mine
    temporary = mine[0][1]
    assert temporary.startswith(f"{out}/.{built.policy_hash}.")  # the content, under its temporary name
    assert mine[1][1:] == (temporary, str(built.path))
    assert mine[2][1] == str(out)  # the directory, which holds the new name


def test_a_dry_run_reload_makes_the_trial_run_too(engine: Engine, home: Path) -> None:
    """Before: the dry run activated the policy on a throwaway sidecar, where the revalidation
    failed with an internal error (exit 3) naming the bundle's path; the reload refuses it."""
    before = snapshot(home)
    _builtin_error_on_the_fleet(home)
    with pytest.raises(PolicyError, match="the trial run of the new policy") as refused:
        engine.reload_policy(actor=ACTOR, reason="dry", dry_run=True)
    assert f"{home}/policies/agov/promotion/promotion.rego:" in refused.value.message
    assert snapshot(home) == before  # a dry run writes nothing, not even an audit event


def test_a_trial_that_cannot_read_the_agents_is_a_refused_reload(
    engine: Engine, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store failing while the trial run reads the fleet: refused, audited and counted as
    every other refused reload is, and the old policy stays."""

    def store_fails(*_args: object) -> bytes:
        raise StoreError("injected: the store went away")

    old = engine.active_policy().hash
    seq = _last_seq(engine)
    edit_data(home, set_analysis_limit(0.4))
    monkeypatch.setattr(revalidation, "trial_input", store_fails)
    with pytest.raises(StoreError, match="injected"):
        engine.reload_policy(actor=ACTOR, reason="store down")
    assert engine.active_policy().hash == old and statuses(home) == BEFORE
    assert [e["type"] for e in _audit(engine, seq)] == ["POLICY_RELOAD_REFUSED"]
    assert metric(engine, FAILURE) == 1 and metric(engine, SUCCESS) == 0


def test_a_reload_with_no_opa_binary_that_runs_is_refused_and_audited(
    engine: Engine, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: refused (the error said why) but left no trace in the audit log, though every
    other refused reload does; a serve --watch whose AGOV_OPA_BIN broke refused silently."""
    old = engine.active_policy().hash
    edit_data(home, set_analysis_limit(0.4))
    seq = _last_seq(engine)
    monkeypatch.setenv("AGOV_OPA_BIN", str(home / "no-such-opa"))
    with pytest.raises(EngineUnavailableError):
        engine.reload_policy(actor=ACTOR, reason="opa gone")
    assert engine.active_policy().hash == old
    (refused,) = _audit(engine, seq)
    assert (refused["type"], refused["policy_hash"]) == ("POLICY_RELOAD_REFUSED", old)
    assert "no-such-opa" in refused["payload"]["error"]
    assert metric(engine, FAILURE) == 1 and statuses(home) == BEFORE


def _kill_managed_opa(engine: Engine) -> int:
    sidecar = engine.evaluator()
    assert isinstance(sidecar, ManagedSidecar) and sidecar.pid is not None, "setup: a managed OPA runs"
    pid = sidecar.pid
    os.kill(pid, signal.SIGKILL)  # as the OOM killer would
    deadline = time.monotonic() + 10
    while sidecar.exit_note() is None:
        assert time.monotonic() < deadline, "setup: the killed OPA was never reaped"
        time.sleep(0.02)
    return pid


def test_a_managed_opa_that_died_is_started_again_for_the_next_decision_and_reload(
    engine: Engine, home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, every later decision of a long-lived engine failed closed, and every reload of a
    running `serve --watch` was refused, until the process restarted."""
    old = engine.active_policy().hash
    first = _kill_managed_opa(engine)

    with caplog.at_level("WARNING", logger="agov.engine"):
        decision = engine.admit("cool-analyst")
    assert decision.allow and decision.policy_hash == old, decision
    assert getattr(engine.evaluator(), "pid", None) not in (None, first)
    assert any("the managed OPA exited (exit code -9" in r.getMessage() for r in caplog.records)

    _kill_managed_opa(engine)
    edit_data(home, set_analysis_limit(0.4))
    reloaded = engine.reload_policy(actor=ACTOR, reason="after OPA died")
    assert reloaded["changed"] and engine.evaluator().revision() == reloaded["policy_hash"] != old
    assert engine.admit("cool-analyst").allow
    assert engine.admit("hot-analyst").code == "ADMISSION_DENY_INVALIDATED"


def test_a_dead_sidecar_the_caller_passed_in_is_not_replaced(engine: Engine, home: Path) -> None:
    """Its owner restarts it, if anyone: a replacement started here was never stopped."""
    theirs = engine.evaluator()
    with Engine.open(home, evaluator=theirs) as borrowing:
        _kill_managed_opa(borrowing)
        denied = borrowing.admit("cool-analyst")
        assert (denied.allow, denied.code) == (False, "ADMISSION_DENY_ENGINE_UNAVAILABLE")
        assert borrowing.evaluator() is theirs


def test_a_dead_opa_that_fails_to_start_again_is_retried_at_most_once_per_backoff(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each decision waiting out a start that hangs (20 s each, one after another) would be worse
    than the fast deny a dead sidecar gave before: one attempt, then denies at once until the
    backoff has passed."""
    import agov.engine as engine_module

    _kill_managed_opa(engine)
    attempts: list[str] = []
    start = engine._start_managed

    def start_fails(*args: Any) -> Any:
        attempts.append("start")
        raise EngineUnavailableError("injected: OPA would not start")

    monkeypatch.setattr(engine, "_start_managed", start_fails)
    first = engine.admit("cool-analyst")
    assert (first.allow, first.code) == (False, "ADMISSION_DENY_ENGINE_UNAVAILABLE")
    assert "injected: OPA would not start" in first.reasons[0].message
    again = engine.admit("cool-analyst")
    assert "starting it again failed: injected" in again.reasons[0].message, again
    assert attempts == ["start"], "no second attempt within the backoff"

    monkeypatch.setattr(engine_module, "_RESTART_BACKOFF_S", 0.0)
    monkeypatch.setattr(engine, "_start_managed", start)
    assert engine.admit("cool-analyst").allow, "the next attempt after the backoff starts OPA"
    assert attempts == ["start"]


# --- revalidation transitions --------------------------------------------------------------------


def test_revalidation_invalidates_restricts_and_binds_proofs_to_the_new_hash(home: Path) -> None:
    with Engine.init(home, actor=ACTOR) as eng:
        for agent_id, knobs in CAST.items():
            create_governed(eng, agent_id, **knobs)
        old = eng.active_policy().hash
    assert statuses(home) == BEFORE
    # org limits are configuration (agov.yaml), read when an engine judges
    edit_config(home, lambda raw: raw["org"].update(max_monthly_budget_usd=350))
    edit_data(home, set_analysis_limit(0.4))

    with Engine.open(home) as engine:
        seq = _last_seq(engine)
        result = engine.reload_policy(actor=ACTOR, reason="tighten analysis")
        new = result["policy_hash"]
        assert result["changed"] is True and new != old
        report = result["revalidation"]
        assert {
            k: report[k] for k in ("total", "valid", "restricted", "invalidated", "newly_invalidated")
        } == {
            "total": 5,
            "valid": 1,
            "restricted": 2,
            "invalidated": 2,
            "newly_invalidated": 2,
        }
        assert statuses(home) == {
            "hot-analyst": "GOVERNED_INVALIDATED",
            "warm-analyst": "GOVERNED_INVALIDATED",
            "cool-analyst": "GOVERNED_VALID",
            "big-spender": "GOVERNED_RESTRICTED",
            "auto-agent": "GOVERNED_RESTRICTED",
        }
        # the run names who changed and why, as a dry run does
        assert {
            c["agent_id"]: (c["from"], c["to"], [d["code"] for d in c["deny"]]) for c in report["changes"]
        } == {
            "hot-analyst": (
                "GOVERNED_VALID",
                "GOVERNED_INVALIDATED",
                ["PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT"],
            ),
            "warm-analyst": (
                "GOVERNED_VALID",
                "GOVERNED_INVALIDATED",
                ["PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT"],
            ),
            "big-spender": ("GOVERNED_VALID", "GOVERNED_RESTRICTED", []),
        }
        assert report["changes_omitted"] == 0
        # reasons are stored with the agent
        hot = engine.get_agent("hot-analyst")
        assert [(r["code"], r["message"]) for r in hot.reasons] == [
            ("PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT", "temperature 0.5 exceeds the analysis limit 0.4")
        ]
        assert [r["code"] for r in engine.get_agent("big-spender").reasons] == [
            "PROMOTION_WARN_BUDGET_NEAR_LIMIT"
        ]
        # one AGENT_INVALIDATED per invalidated agent, under the new hash
        invalidated = _audit(engine, seq, "AGENT_INVALIDATED")
        assert sorted(e["agent_id"] for e in invalidated) == sorted(INVALIDATED_BY_04)
        assert {e["policy_hash"] for e in invalidated} == {new}
        assert metric(engine, INVALIDATIONS) == 2
        # every agent that may still run holds a proof signed for the new hash
        _assert_proofs_bound(engine, home, new)
        for agent_id in CAST:
            decision = engine.admit(agent_id)
            if agent_id in INVALIDATED_BY_04:
                assert not decision.allow and decision.code == "ADMISSION_DENY_INVALIDATED"
                # the deny says why, as the run recorded it
                assert decision.reasons[-1].message.startswith(
                    "why: PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT: temperature"
                ), decision.reasons
            else:
                assert decision.allow and decision.policy_hash == new, agent_id


FORBIDDEN_MODEL_RULE = """
deny contains _finding("PROMOTION_DENY_FORBIDDEN_MODEL", sprintf("model %s is forbidden", [model])) if {
	model := input.agent.spec.anatomy.reasoning.model
	model in data.agov.config.forbidden_models
}

warn contains _finding("PROMOTION_WARN_ADVISORY_AGENT", "advisory agents run restricted") if {
	input.agent.spec.agent_type == "advisory"
}
"""


# spec_rules.rego too: revalidation computes deny_for and warn_for outside its per-agent `with`
# and sets deny_for_input and warn_for_input to them, which must hide no other rule there.
@pytest.mark.parametrize("rego_file", ["promotion/promotion.rego", "lib/spec_rules/spec_rules.rego"])
def test_rules_an_author_writes_beside_the_shipped_ones_judge_the_governed_agents_too(
    engine: Engine, home: Path, rego_file: str
) -> None:
    """Before: revalidation applied agov.lib.spec_rules' functions only. A deny written in
    promotion.rego refused new promotions, yet every governed agent it names was re-signed VALID
    and admitted; a warn there was lost on the next unrelated reload (RESTRICTED -> VALID)."""
    model = agent_doc("x")["spec"]["anatomy"]["reasoning"]["model"]
    with (home / "policies" / "agov" / rego_file).open("a") as rego:
        rego.write(FORBIDDEN_MODEL_RULE)
    edit_data(home, lambda data: data.update(forbidden_models=["none"]))
    first = engine.reload_policy(actor=ACTOR, reason="advisory agents run restricted")["revalidation"]
    assert (first["invalidated"], first["restricted"]) == (0, len(CAST)), first
    assert set(statuses(home).values()) == {"GOVERNED_RESTRICTED"}

    # an unrelated change keeps the restriction; naming the cast's model invalidates all of it
    edit_data(home, lambda data: data.update(forbidden_models=["none", model]))
    second = engine.reload_policy(actor=ACTOR, reason="forbid the cast's model")["revalidation"]
    assert second["invalidated"] == len(CAST), second
    assert set(statuses(home).values()) == {"GOVERNED_INVALIDATED"}
    hot = engine.get_agent("hot-analyst")
    assert [r["code"] for r in hot.reasons] == ["PROMOTION_DENY_FORBIDDEN_MODEL"]
    decision = engine.admit("hot-analyst")
    assert (decision.allow, decision.code) == (False, "ADMISSION_DENY_INVALIDATED")

    # the roles that may promote are no question for a governed agent: none of it falls
    edit_data(home, lambda data: data.update(forbidden_models=["none"], promotion_roles=["policy_admin"]))
    third = engine.reload_policy(actor=ACTOR, reason="only policy_admin promotes")["revalidation"]
    assert (third["invalidated"], third["restricted"]) == (0, len(CAST)), third
    assert engine.admit("hot-analyst").allow


def test_rollback_is_reported_even_when_the_policy_files_cannot_be_read(engine: Engine, home: Path) -> None:
    """Rollback is the recovery command: a broken tree under policies/ must not turn the
    rollback that already happened into an error."""
    old = engine.active_policy().hash
    edit_data(home, set_analysis_limit(0.4))
    engine.reload_policy(actor=ACTOR, reason="too tight")
    shutil.rmtree(home / "policies" / "agov")
    with pytest.raises(PolicyError):
        compute_policy_hash(home / "policies")

    result = engine.rollback_policy(old, actor=ACTOR, reason="undo, with the files gone")

    assert (result["policy_hash"], result["workspace_policy_hash"]) == (old, None)
    assert result["revalidation"]["restored"] == 2
    assert engine.active_policy().hash == old


def test_a_run_revalidate_opens_itself_is_audited_even_when_its_first_chunk_fails(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`agov revalidate` with OPA down: the run row it opened had no audit event at all."""
    from agov import revalidation

    seq = _last_seq(engine)

    def opa_down(*_args: object) -> object:
        raise EngineUnavailableError("injected: OPA went away")

    monkeypatch.setattr(revalidation, "_verdicts", opa_down)
    with pytest.raises(EngineUnavailableError):
        engine.revalidate()
    monkeypatch.undo()

    run = engine.store.query_one("SELECT id, org_digest FROM revalidation_runs WHERE finished_at IS NULL")
    (started,) = _audit(engine, seq, "REVALIDATION_STARTED")
    assert started["payload"]["run_id"] == run["id"] and started["payload"]["org_digest"] == run["org_digest"]
    assert [e["type"] for e in _audit(engine, seq)] == ["REVALIDATION_STARTED"]
    # resumed, not opened again
    engine.revalidate()
    assert len(_audit(engine, seq, "REVALIDATION_STARTED")) == 1


def test_a_reload_refused_for_want_of_the_bundle_signing_key_is_audited(engine: Engine, home: Path) -> None:
    old = engine.active_policy().hash
    seq = _last_seq(engine)
    private = home / "keys" / keys.BUNDLE_KEY_NAME
    kept = private.read_bytes()
    private.unlink()  # its public half stays: agov must not mint a new pair OPA does not trust
    edit_data(home, set_analysis_limit(0.4))

    with pytest.raises(KeyMaterialError, match=r"private key .* is missing"):
        engine.reload_policy(actor=ACTOR, reason="no bundle key")

    assert engine.active_policy().hash == old
    (refused,) = _audit(engine, seq, "POLICY_RELOAD_REFUSED")
    assert "is missing" in refused["payload"]["error"]
    assert metric(engine, FAILURE) == 1
    private.write_bytes(kept)
    private.chmod(0o600)


def test_a_bundle_opa_does_not_load_in_time_is_a_refused_reload_but_a_stopped_run_is_not(
    engine: Engine, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = engine.active_policy().hash
    seq = _last_seq(engine)
    sidecar = engine.evaluator()

    def late(*_args: object, **_kwargs: object) -> None:
        raise EngineUnavailableError("OPA did not report the new revision in time")

    monkeypatch.setattr(sidecar, "activate", late)
    edit_data(home, set_analysis_limit(0.4))
    with pytest.raises(EngineUnavailableError, match="in time"):
        engine.reload_policy(actor=ACTOR, reason="OPA too slow")
    monkeypatch.undo()

    assert engine.active_policy().hash == old
    (refused,) = _audit(engine, seq, "POLICY_RELOAD_REFUSED")
    assert "in time" in refused["payload"]["error"]
    assert metric(engine, FAILURE) == 1
    # a rejected reload changes no row but the audit's: no version row for a bundle OPA never took
    assert [e["type"] for e in _audit(engine, seq)] == ["POLICY_RELOAD_REFUSED"]
    assert [v.hash for v in engine.policy_history()] == [old]

    assert metric(engine, SUCCESS) == 0 and metric(engine, STOPPED) == 0

    # switched, then OPA failed mid-revalidation: the reload happened, its run resumes later
    seq = _last_seq(engine)
    reload_interrupted_at(engine, "auto-agent", monkeypatch)  # one chunk: it fails
    assert engine.active_policy().hash != old
    assert _audit(engine, seq, "POLICY_RELOAD_REFUSED") == []
    # in force, so a success; the stopped run is what an alert should see
    assert (metric(engine, SUCCESS), metric(engine, FAILURE), metric(engine, STOPPED)) == (1, 1, 1)
    engine.revalidate()  # resumed to its end
    assert metric(engine, STOPPED) == 1


@pytest.mark.parametrize(
    ("damage", "message"),
    [("gone", "is unreadable"), ("truncated", "OPA refused bundle"), ("empty", "is an empty file")],
)
def test_a_rollback_from_a_process_with_no_sidecar_yet_loads_the_bundle_before_the_store_switches(
    engine: Engine, home: Path, damage: str, message: str
) -> None:
    """A CLI process has no sidecar when it rolls back: OPA must still load and verify the
    target bundle before the store names it active (before, the store switched first, and every
    later decision failed closed on a bundle OPA would never load)."""
    old = engine.active_policy().hash
    edit_data(home, set_analysis_limit(0.4))
    new = engine.reload_policy(actor=ACTOR, reason="too tight")["policy_hash"]
    bundle = home / "bundles" / f"{old}.tar.gz"
    if damage == "gone":
        bundle.unlink()
    else:
        bundle.write_bytes(bundle.read_bytes()[: 300 if damage == "truncated" else 0])
    before = snapshot(home)
    seq = _last_seq(engine)

    with Engine.open(home) as cli, pytest.raises(PolicyError, match=message):
        cli.rollback_policy(old, actor=ACTOR, reason="undo")

    assert engine.active_policy().hash == new
    after = snapshot(home)
    assert {t: after[t] for t in before if t not in ("audit_events", "__anchor__")} == {
        t: before[t] for t in before if t not in ("audit_events", "__anchor__")
    }
    assert [(e["type"], e["payload"]["rollback_to"]) for e in _audit(engine, seq)] == [
        ("POLICY_RELOAD_REFUSED", old)
    ], "the one row a refusal adds"
    decision = engine.admit("cool-analyst")
    assert decision.allow and decision.policy_hash == new


def test_a_reload_after_another_process_rolled_back_activates_the_tree_again(
    engine: Engine, home: Path
) -> None:
    """`serve --watch` reloaded to X; the CLI rolled back; the next change of a tree that still
    hashes to X (here agov.yaml) rebuilt X, whose new signature bytes the sidecar, still serving
    X, refused as "active with different bundle bytes": an internal error, and the change (a
    tighter org limit too) was never applied."""
    old = engine.active_policy().hash
    edit_data(home, set_analysis_limit(0.4))
    tight = engine.reload_policy(actor=ACTOR, reason="tighten")["policy_hash"]
    with Engine.open(home) as cli:
        cli.rollback_policy(old, actor="other", reason="undo")
    assert statuses(home) == BEFORE
    assert engine.evaluator().active_revision == tight  # type: ignore[attr-defined]

    result = engine.reload_policy(actor=ACTOR, reason="the watcher saw a change")

    assert result["changed"] and result["policy_hash"] == tight
    assert engine.active_policy().hash == tight
    assert {a for a, s in statuses(home).items() if s == "GOVERNED_INVALIDATED"} == INVALIDATED_BY_04
    assert not engine.admit("hot-analyst").allow and engine.admit("cool-analyst").allow


@pytest.mark.parametrize("when", ["before the switch began", "while OPA loaded the bundle"])
def test_two_reloads_of_one_tree_switch_once_and_revalidate_once(
    engine: Engine, home: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Both built the same new hash; before, both switched (the second with previous_hash equal
    to the hash it switched to) and both revalidated into one run, counting agents twice."""
    seq = _last_seq(engine)
    edit_data(home, set_analysis_limit(0.4))
    other_result: dict[str, Any] = {}

    def other_reloads_first() -> None:
        if not other_result:
            with Engine.open(home) as other:
                other_result.update(other.reload_policy(actor="other", reason="same edit"))

    if when == "before the switch began":
        ready = engine._ready_to_switch

        def ready_after_the_other() -> Any:
            other_reloads_first()
            return ready()

        monkeypatch.setattr(engine, "_ready_to_switch", ready_after_the_other)
    else:
        sidecar = engine.evaluator()
        activate = sidecar.activate  # type: ignore[attr-defined]

        def activate_after_the_other(*args: Any, **kwargs: Any) -> Any:
            other_reloads_first()
            return activate(*args, **kwargs)

        monkeypatch.setattr(sidecar, "activate", activate_after_the_other)

    with pytest.raises(ConflictError, match=r"another process activated policy \w{12}"):
        engine.reload_policy(actor=ACTOR, reason="same edit")

    new = other_result["policy_hash"]
    assert engine.active_policy().hash == new
    types = [e["type"] for e in _audit(engine, seq)]
    assert types.count("POLICY_HOTRELOAD") == 1 and types.count("POLICY_REVALIDATION") == 1
    # the same tree won: this one lost a race, it was not refused (no false alarm)
    assert "POLICY_RELOAD_REFUSED" not in types and metric(engine, FAILURE) == 0
    runs = engine.store.query(
        "SELECT total, finished_at FROM revalidation_runs WHERE policy_hash = ?", (new,)
    )
    assert [(r["total"], r["finished_at"] is not None) for r in runs] == [(len(CAST), True)]
    assert {a for a, s in statuses(home).items() if s == "GOVERNED_INVALIDATED"} == INVALIDATED_BY_04


def test_a_reload_that_switched_is_never_audited_as_refused_even_when_another_process_moves_on(
    engine: Engine, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether a reload was refused is what this call did, not what the store says afterwards:
    here another process rolls back while this reload's revalidation starts, and the run stops
    as `_still_current` stops it. Before, the reload was then audited as refused too."""
    old = engine.active_policy().hash
    seq = _last_seq(engine)
    edit_data(home, set_analysis_limit(0.4))

    def rolled_back_meanwhile(**_kwargs: object) -> None:
        with Engine.open(home) as other:
            other.rollback_policy(old, actor="other", reason="undo")
        raise ConflictError("another process activated a policy: run stopped")

    monkeypatch.setattr(engine, "revalidate", rolled_back_meanwhile)
    with pytest.raises(
        ConflictError, match=r"^policy \w{12} was activated, but revalidating the agents"
    ) as stopped:
        engine.reload_policy(actor=ACTOR, reason="tighten")
    # what serve reads to say "stopped", not "refused": the store names the old policy again
    assert stopped.value.policy_switched and engine.active_policy().hash == old

    types = [e["type"] for e in _audit(engine, seq)]
    assert "POLICY_HOTRELOAD" in types and "POLICY_ROLLBACK" in types
    assert "POLICY_RELOAD_REFUSED" not in types


def test_a_key_revoked_during_the_revalidation_after_a_switch_is_not_bad_input(
    engine: Engine, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store has switched: exit 2 ("bad input, nothing changed") would be untrue. The run
    stopped because something changed under it: a ConflictError (exit 3) saying so."""
    seq = _last_seq(engine)
    old = engine.active_policy().hash
    edit_data(home, set_analysis_limit(0.4))
    (keyid,) = [k.keyid for k in engine.list_keys() if k.state == "signing"]
    revalidate = engine.revalidate

    def revoked_meanwhile(**kwargs: Any) -> Any:
        engine.revoke_key(keyid, reason="compromised", actor="sec")  # `agov keys revoke` meanwhile
        return revalidate(**kwargs)

    monkeypatch.setattr(engine, "revalidate", revoked_meanwhile)
    with pytest.raises(ConflictError) as info:
        engine.reload_policy(actor=ACTOR, reason="tighten")

    assert info.value.message.startswith(f"policy {engine.active_policy().hash[:12]} was activated, but")
    assert "was revoked" in info.value.message and "agov revalidate" in info.value.hint
    assert "judged when it starts, if OPA answers and a key may sign" in info.value.hint
    assert f"`agov policy rollback {old[:12]}` re-activates the previous policy" in info.value.hint
    assert _exit_for(info.value) == 3
    types = [e["type"] for e in _audit(engine, seq)]
    assert "POLICY_HOTRELOAD" in types and "POLICY_RELOAD_REFUSED" not in types


def test_a_rollback_to_a_bundle_file_replaced_by_another_signed_bundle_is_refused_at_once(
    engine: Engine, home: Path
) -> None:
    """A validly signed bundle of another version under the target's name: OPA would load it
    and never report the revision asked for, so the rollback waited out its timeout and then
    blamed OPA. The manifest names the revision, so it is refused before OPA is asked."""
    old = engine.active_policy().hash
    edit_data(home, set_analysis_limit(0.4))
    new = engine.reload_policy(actor=ACTOR, reason="too tight")["policy_hash"]
    (home / "bundles" / f"{old}.tar.gz").write_bytes((home / "bundles" / f"{new}.tar.gz").read_bytes())
    before = snapshot(home)
    seq = _last_seq(engine)

    started = time.monotonic()
    with Engine.open(home) as cli, pytest.raises(PolicyError, match=r"holds policy revision .* was replaced"):
        cli.rollback_policy(old, actor=ACTOR, reason="undo")

    assert time.monotonic() - started < 10  # not the activation timeout (about 20 s)
    assert engine.active_policy().hash == new
    after = snapshot(home)
    assert {t: after[t] for t in before if t not in ("audit_events", "__anchor__")} == {
        t: before[t] for t in before if t not in ("audit_events", "__anchor__")
    }
    # the one row a refusal adds (before: none, though a refused reload is audited)
    (refused,) = _audit(engine, seq)
    assert (refused["type"], refused["policy_hash"], refused["actor"]) == (
        "POLICY_RELOAD_REFUSED",
        new,
        ACTOR,
    )
    assert refused["payload"]["rollback_to"] == old and "was replaced" in refused["payload"]["error"]


def test_a_rollback_another_process_made_first_is_not_audited_as_refused(
    engine: Engine, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two rollbacks to one version: the one that loses the race finds it active and is not
    refused (as two reloads of one tree; review)."""
    old = engine.active_policy().hash
    edit_data(home, set_analysis_limit(0.4))
    engine.reload_policy(actor=ACTOR, reason="too tight")
    seq = _last_seq(engine)

    def overtaken(*args: Any, **kwargs: Any) -> Any:
        with Engine.open(home) as other:
            other.rollback_policy(old, actor="other", reason="undo first")
        raise ConflictError("another process activated a policy meanwhile")

    monkeypatch.setattr(engine, "_switch", overtaken)
    with pytest.raises(ConflictError) as lost:
        engine.rollback_policy(old, actor=ACTOR, reason="undo")
    assert lost.value.policy_switched and engine.active_policy().hash == old
    types = [e["type"] for e in _audit(engine, seq)]
    assert "POLICY_ROLLBACK" in types and "POLICY_RELOAD_REFUSED" not in types


def test_rollback_restores_the_agents_the_bad_version_invalidated(engine: Engine, home: Path) -> None:
    old = engine.active_policy().hash
    edit_data(home, set_analysis_limit(0.4))
    bad = engine.reload_policy(actor=ACTOR, reason="too tight")["policy_hash"]
    assert {a for a, s in statuses(home).items() if s == "GOVERNED_INVALIDATED"} == INVALIDATED_BY_04
    seq = _last_seq(engine)

    result = engine.rollback_policy(old[:12], actor=ACTOR, reason="undo the bad version")

    assert result["policy_hash"] == old and result["previous_hash"] == bad
    assert result["workspace_policy_hash"] == bad, "the files still hold the bad version"
    assert result["revalidation"]["restored"] == 2
    assert result["revalidation"]["invalidated"] == 0
    assert {(c["agent_id"], c["from"], c["to"]) for c in result["revalidation"]["changes"]} == {
        (a, "GOVERNED_INVALIDATED", "GOVERNED_VALID") for a in INVALIDATED_BY_04
    }
    assert statuses(home) == BEFORE
    assert all(engine.get_agent(a).reasons == [] for a in INVALIDATED_BY_04)
    assert engine.active_policy().hash == old
    assert engine.evaluator().revision() == old
    restored = _audit(engine, seq, "AGENT_RESTORED")
    assert sorted(e["agent_id"] for e in restored) == sorted(INVALIDATED_BY_04)
    rollbacks = _audit(engine, seq, "POLICY_ROLLBACK")
    assert [(e["policy_hash"], e["payload"]["previous_hash"]) for e in rollbacks] == [(old, bad)]
    _assert_proofs_bound(engine, home, old)
    for agent_id in CAST:
        decision = engine.admit(agent_id)
        assert decision.allow and decision.policy_hash == old, (agent_id, decision.code)
    # rolling back onto the active version is refused, and changes nothing
    before = snapshot(home)
    with pytest.raises(UsageError, match="already active"):
        engine.rollback_policy(old, actor=ACTOR, reason="again")
    # a prefix is hexadecimal and matched as text: `________` was a LIKE pattern for any hash
    for pattern in ("________", "%%%%%%%%", bad[:7] + "_"):
        with pytest.raises(NotFoundError, match="is not hexadecimal"):
            engine.rollback_policy(pattern, actor=ACTOR, reason="wildcard")
    assert engine.policy_diff(bad[:8].upper(), bad) == ""
    # a damaged bundle is named, not an internal error
    bundle = home / "bundles" / f"{bad}.tar.gz"
    intact = bundle.read_bytes()
    bundle.write_bytes(intact[:200])
    with pytest.raises(PolicyError, match=rf"bundle of policy {bad[:12]} is not a readable tarball"):
        engine.policy_diff(old, bad)
    bundle.write_bytes(intact)
    assert snapshot(home) == before
    assert engine.verify_audit().ok


# --- dry run and no-op reload --------------------------------------------------------------------


def test_dry_run_changes_nothing_and_predicts_who_falls(engine: Engine, home: Path) -> None:
    old = engine.active_policy().hash
    assert engine.evaluator().revision() == old
    edit_data(home, set_analysis_limit(0.4))
    candidate = compute_policy_hash(engine.workspace.policies)
    bundles_before = sorted(p.name for p in engine.workspace.bundles.iterdir())
    before = snapshot(home)

    dry = engine.reload_policy(actor=ACTOR, reason="what if", dry_run=True)

    assert snapshot(home) == before  # every table, every row, and the audit anchor
    assert sorted(p.name for p in engine.workspace.bundles.iterdir()) == bundles_before
    assert engine.active_policy().hash == old
    assert engine.evaluator().revision() == old
    assert metric(engine, SUCCESS) == metric(engine, FAILURE) == metric(engine, INVALIDATIONS) == 0
    decision = engine.admit("hot-analyst")
    assert decision.allow and decision.policy_hash == old
    assert dry["changed"] is True and dry["dry_run"] is True
    assert dry["policy_hash"] == candidate and dry["previous_hash"] == old
    report = dry["revalidation"]
    assert report["newly_invalidated"] == 2 and report["run_id"] is None
    would_fall = {c["agent_id"] for c in report["changes"] if c["to"] == "GOVERNED_INVALIDATED"}
    assert would_fall == INVALIDATED_BY_04
    assert all(c["deny"] for c in report["changes"] if c["agent_id"] in would_fall)

    # the real reload does exactly what the dry run said
    real = engine.reload_policy(actor=ACTOR, reason="for real")
    assert real["policy_hash"] == candidate
    assert {a for a, s in statuses(home).items() if s == "GOVERNED_INVALIDATED"} == would_fall


def test_reloading_an_unchanged_tree_changes_nothing(engine: Engine, home: Path) -> None:
    old = engine.active_policy().hash
    assert engine.evaluator().revision() == old
    before = snapshot(home)

    first = engine.reload_policy(actor=ACTOR, reason="nothing changed")
    data_file(home).write_text(data_file(home).read_text())  # saved again, same bytes
    (home / "policies" / "agov" / "lib" / "spec_rules" / "zz_extra_test.rego").write_text(
        "package agov.lib.zz_extra_test\n\ntest_passes if {\n\ttrue\n}\n"
    )  # tests are not part of the bundle
    second = engine.reload_policy(actor=ACTOR, reason="saved again")

    assert (
        first == second == {"changed": False, "org_changed": False, "policy_hash": old, "revalidation": None}
    )
    assert snapshot(home) == before
    assert engine.evaluator().revision() == old
    assert metric(engine, SUCCESS) == metric(engine, FAILURE) == 0


# --- the watcher, as `agov serve --watch` runs it ------------------------------------------------


def _serve_like_watcher(
    engine: Engine, failures: list[BaseException], durations: list[float] | None = None
) -> PolicyWatcher:
    """PolicyWatcher + reload_policy, wired as cli.py `serve --watch` does."""
    lock = threading.Lock()

    def reload() -> None:
        with lock:
            started = time.perf_counter()
            try:
                engine.reload_policy(actor=ACTOR, reason="watch: policy files changed")
            except Exception as exc:  # serve prints and carries on; the test reports it
                failures.append(exc)
            if durations is not None:
                durations.append(time.perf_counter() - started)

    return PolicyWatcher(engine.workspace.policies, reload)


def _first_decision_under(engine: Engine, agent_id: str, policy_hash: str, deadline_s: float) -> float | None:
    """Poll admissions until one is allowed under ``policy_hash``; the time it was seen."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        decision = engine.admit(agent_id)
        if decision.allow and decision.policy_hash == policy_hash:
            return time.perf_counter()
        time.sleep(0.002)
    return None


def _hash_of(home: Path, tmp: Path, mutate: Callable[[dict[str, object]], None]) -> tuple[str, str]:
    """The policy hash the workspace would have with ``mutate`` applied, and the file text."""
    scratch = tmp / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(home / "policies", scratch / "policies")
    edit_data(scratch, mutate)
    return compute_policy_hash(scratch / "policies"), data_file(scratch).read_text()


def test_measure_save_to_first_decision_under_the_new_hash(
    engine: Engine, home: Path, tmp_path: Path
) -> None:
    """Not a timed test: prints the figure. Fails only if a save never reaches a decision."""
    variants = [_hash_of(home, tmp_path, set_analysis_limit(limit)) for limit in (0.65, 0.6)]
    failures: list[BaseException] = []
    reloads: list[float] = []
    watcher = _serve_like_watcher(engine, failures, reloads)
    watcher.start()
    latencies: list[float] = []
    try:
        time.sleep(0.2)
        for trial in range(10):
            expected, text = variants[trial % 2]
            saved = time.perf_counter()
            # saved the way editors save: a temp file renamed over the target
            scratch = data_file(home).with_name(".data.json.tmp")
            scratch.write_text(text)
            os.replace(scratch, data_file(home))
            seen = _first_decision_under(engine, "cool-analyst", expected, deadline_s=15)
            assert seen is not None, f"trial {trial}: no decision under {expected[:12]} ({failures})"
            latencies.append(seen - saved)
        deadline = time.monotonic() + 10  # the last reload may still be finishing its run
        while len(reloads) < len(latencies) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        watcher.stop()
    assert not failures
    assert len(reloads) >= len(latencies)
    print(
        f"\nsave-to-first-decision (PolicyWatcher + reload_policy, {len(CAST)} agents): "
        f"{len(latencies)} trials, median {statistics.median(latencies) * 1000:.0f} ms, "
        f"max {max(latencies) * 1000:.0f} ms (goal <= 1000 ms); of which reload_policy itself "
        f"(opa check + opa test + opa build + activation + revalidation): median "
        f"{statistics.median(reloads) * 1000:.0f} ms, max {max(reloads) * 1000:.0f} ms; "
        f"{len(reloads)} reload calls; watcher debounce 100 ms"
    )


@pytest.mark.parametrize("temp_name", [".data.json.swp", "sedAbC123", "data.json___jb_tmp___"])
def test_watcher_reloads_after_an_atomic_save(
    engine: Engine, home: Path, tmp_path: Path, temp_name: str
) -> None:
    expected, text = _hash_of(home, tmp_path, set_analysis_limit(0.65))
    failures: list[BaseException] = []
    watcher = _serve_like_watcher(engine, failures)
    watcher.start()
    try:
        time.sleep(0.2)
        temp = data_file(home).with_name(temp_name)
        temp.write_text(text)
        os.replace(temp, data_file(home))
        seen = _first_decision_under(engine, "cool-analyst", expected, deadline_s=3)
    finally:
        watcher.stop()
    assert not failures
    if seen is None or engine.active_policy().hash != expected:
        raise KnownBug(f"the policy saved through {temp_name} was never reloaded")


def test_watcher_ignores_reads_so_a_reload_does_not_trigger_the_next(tmp_path: Path) -> None:
    """A reload reads every policy file; reacting to those reads reloaded forever."""
    from agov.watch import PolicyWatcher

    root = tmp_path / "policies"
    (root / "agov").mkdir(parents=True)
    target = root / "agov" / "data.json"
    target.write_text("{}")
    calls: list[float] = []

    def on_change() -> None:
        calls.append(time.monotonic())
        for path in root.rglob("*"):  # what a reload does: read everything
            if path.is_file():
                path.read_bytes()

    watcher = PolicyWatcher(root, on_change, debounce_s=0.05)
    watcher.start()
    try:
        time.sleep(0.2)
        target.write_text('{"a": 1}')
        time.sleep(1.0)
    finally:
        watcher.stop()
    assert len(calls) == 1, f"one edit caused {len(calls)} reloads"


def test_a_policy_tree_mounted_as_a_configmap_volume_builds_and_reloads_as_the_plain_tree(
    engine: Engine, home: Path, tmp_path: Path
) -> None:
    """In Kubernetes the tree is symlinks through ``..data`` into a hidden directory: the build
    follows the symlinks and skips the hidden names, so the hash is the plain tree's."""
    policies = home / "policies"
    files = {
        str(path.relative_to(policies)): path.read_text()
        for path in sorted(policies.rglob("*"))
        if path.is_file()
    }
    old = engine.active_policy().hash
    shutil.rmtree(policies)
    policies.mkdir()
    configmap_volume(policies, files, "2026_11_22_14_00_00.1")
    assert (policies / "agov").is_symlink()

    assert compute_policy_hash(policies) == old
    assert engine.reload_policy(actor=ACTOR, reason="mounted")["changed"] is False

    data_path = "agov/config/data.json"
    data = json.loads(files[data_path])
    data["temperature_limits"]["analysis"] = 0.4
    configmap_volume(policies, {**files, data_path: json.dumps(data)}, "2026_11_22_14_05_00.2")
    plain = tmp_path / "plain"
    for name, text in {**files, data_path: json.dumps(data)}.items():
        (plain / name).parent.mkdir(parents=True, exist_ok=True)
        (plain / name).write_text(text)

    reloaded = engine.reload_policy(actor=ACTOR, reason="ConfigMap updated")
    assert reloaded["changed"] is True
    assert reloaded["policy_hash"] == compute_policy_hash(plain) == engine.evaluator().revision() != old


def test_a_revalidation_that_cannot_open_a_run_is_not_counted_as_a_stopped_run(home: Path) -> None:
    """revalidation_stopped_total is for an alert: a run left unfinished, whose agents are judged
    only when they start. A refusal before any run was opened leaves none."""
    with Engine.init(home, actor=ACTOR) as engine:
        create_governed(engine, "cool-analyst", temperature=0.3)
        for key in engine.list_keys():
            engine.revoke_key(key.keyid, reason="no signer", actor=ACTOR)
        with pytest.raises(KeyMaterialError):
            engine.revalidate()
        assert engine.store.query("SELECT id FROM revalidation_runs WHERE finished_at IS NULL") == []
        assert metric(engine, STOPPED) == 0
