"""`agov policy build` and `agov policy history`; workspaces that move."""

from __future__ import annotations

import json
import re
import shutil
import socket
import tarfile
from pathlib import Path

import pytest
from e2e_support import HEX64, agov, ok, query

pytestmark = pytest.mark.acceptance

VERSION_KEYS = {"seq", "hash", "bundle_path", "actor", "reason", "created_at", "active"}


def active(history: list[dict[str, object]]) -> list[object]:
    return [v["hash"] for v in history if v["active"]]


def test_build_of_unchanged_policies_gives_the_active_hash(fresh_ws: Path) -> None:
    built = ok("policy", "build", home=fresh_ws)

    assert set(built) == VERSION_KEYS
    assert re.fullmatch(HEX64, built["hash"])
    assert built["active"] is True
    with tarfile.open(built["bundle_path"]) as bundle:
        names = sorted(name.lstrip("/") for name in bundle.getnames())
    # named as in the policy tree (OPA's errors and coverage show them), not by a temporary path
    assert names == [
        ".manifest",
        ".signatures.json",
        "agov/admission/admission.rego",
        "agov/lib/spec_rules/spec_rules.rego",
        "agov/promotion/promotion.rego",
        "agov/revalidation/revalidation.rego",
        "data.json",
    ]
    history = ok("policy", "history", home=fresh_ws)
    assert [v["hash"] for v in history] == [built["hash"]]
    assert active(history) == [built["hash"]]
    assert query(fresh_ws, "SELECT hash FROM policy_versions WHERE active = 1") == [(built["hash"],)]


def test_build_of_changed_policies_records_a_new_inactive_version(fresh_ws: Path) -> None:
    (initial,) = active(ok("policy", "history", home=fresh_ws))
    limits = fresh_ws / "policies" / "agov" / "config" / "data.json"
    data = json.loads(limits.read_text())
    data["temperature_limits"]["analysis"] = 0.4
    limits.write_text(json.dumps(data, indent=2) + "\n")

    built = ok("policy", "build", "--reason", "tighten analysis", home=fresh_ws)

    assert re.fullmatch(HEX64, built["hash"])
    assert built["hash"] != initial
    assert (built["active"], built["reason"], built["actor"]) == (False, "tighten analysis", "acceptance")
    assert (fresh_ws / "bundles" / f"{built['hash']}.tar.gz").is_file()
    history = ok("policy", "history", home=fresh_ws)
    assert {v["hash"] for v in history} == {initial, built["hash"]}
    assert all(set(v) == VERSION_KEYS | {"activations"} for v in history)
    # exactly one active version, still the old one: build does not activate
    assert active(history) == [initial]
    assert [v["activations"] for v in history if v["hash"] == built["hash"]] == [[]]
    # the same content always gives the same hash
    assert ok("policy", "build", home=fresh_ws)["hash"] == built["hash"]
    assert len(ok("policy", "history", home=fresh_ws)) == 2


def test_build_refuses_a_policy_that_does_not_compile(fresh_ws: Path) -> None:
    rego = fresh_ws / "policies" / "agov" / "promotion" / "promotion.rego"
    rego.write_text(rego.read_text() + "\nallow if {\n")
    before = query(fresh_ws, "SELECT * FROM policy_versions")

    result = agov("policy", "build", home=fresh_ws)

    assert result.code == 2, str(result)
    assert result.json["error"]["type"] == "PolicyError"
    assert query(fresh_ws, "SELECT * FROM policy_versions") == before


def test_build_of_a_new_version_is_audited(fresh_ws: Path) -> None:
    limits = fresh_ws / "policies" / "agov" / "config" / "data.json"
    limits.write_text(limits.read_text().replace('"analysis": 0.7', '"analysis": 0.5'))
    built = ok("policy", "build", home=fresh_ws)
    assert built["hash"] in {row[0] for row in query(fresh_ws, "SELECT policy_hash FROM audit_events")}


def test_a_workspace_made_with_a_relative_path_works_from_anywhere(tmp_path: Path, opa_bin: Path) -> None:
    ok("init", "rel-ws", cwd=tmp_path)
    home = tmp_path / "rel-ws"
    ok("agent", "create", "--template", "research-analyst", home=Path("rel-ws"), cwd=tmp_path)

    # a sandbox agent: admitted when OPA can load the policy bundle
    result = agov("admit", "research-analyst", home=home, cwd=Path("/"))

    assert result.code == 0, str(result)


def test_a_moved_workspace_keeps_working(tmp_path: Path, opa_bin: Path) -> None:
    original = tmp_path / "before"
    ok("init", original)
    ok("agent", "create", "--template", "research-analyst", home=original)
    moved = tmp_path / "after"
    shutil.move(original, moved)

    result = agov("admit", "research-analyst", home=moved)

    assert result.code == 0, str(result)
    assert result.json["code"] == "ADMISSION_ALLOW"


def test_reload_after_an_org_limit_change_judges_every_agent_again(fresh_ws: Path) -> None:
    ok("agent", "create", "--template", "research-analyst", "--id", "spender", home=fresh_ws)
    ok("promote", "spender", "--role", "agent_admin", home=fresh_ws)
    budget = query(fresh_ws, "SELECT spec FROM agent_versions WHERE agent_id = 'spender'")[0][0]
    spent = json.loads(budget)["spec"]["economics"]["monthly_budget_usd"]
    config = fresh_ws / "agov.yaml"
    config.write_text(
        config.read_text().replace("max_monthly_budget_usd: 1000.0", f"max_monthly_budget_usd: {spent / 2}")
    )

    result = agov("policy", "reload", home=fresh_ws, as_json=False)

    assert result.code == 0, str(result)
    assert "but the org limits in agov.yaml changed: judged every governed agent again" in result.out, (
        result.out
    )
    assert "invalidated 1 (1 new)" in result.out, result.out
    denied = agov("admit", "spender", home=fresh_ws)
    assert (denied.code, denied.json["code"]) == (1, "ADMISSION_DENY_INVALIDATED")
    again = agov("policy", "reload", home=fresh_ws, as_json=False)
    assert re.fullmatch(r"policy unchanged \([0-9a-f]{12}\)\n", again.out), again.out


def test_a_reload_whose_external_opa_is_unreachable_says_the_new_policy_is_active(
    fresh_ws: Path,
) -> None:
    """With an external sidecar agov cannot ask OPA first (it fetches bundles itself): the store
    switches, then the revalidation meets the closed port. The command fails (exit 3) and says
    the new policy is active and how to finish, instead of reading as a refused reload."""
    ok("agent", "create", "--template", "research-analyst", home=fresh_ws)
    ok("promote", "research-analyst", "--role", "agent_admin", home=fresh_ws)
    (old,) = active(ok("policy", "history", home=fresh_ws))
    limits = fresh_ws / "policies" / "agov" / "config" / "data.json"
    limits.write_text(limits.read_text().replace('"analysis": 0.7', '"analysis": 0.4'))

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    result = agov(
        "policy", "reload", "--reason", "tighten", "--opa-url", f"http://127.0.0.1:{closed}", home=fresh_ws
    )

    assert result.code == 3, str(result)
    (new,) = active(ok("policy", "history", home=fresh_ws))
    assert new != old
    error = result.json["error"]
    assert error["message"].startswith(
        f"policy {new[:12]} was activated, but revalidating the agents under it stopped"
    )
    assert "refused the connection" in error["message"]
    assert "agov revalidate" in error["hint"]
    events = [row[0] for row in query(fresh_ws, "SELECT type FROM audit_events")]
    assert "POLICY_HOTRELOAD" in events and "POLICY_RELOAD_REFUSED" not in events
    # the run is left open: the managed sidecar finishes it, and the agent falls as it should
    report = ok("revalidate", home=fresh_ws)
    assert (report["total"], report["invalidated"]) == (1, 1)


def test_a_reason_with_a_line_break_cannot_draw_a_history_line_of_its_own(fresh_ws: Path) -> None:
    (initial,) = active(ok("policy", "history", home=fresh_ws))
    forged = "tune\n* 0000000000000000 2099-01-01T00:00:00+00:00 root: forged active"
    limits = fresh_ws / "policies" / "agov" / "config" / "data.json"
    limits.write_text(limits.read_text().replace('"analysis": 0.7', '"analysis": 0.6'))
    built = ok("policy", "build", "--reason", forged, home=fresh_ws)
    assert built["reason"] == forged, "stored as given"

    shown = agov("policy", "history", home=fresh_ws, as_json=False)
    assert shown.code == 0, str(shown)
    lines = shown.out.splitlines()
    # a version's line, then one line per activation of it (indented)
    assert [line[:5] for line in lines] == ["* " + initial[:3], "    a", "  " + built["hash"][:3]], lines
    assert lines[0].startswith(f"* {initial[:16]} ")
    assert lines[2].endswith(": tune\\n* 0000000000000000 2099-01-01T00:00:00+00:00 root: forged active")


def test_history_shows_who_activated_each_version_when_and_what_it_replaced(fresh_ws: Path) -> None:
    """A reload and a rollback: each version lists its activations, oldest first, as the audit
    events written with them record them; free text cannot draw a line of its own."""
    (initial,) = active(ok("policy", "history", home=fresh_ws))
    limits = fresh_ws / "policies" / "agov" / "config" / "data.json"
    limits.write_text(limits.read_text().replace('"analysis": 0.7', '"analysis": 0.4'))
    reloaded = ok("policy", "reload", "--reason", "tighten", home=fresh_ws)["policy_hash"]
    forged = "incident 42\n* 0000000000000000 2099-01-01T00:00:00+00:00 root: forged"
    ok("policy", "rollback", initial, "--reason", forged, home=fresh_ws)

    history = {v["hash"]: v for v in ok("policy", "history", home=fresh_ws)}

    assert active(list(history.values())) == [initial]
    first = history[initial]["activations"]
    assert [(a["event"], a["previous_hash"], a["reason"]) for a in first] == [
        ("POLICY_HOTRELOAD", None, "initial policy"),
        ("POLICY_ROLLBACK", reloaded, forged),
    ]
    (switch,) = history[reloaded]["activations"]
    assert (switch["event"], switch["previous_hash"], switch["reason"]) == (
        "POLICY_HOTRELOAD",
        initial,
        "tighten",
    )
    assert first[0]["audit_seq"] < switch["audit_seq"] < first[1]["audit_seq"], "the audit log's order"
    assert all(a["actor"] == "acceptance" and a["policy_hash"] == initial for a in first)
    # every switch the audit log records, and nothing else
    switches = query(
        fresh_ws,
        "SELECT seq, type, policy_hash FROM audit_events"
        " WHERE type IN ('POLICY_HOTRELOAD', 'POLICY_ROLLBACK') ORDER BY seq",
    )
    assert switches == [(a["audit_seq"], a["event"], a["policy_hash"]) for a in (first[0], switch, first[1])]

    shown = agov("policy", "history", home=fresh_ws, as_json=False)
    assert shown.code == 0, str(shown)
    lines = shown.out.splitlines()
    assert len(lines) == 5, lines
    assert lines[0].startswith(f"* {initial[:16]} built ") and lines[0].endswith(
        " by acceptance: initial policy"
    )
    assert lines[3].startswith(f"  {reloaded[:16]} built ") and lines[3].endswith(" by acceptance: tighten")
    assert lines[1].startswith("    activated ") and lines[1].endswith(" by acceptance: initial policy")
    assert lines[2].endswith(
        f" by acceptance (rollback, replacing {reloaded[:16]}):"
        " incident 42\\n* 0000000000000000 2099-01-01T00:00:00+00:00 root: forged"
    )
    assert lines[4].endswith(f" by acceptance (replacing {initial[:16]}): tighten")


def test_diff_shows_a_changed_limit_as_one_changed_line(fresh_ws: Path) -> None:
    """`opa build` writes a bundle's data.json on one line: the diff showed the whole file
    changed for one limit."""
    (initial,) = active(ok("policy", "history", home=fresh_ws))
    limits = fresh_ws / "policies" / "agov" / "config" / "data.json"
    limits.write_text(limits.read_text().replace('"analysis": 0.7', '"analysis": 0.4'))
    reloaded = ok("policy", "reload", "--reason", "tighten", home=fresh_ws)["policy_hash"]

    diff = ok("policy", "diff", initial, reloaded, home=fresh_ws)["diff"]

    changed = [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert changed == ['-        "analysis": 0.7,', '+        "analysis": 0.4,'], diff
    assert f"--- {initial[:12]}/data.json" in diff and f"+++ {reloaded[:12]}/data.json" in diff
