"""`agov promote`: allow (VALID), warnings only (RESTRICTED), deny (exit 1, nothing changed)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    HEX64,
    agov,
    assert_only_audit_changed,
    copy_ws,
    create_from_spec,
    make_spec,
    ok,
    parallel,
    query,
    snapshot,
)

pytestmark = pytest.mark.acceptance

PROMOTE_KEYS = {
    "agent_id",
    "decision",
    "allow",
    "status",
    "deny",
    "warn",
    "policy_hash",
    "decision_id",
    "proof_keyid",
}

AGENTS = [
    make_spec("good-agent"),
    make_spec("pass-agent"),  # would pass, but only ever meets a broken OPA
    make_spec("auto-agent", agent_type="autonomous"),
    make_spec("budget-800", budget=800),
    make_spec("budget-900", budget=900),
    make_spec("budget-1000", budget=1000),
    make_spec("budget-over", budget=1000.01),
    make_spec("hot-agent", role_class="compliance", temperature=0.5),  # compliance limit: 0.3
    make_spec("hollow-agent", inputs=[], actions=[]),
    make_spec("all-wrong", role_class="analysis", temperature=0.9, budget=5000, inputs=[]),
]


@pytest.fixture(scope="module")
def ws(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("promote")
    home = copy_ws(pristine, root / "ws")
    # one writer per agent, a few at a time: the store serialises them
    parallel(lambda doc: create_from_spec(home, doc, root / "specs"), AGENTS)
    assert query(home, "SELECT COUNT(*) FROM agents WHERE status = 'SANDBOX'") == [(len(AGENTS),)]
    return home


@pytest.fixture(scope="module")
def active_hash(ws: Path) -> str:
    """The active policy, as `agov policy history` reports it."""
    versions = ok("policy", "history", home=ws)
    (active,) = [v["hash"] for v in versions if v["active"]]
    return str(active)


@pytest.fixture(scope="module")
def proof_key(ws: Path) -> str:
    ((key,),) = query(ws, "SELECT keyid FROM signing_keys WHERE active = 1")
    return str(key)


def promote(
    home: Path, agent_id: str, role: str = "agent_admin", env: dict[str, str | None] | None = None
) -> tuple[int, dict[str, Any]]:
    result = agov("promote", agent_id, "--role", role, "--actor", "alice", home=home, env=env)
    assert result.code in (0, 1), str(result)
    body = result.json
    assert set(body) == PROMOTE_KEYS
    assert body["agent_id"] == agent_id
    return result.code, body


def codes(reasons: object) -> list[str]:
    assert isinstance(reasons, list)
    return [r["code"] for r in reasons]


def test_allow_governs_the_agent_with_a_signed_proof(ws: Path, active_hash: str, proof_key: str) -> None:
    code, out = promote(ws, "good-agent")

    assert code == 0
    assert (out["decision"], out["allow"], out["status"]) == ("allow", True, "GOVERNED_VALID")
    assert out["deny"] == [] and out["warn"] == []
    assert out["policy_hash"] == active_hash
    assert re.fullmatch(HEX64, active_hash)
    assert isinstance(out["decision_id"], str) and out["decision_id"]
    assert out["decision_id"] != "not-logged"
    assert out["proof_keyid"] == proof_key

    history = ok("agent", "history", "good-agent", home=ws)
    (proof,) = history["proofs"]
    assert (proof["version"], proof["policy_hash"], proof["keyid"]) == (1, active_hash, proof_key)
    assert (proof["governance_status"], proof["superseded_at"]) == ("GOVERNED_VALID", None)
    events = [e for e in history["events"] if e["type"].startswith("PROMOTION")]
    assert [e["type"] for e in events] == ["PROMOTION_ATTEMPT", "PROMOTION_SUCCESS"]
    assert {e["actor"] for e in events} == {"alice"}
    assert events[1]["payload"]["decision_id"] == out["decision_id"]
    assert events[1]["payload"]["keyid"] == proof_key


@pytest.mark.parametrize(
    ("agent_id", "status", "warnings"),
    [
        ("auto-agent", "GOVERNED_RESTRICTED", ["PROMOTION_WARN_AUTONOMOUS_AGENT"]),
        ("budget-800", "GOVERNED_VALID", []),  # exactly 80% of 1000: no warning yet
        ("budget-900", "GOVERNED_RESTRICTED", ["PROMOTION_WARN_BUDGET_NEAR_LIMIT"]),
        ("budget-1000", "GOVERNED_RESTRICTED", ["PROMOTION_WARN_BUDGET_NEAR_LIMIT"]),  # at the limit
    ],
)
def test_warnings_only_restrict(
    ws: Path, active_hash: str, agent_id: str, status: str, warnings: list[str]
) -> None:
    code, out = promote(ws, agent_id)

    assert code == 0
    assert (out["allow"], out["status"]) == (True, status)
    assert out["deny"] == []
    assert codes(out["warn"]) == warnings
    assert out["policy_hash"] == active_hash
    ((stored_status, reasons),) = query(ws, "SELECT status, reasons FROM agents WHERE id = ?", [agent_id])
    assert stored_status == status
    assert codes(json.loads(reasons)) == warnings
    # admission tells the runtime how to start it: restricted, or not
    admitted = ok("admit", agent_id, home=ws)
    assert (admitted["code"], admitted["status"]) == ("ADMISSION_ALLOW", status)


@pytest.mark.parametrize(
    ("agent_id", "role", "deny", "message"),
    [
        (
            "pass-agent",
            "viewer",
            ["PROMOTION_DENY_ROLE_NOT_ALLOWED"],
            r'actor\.role "viewer" may not promote agents',
        ),
        (
            "hot-agent",
            "agent_admin",
            ["PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT"],
            r"temperature 0\.5 exceeds the compliance limit 0\.3",
        ),
        (
            "budget-over",
            "agent_admin",
            ["PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT"],
            r"monthly budget 1000\.01 USD exceeds the org limit 1000(\.0)? USD",
        ),
        (
            "hollow-agent",
            "agent_admin",
            ["PROMOTION_DENY_ANATOMY_INCOMPLETE"] * 2,
            r"spec\.anatomy\.actions is missing or empty",
        ),
        (
            "all-wrong",
            "viewer",
            [
                "PROMOTION_DENY_ANATOMY_INCOMPLETE",
                "PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT",
                "PROMOTION_DENY_ROLE_NOT_ALLOWED",
                "PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT",
            ],
            r"spec\.anatomy\.inputs is missing or empty",
        ),
    ],
    ids=["viewer", "temperature", "budget", "anatomy", "everything"],
)
def test_deny_exits_1_lists_every_reason_and_changes_nothing(
    ws: Path, active_hash: str, agent_id: str, role: str, deny: list[str], message: str
) -> None:
    before = snapshot(ws)
    (status_before,) = query(ws, "SELECT status FROM agents WHERE id = ?", [agent_id])[0]

    code, out = promote(ws, agent_id, role)

    assert code == 1
    assert (out["decision"], out["allow"], out["proof_keyid"]) == ("deny", False, None)
    assert codes(out["deny"]) == deny
    assert all(r["message"] for r in out["deny"])
    assert re.search(message, out["deny"][0]["message"]), out["deny"]
    assert out["status"] == status_before
    assert out["policy_hash"] == active_hash
    added = assert_only_audit_changed(before, snapshot(ws), "PROMOTION_ATTEMPT", "PROMOTION_DENIED")
    assert {row[3] for row in added} == {agent_id}
    denied = json.loads(added[1][6])
    assert codes(denied["deny"]) == deny
    assert denied["decision_id"] == out["decision_id"]


def test_fails_closed_when_opa_is_unavailable(ws: Path, tmp_path: Path, active_hash: str) -> None:
    broken = tmp_path / "opa"
    broken.write_text("#!/bin/sh\necho 'opa: broken on purpose' >&2\nexit 1\n")
    broken.chmod(0o755)
    for opa in ("/bin/false", str(broken)):
        before = snapshot(ws)
        code, out = promote(ws, "pass-agent", env={"AGOV_OPA_BIN": opa})
        assert code == 1, opa
        assert out["allow"] is False
        assert codes(out["deny"]) == ["PROMOTION_DENY_ENGINE_UNAVAILABLE"]
        assert out["status"] == "SANDBOX"
        assert out["proof_keyid"] is None
        assert out["policy_hash"] == active_hash
        assert_only_audit_changed(before, snapshot(ws), "PROMOTION_ATTEMPT", "PROMOTION_DENIED")


@pytest.mark.parametrize("damage", ["missing", "garbage", "empty"])
def test_a_signing_key_whose_public_half_is_unreadable_signs_nothing(
    ws: Path, tmp_path: Path, proof_key: str, damage: str
) -> None:
    """Admission verifies with the public file: before, promotion signed anyway and every later
    start of the agent was denied. Now the promotion is denied, naming the file."""
    home = copy_ws(ws, tmp_path / "ws")
    public = home / "keys" / f"{proof_key}.ed25519.pub"
    if damage == "missing":
        public.unlink()
    else:
        public.write_bytes(b"" if damage == "empty" else b"not a PEM key\n")
    before = snapshot(home)

    code, out = promote(home, "pass-agent")

    assert code == 1 and out["allow"] is False and out["proof_keyid"] is None
    assert out["status"] == "SANDBOX"
    (reason,) = out["deny"]
    assert (
        "admission could not verify what it signs" in reason["message"] and str(public) in reason["message"]
    )
    assert_only_audit_changed(before, snapshot(home), "PROMOTION_ATTEMPT", "PROMOTION_DENIED")
