"""A store that cannot be read: decisions fail closed (exit 1), other commands are exit 3.

The CLI contract: exit 1 is a deny, a fail-closed one included; exit 3 is an infrastructure
error in a command that is not a decision. `admit` and `promote` once exited 3 on an unreadable
store, so a caller that only tells 0 from 1 could not read the answer as a deny.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from e2e_support import ADMISSION_KEYS, agov, assert_only_audit_changed, db_path, expect_error, ok, snapshot

pytestmark = pytest.mark.acceptance


@pytest.fixture
def broken(fresh_ws: Path) -> Path:
    ok("agent", "create", "--template", "research-analyst", "--id", "gov-a", home=fresh_ws)
    assert ok("promote", "gov-a", "--role", "agent_admin", home=fresh_ws)["allow"] is True
    assert ok("admit", "gov-a", home=fresh_ws)["allow"] is True
    for leftover in fresh_ws.glob("agov.db-*"):  # a WAL or shared-memory file would be recovered
        leftover.unlink()
    db_path(fresh_ws).write_bytes(b"this is not a database " * 512)
    return fresh_ws


def _digest(home: Path) -> str:
    return hashlib.sha256(db_path(home).read_bytes()).hexdigest()


def test_admit_denies_with_the_cause(broken: Path) -> None:
    before = _digest(broken)

    result = agov("admit", "gov-a", home=broken)

    assert result.code == 1, str(result)
    body = result.json
    assert set(body) == ADMISSION_KEYS
    assert (body["allow"], body["code"]) == (False, "ADMISSION_DENY_ENGINE_UNAVAILABLE")
    assert "not a database" in body["reasons"][0]["message"]
    assert _digest(broken) == before

    text = agov("admit", "gov-a", home=broken, as_json=False)
    assert text.code == 1 and text.out.startswith("deny gov-a: ADMISSION_DENY_ENGINE_UNAVAILABLE"), str(text)


def test_promote_denies_with_the_cause(broken: Path) -> None:
    before = _digest(broken)

    result = agov("promote", "gov-a", "--role", "agent_admin", home=broken)

    assert result.code == 1, str(result)
    body = result.json
    assert (body["allow"], [d["code"] for d in body["deny"]]) == (
        False,
        ["PROMOTION_DENY_ENGINE_UNAVAILABLE"],
    )
    assert "not a database" in body["deny"][0]["message"]
    assert _digest(broken) == before


def test_a_command_that_is_not_a_decision_is_exit_3(broken: Path) -> None:
    error = expect_error(agov("agent", "list", home=broken), code=3)
    assert "not a database" in error["message"]
    assert "restore agov.db" in error["hint"] and "from a backup" in error["hint"], error


def test_an_unknown_agent_is_still_bad_input(fresh_ws: Path) -> None:
    before = snapshot(fresh_ws)
    expect_error(agov("admit", "no-such-agent", home=fresh_ws), code=2)
    expect_error(agov("promote", "no-such-agent", "--role", "agent_admin", home=fresh_ws), code=2)
    # a rejected promote request is audited, as a rejected create or update is
    (event,) = assert_only_audit_changed(before, snapshot(fresh_ws), "REQUEST_REJECTED")
    payload = json.loads(event[6])
    assert (payload["operation"], payload["agent_ref"], payload["error"]) == (
        "promote",
        "no-such-agent",
        "NotFoundError",
    )


def test_an_unreadable_audit_anchor_denies_a_promotion_before_anything_commits(fresh_ws: Path) -> None:
    """The anchor is read before COMMIT: a promotion never commits and then reports a deny."""
    ok("agent", "create", "--template", "research-analyst", "--id", "gov-a", home=fresh_ws)
    (fresh_ws / "agov.db.audit-anchor").write_text("{broken")
    before = snapshot(fresh_ws)

    result = agov("promote", "gov-a", "--role", "agent_admin", home=fresh_ws)

    assert result.code == 1, str(result)
    (reason,) = result.json["deny"]
    assert reason["code"] == "PROMOTION_DENY_ENGINE_UNAVAILABLE"
    assert "audit anchor" in reason["message"] and "restore it from a backup" in reason["message"]
    after = snapshot(fresh_ws)
    assert (after.rows, after.audit) == (before.rows, before.audit), "nothing was written, not even audit"
    assert ok("agent", "show", "gov-a", home=fresh_ws)["status"] == "SANDBOX"


@pytest.mark.parametrize(
    ("sql", "damage"),
    [
        ("UPDATE agent_versions SET spec = '{not json' WHERE agent_id = 'gov-a'", "JSONDecodeError"),
        ("UPDATE agents SET status = 'PROMOTED_BY_HAND' WHERE id = 'gov-a'", "ValueError"),
        # was "no agent with id 'gov-a'" (exit 2), and `agent list` left the agent out
        (
            "UPDATE agents SET current_version = 99 WHERE id = 'gov-a'",
            "ValueError: its current version 99 has no stored spec",
        ),
    ],
    ids=["spec-not-json", "unknown-status", "current-version-gone"],
)
def test_a_damaged_agent_row_is_named_and_its_admission_denied(fresh_ws: Path, sql: str, damage: str) -> None:
    """Before: `agent list` failed for every agent with a raw JSONDecodeError ("internal error"),
    and the deny for the damaged agent named it "?"."""
    ok("agent", "create", "--template", "research-analyst", "--id", "gov-a", home=fresh_ws)
    assert ok("promote", "gov-a", "--role", "agent_admin", home=fresh_ws)["allow"] is True
    with sqlite3.connect(db_path(fresh_ws)) as conn:
        conn.execute(sql)
    conn.close()

    admitted = agov("admit", "gov-a", home=fresh_ws)
    assert admitted.code == 1, str(admitted)
    assert (admitted.json["agent_id"], admitted.json["code"]) == (
        "gov-a",
        "ADMISSION_DENY_ENGINE_UNAVAILABLE",
    )
    assert f"the stored row of agent 'gov-a' is damaged: {damage}" in admitted.json["reasons"][0]["message"]

    error = expect_error(agov("agent", "list", home=fresh_ws), code=3)
    assert error["type"] == "StoreError" and "'gov-a' is damaged" in error["message"]
    assert "changed outside agov" in error["hint"]


@pytest.mark.parametrize("loss", ["emptied", "older copy"])
def test_a_store_that_lost_what_its_audit_anchor_records_is_refused(fresh_ws: Path, loss: str) -> None:
    """Before: an emptied agov.db read as a new workspace ("no agents"), and an older copy put
    back (as a lost -wal file does) admitted an agent invalidated since, with exit 0; agov wrote
    on, and once its log passed the anchor, `audit verify` said ok."""
    ok("agent", "create", "--template", "research-analyst", "--id", "gov-a", home=fresh_ws)
    assert ok("promote", "gov-a", "--role", "agent_admin", home=fresh_ws)["allow"] is True
    older = db_path(fresh_ws).with_name("older.db")
    source = sqlite3.connect(db_path(fresh_ws))
    with sqlite3.connect(older) as copy:
        source.backup(copy)  # gov-a governed and admitted
    source.close()
    ok(
        "agent", "update", "gov-a", "--from-file", _spec_file(fresh_ws), home=fresh_ws
    )  # back to SANDBOX, audited
    for leftover in fresh_ws.glob("agov.db-*"):
        leftover.unlink()
    if loss == "emptied":
        db_path(fresh_ws).write_bytes(b"")
    else:
        older.replace(db_path(fresh_ws))
    before = _digest(fresh_ws)

    denied = agov("admit", "gov-a", home=fresh_ws)
    assert denied.code == 1, str(denied)
    assert (denied.json["allow"], denied.json["code"]) == (False, "ADMISSION_DENY_ENGINE_UNAVAILABLE")
    assert "which agov.db.audit-anchor records" in denied.json["reasons"][0]["message"]
    for argv in (["agent", "list"], ["agent", "create", "--template", "research-analyst", "--id", "gov-b"]):
        error = expect_error(agov(*argv, home=fresh_ws), code=3)
        assert "the store was replaced or rolled back" in error["message"], error
        assert "agov audit verify" in error["hint"]
    assert _digest(fresh_ws) == before, "nothing was read as a store, nor written"
    verified = agov("audit", "verify", home=fresh_ws)
    if loss == "emptied":  # nothing to verify, and nothing written to the evidence
        assert "does not hold event" in expect_error(verified, code=3)["message"]
        assert db_path(fresh_ws).stat().st_size == 0
    else:
        assert verified.code == 1 and verified.json["ok"] is False, str(verified)


def _spec_file(home: Path) -> str:
    shown = ok("agent", "show", "gov-a", home=home)
    spec = shown["spec"]
    spec["metadata"]["description"] = "changed after the copy"
    path = home.parent / "gov-a.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_a_truncated_store_is_said_to_be_damaged(fresh_ws: Path) -> None:
    """Before: "database disk image is malformed" came with the hint to check the path and its
    permissions; only "not a database" was said to need a restore."""
    ok("agent", "create", "--template", "research-analyst", "--id", "gov-a", home=fresh_ws)
    for leftover in fresh_ws.glob("agov.db-*"):
        leftover.unlink()
    with db_path(fresh_ws).open("r+b") as db:
        db.truncate(20_000)
    error = expect_error(agov("agent", "list", home=fresh_ws), code=3)
    assert "malformed" in error["message"]
    assert "the file is damaged: restore agov.db" in error["hint"], error
