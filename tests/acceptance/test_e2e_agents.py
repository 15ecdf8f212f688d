"""`agent list` filters and paging, `agent show`, `agent update` (versions, back to SANDBOX)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from e2e_support import (
    ADMISSION_KEYS,
    agov,
    assert_rejected_unchanged,
    copy_ws,
    create_from_spec,
    expect_error,
    make_spec,
    ok,
    parse_time,
    patched,
    snapshot,
    sql,
    write_doc,
)

pytestmark = pytest.mark.acceptance

SPECS = {
    "alpha": make_spec("alpha", agent_type="supervised"),
    "beta": make_spec("beta", agent_type="advisory"),
    "gamma": make_spec("gamma", agent_type="advisory"),
    "delta": make_spec("delta", agent_type="supervised", temperature=0.3),
}


@pytest.fixture(scope="module")
def ws(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("agents")
    home = copy_ws(pristine, root / "ws")
    for document in SPECS.values():
        create_from_spec(home, document, root / "specs")
    promoted = ok("promote", "delta", "--role", "agent_admin", home=home)
    assert promoted["status"] == "GOVERNED_VALID"
    return home


def ids(rows: list[dict[str, object]]) -> list[object]:
    return [r["id"] for r in rows]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ["alpha", "beta", "delta", "gamma"]),
        (["--status", "SANDBOX"], ["alpha", "beta", "gamma"]),
        (["--status", "GOVERNED_VALID"], ["delta"]),
        (["--type", "advisory"], ["beta", "gamma"]),
        (["--limit", "2", "--offset", "1"], ["beta", "delta"]),
        (["--status", "SANDBOX", "--type", "supervised"], ["alpha"]),
        (["--status", "SANDBOX", "--type", "advisory", "--limit", "1", "--offset", "1"], ["gamma"]),
        (["--status", "sandbox", "--type", "Supervised"], ["alpha"]),
    ],
    ids=["all", "sandbox", "governed", "type", "paging", "status+type", "status+type+paging", "any-case"],
)
def test_list_filters_and_pages(ws: Path, argv: list[str], expected: list[str]) -> None:
    rows = ok("agent", "list", *argv, home=ws)
    assert ids(rows) == expected
    for row in rows:
        assert row["status"] == ("GOVERNED_VALID" if row["id"] == "delta" else "SANDBOX")
        assert row["type"] == SPECS[row["id"]]["spec"]["agent_type"]


def test_list_text_has_a_header_and_says_when_more_agents_follow(ws: Path) -> None:
    """Before: no header, and a full page (100 by default) looked like the whole fleet."""

    def lines(*argv: str) -> list[str]:
        result = agov("agent", "list", *argv, home=ws, as_json=False)
        assert result.code == 0, str(result)
        return result.out.splitlines()

    first = lines("--limit", "2")
    assert first[0].split() == ["ID", "STATUS", "VERSION", "TYPE", "ROLE", "CLASS"]
    assert [line.split()[:3] for line in first[1:3]] == [
        ["alpha", "SANDBOX", "v1"],
        ["beta", "SANDBOX", "v1"],
    ]
    assert first[3:] == ["(more agents follow: --offset 2)"]
    last = lines("--limit", "2", "--offset", "2")
    assert [line.split()[0] for line in last] == ["ID", "delta", "gamma"], "the last page says nothing more"
    assert lines("--offset", "4") == ["no agents from offset 4"]
    assert lines("--status", "GOVERNED_INVALIDATED") == ["no agents"]


def test_show_gives_the_summary_and_the_stored_spec(ws: Path) -> None:
    shown = ok("agent", "show", "delta", home=ws)
    assert shown["spec"] == SPECS["delta"]
    assert (shown["id"], shown["name"], shown["status"], shown["version"]) == (
        "delta",
        "Delta",
        "GOVERNED_VALID",
        1,
    )
    assert (shown["type"], shown["role_class"], shown["workspace"]) == ("supervised", "analysis", "default")
    # governed: no sandbox expiry any more
    assert shown["sandbox_expires_at"] is None
    assert shown["creation_mode"] == "import"
    # its current proof as recorded, bound to the active policy
    (active,) = [v["hash"] for v in ok("policy", "history", home=ws) if v["active"]]
    proof = shown["proof"]
    assert (proof["version"], proof["policy_hash"], proof["governance_status"]) == (
        1,
        active,
        "GOVERNED_VALID",
    )
    assert set(proof) == {"version", "policy_hash", "keyid", "governance_status", "issued_at", "expires_at"}
    text = agov("agent", "show", "delta", home=ws, as_json=False).out.splitlines()
    assert f"proof: v1 GOVERNED_VALID under policy {active[:12]} (the active policy), issued " in "\n".join(
        text
    )
    assert "sandbox_expires_at: -" in text, "not Python's None"
    assert ok("agent", "show", "alpha", home=ws)["proof"] is None, "a sandbox agent has none"
    assert "proof: none" in agov("agent", "show", "alpha", home=ws, as_json=False).out


def test_update_stores_version_2_with_notes(ws: Path, tmp_path: Path) -> None:
    home = copy_ws(ws, tmp_path / "ws")
    v2 = patched(SPECS["alpha"], "spec.economics.monthly_budget_usd", 250)
    path = write_doc(tmp_path / "alpha-v2.yaml", v2)

    notes = "raise the budget\n  v9 2099-01-01 update (alpha@8) by root"  # a forged line, if printed raw
    out = ok("agent", "update", "alpha", "--from-file", path, "--notes", notes, home=home)

    assert (out["id"], out["version"], out["status"]) == ("alpha", 2, "SANDBOX")
    assert (out["creation_mode"], out["source"]) == ("update", "alpha@1")
    history = ok("agent", "history", "alpha", home=home)
    assert [(v["version"], v["creation_mode"], v["notes"]) for v in history["versions"]] == [
        (1, "import", ""),
        (2, "update", notes),
    ]
    assert history["versions"][1]["spec_hash"] == out["spec_hash"] != history["versions"][0]["spec_hash"]
    assert [e["type"] for e in history["events"]] == ["AGENT_CREATED", "AGENT_UPDATED"]
    assert history["events"][1]["payload"]["notes"] == notes
    shown = agov("agent", "history", "alpha", home=home, as_json=False).out.splitlines()
    assert shown[2].endswith(" - raise the budget\\n  v9 2099-01-01 update (alpha@8) by root"), shown
    assert shown[3] == "proofs:", shown
    assert ok("agent", "show", "alpha", home=home)["spec"] == v2


@pytest.mark.parametrize("state", ["sandbox-expired", "governed"])
def test_an_update_that_changes_nothing_is_refused(ws: Path, tmp_path: Path, state: str) -> None:
    """A new version of the same spec would start a fresh sandbox period: an expired (or, through
    the sandbox, an invalidated) agent would run again with nothing changed."""
    home = copy_ws(ws, tmp_path / "ws")
    agent_id = "beta" if state == "sandbox-expired" else "delta"
    if state == "sandbox-expired":
        sql(
            home,
            "UPDATE agents SET sandbox_expires_at = '2000-01-01T00:00:00.000000+00:00' WHERE id = 'beta'",
        )
        assert ok("agent", "show", "beta", home=home)["status"] == "SANDBOX"
    denied_before = agov("admit", agent_id, home=home).json["code"]
    same = write_doc(tmp_path / "same.json", SPECS[agent_id], "json")  # another format, same spec
    before = snapshot(home)

    refused = expect_error(agov("agent", "update", agent_id, "--from-file", same, home=home))
    assert f"agent '{agent_id}' version 1 already has this exact spec" in refused["message"], refused
    assert_rejected_unchanged(before, snapshot(home))
    assert agov("admit", agent_id, home=home).json["code"] == denied_before
    assert denied_before == (
        "ADMISSION_DENY_SANDBOX_EXPIRED" if state == "sandbox-expired" else "ADMISSION_ALLOW"
    )


def test_updating_a_governed_agent_sends_it_back_to_the_sandbox(ws: Path, tmp_path: Path) -> None:
    home = copy_ws(ws, tmp_path / "ws")
    first = ok("admit", "delta", home=home)
    assert first["code"] == "ADMISSION_ALLOW"
    v1_proof = ok("agent", "history", "delta", home=home)["proofs"]
    assert [(p["version"], p["superseded_at"]) for p in v1_proof] == [(1, None)]

    v2 = patched(SPECS["delta"], "spec.anatomy.reasoning.temperature", 0.5)
    path = write_doc(tmp_path / "delta-v2.yaml", v2)
    out = ok("agent", "update", "delta", "--from-file", path, "--notes", "warmer", home=home)

    assert (out["status"], out["version"]) == ("SANDBOX", 2)
    # a fresh sandbox period starts with the new version
    expires = parse_time(out["sandbox_expires_at"]) - datetime.now(UTC)
    assert timedelta(days=29) < expires <= timedelta(days=30)
    history = ok("agent", "history", "delta", home=home)
    (old,) = history["proofs"]
    assert old["version"] == 1
    assert old["superseded_at"] is not None
    assert history["events"][-1]["type"] == "AGENT_UPDATED"
    assert history["events"][-1]["payload"]["back_to_sandbox"] is True

    # judged as SANDBOX now: the sandbox chain applies (its expiry is what decides) ...
    sql(home, "UPDATE agents SET sandbox_expires_at = '2000-01-01T00:00:00.000000+00:00' WHERE id = 'delta'")
    expired = agov("admit", "delta", home=home)
    assert (expired.code, expired.json["code"]) == (1, "ADMISSION_DENY_SANDBOX_EXPIRED")
    sql(home, "UPDATE agents SET sandbox_expires_at = ? WHERE id = 'delta'", [out["sandbox_expires_at"]])

    # ... and forging the status back to governed finds no proof for version 2
    forged = copy_ws(home, tmp_path / "forged")
    sql(forged, "UPDATE agents SET status = 'GOVERNED_VALID' WHERE id = 'delta'")
    missing = agov("admit", "delta", home=forged)
    assert (missing.code, missing.json["code"]) == (1, "ADMISSION_DENY_PROOF_MISSING")
    # reviving the old proof does not help either: it signs version 1's spec
    sql(forged, "UPDATE agent_proofs SET superseded_at = NULL WHERE agent_id = 'delta'")
    stale = agov("admit", "delta", home=forged)
    assert (stale.code, stale.json["code"]) == (1, "ADMISSION_DENY_SPEC_HASH_MISMATCH")

    # promoted again: a proof for version 2
    promoted = ok("promote", "delta", "--role", "agent_admin", home=home)
    assert promoted["status"] == "GOVERNED_VALID"
    proofs = ok("agent", "history", "delta", home=home)["proofs"]
    assert [(p["version"], p["superseded_at"] is None) for p in proofs] == [(1, False), (2, True)]
    again = ok("admit", "delta", home=home)
    assert set(again) == ADMISSION_KEYS
    assert again["code"] == "ADMISSION_ALLOW"


def test_update_to_an_uncontained_spec_is_refused(ws: Path, tmp_path: Path) -> None:
    home = copy_ws(ws, tmp_path / "ws")
    path = write_doc(tmp_path / "leaky.yaml", patched(SPECS["beta"], "spec.containment.external_calls", True))
    before = snapshot(home)

    error = expect_error(agov("agent", "update", "beta", "--from-file", path, home=home), 2)

    assert error["message"].startswith("spec/containment")
    assert_rejected_unchanged(before, snapshot(home))
