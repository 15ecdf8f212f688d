"""`agov admit`: fail-closed admission, and every way of cheating it denied with its code."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    ADMISSION_KEYS,
    HEX64,
    Result,
    agov,
    assert_only_audit_changed,
    copy_ws,
    ok,
    parallel,
    query,
    snapshot,
    sql,
)

pytestmark = pytest.mark.acceptance


@pytest.fixture(scope="module")
def ws(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = copy_ws(pristine, tmp_path_factory.mktemp("admit") / "ws")
    parallel(
        lambda argv: ok(*argv, home=home),
        [
            ["agent", "create", "--template", "research-analyst", "--id", "gov-a"],
            ["agent", "create", "--template", "finance-reconciler", "--id", "gov-b"],
            ["agent", "create", "--name", "Sandbox Agent", "--id", "sbx-agent"],
        ],
    )
    for agent_id in ("gov-a", "gov-b"):
        assert ok("promote", agent_id, "--role", "agent_admin", home=home)["status"] == "GOVERNED_VALID"
    return home


@pytest.fixture(scope="module")
def active_hash(ws: Path) -> str:
    (active,) = query(ws, "SELECT hash FROM policy_versions WHERE active = 1")
    return str(active[0])


def check_admission(result: Result, *, allow: bool, code: str, agent_id: str) -> dict[str, object]:
    assert result.code == (0 if allow else 1), str(result)
    body = result.json
    assert set(body) == ADMISSION_KEYS
    assert body["agent_id"] == agent_id
    assert (body["allow"], body["decision"], body["code"]) == (allow, "allow" if allow else "deny", code)
    if allow:
        assert body["reasons"] == []
    else:
        assert body["reasons"], body
        assert body["reasons"][0]["code"] == code
    return dict(body)


def test_allow(ws: Path, active_hash: str) -> None:
    body = check_admission(
        agov("admit", "gov-a", home=ws), allow=True, code="ADMISSION_ALLOW", agent_id="gov-a"
    )
    assert body["policy_hash"] == active_hash
    assert isinstance(body["decision_id"], str) and body["decision_id"]
    assert body["status"] == "GOVERNED_VALID"


def test_a_sandbox_agent_in_its_period_is_admitted(ws: Path, active_hash: str) -> None:
    body = check_admission(
        agov("admit", "sbx-agent", home=ws), allow=True, code="ADMISSION_ALLOW", agent_id="sbx-agent"
    )
    assert body["policy_hash"] == active_hash
    assert body["status"] == "SANDBOX", "contained: the runtime starts it in its sandbox"


def test_text_mode(ws: Path) -> None:
    result = agov("admit", "gov-a", home=ws, as_json=False)
    assert result.code == 0
    assert result.out.strip() == "allow gov-a: ADMISSION_ALLOW (as GOVERNED_VALID)"


# --- tampering behind agov's back -------------------------------------------------------------


def edit_spec(home: Path, agent_id: str, edit: Callable[[dict[str, Any]], None]) -> None:
    ((raw,),) = query(home, "SELECT spec FROM agent_versions WHERE agent_id = ?", [agent_id])
    document = json.loads(raw)
    edit(document)
    assert (
        sql(home, "UPDATE agent_versions SET spec = ? WHERE agent_id = ?", [json.dumps(document), agent_id])
        == 1
    )


def set_budget(document: dict[str, Any]) -> None:
    document["spec"]["economics"]["monthly_budget_usd"] = 9000


def open_containment(document: dict[str, Any]) -> None:
    document["spec"]["containment"]["external_calls"] = True


def envelope(home: Path, agent_id: str) -> bytes:
    ((raw,),) = query(
        home, "SELECT envelope FROM agent_proofs WHERE agent_id = ? AND superseded_at IS NULL", [agent_id]
    )
    return bytes(raw)


def set_envelope(home: Path, agent_id: str, data: bytes) -> None:
    assert sql(home, "UPDATE agent_proofs SET envelope = ? WHERE agent_id = ?", [data, agent_id]) == 1


def flip(where: str) -> Callable[[Path], None]:
    """Flip one bit of the proof envelope: inside the payload, inside the signature, or the last byte."""

    def tamper(home: Path) -> None:
        data = bytearray(envelope(home, "gov-a"))
        if where == "end":
            index = len(data) - 2
        else:
            key = b'"payload"' if where == "payload" else b'"sig"'
            start = data.index(key) + len(key)
            start = data.index(b'"', start) + 1  # the value's first character
            end = data.index(b'"', start)
            index = (start + end) // 2
        data[index] ^= 0x01
        set_envelope(home, "gov-a", bytes(data))

    return tamper


def swap_in_proof_of(other: str) -> Callable[[Path], None]:
    """Mix and match: agent A's proof row gets agent B's whole (valid) proof."""

    def tamper(home: Path) -> None:
        columns = "version, policy_hash, spec_hash, envelope, keyid, governance_status, issued_at, expires_at"
        (row,) = query(home, f"SELECT {columns} FROM agent_proofs WHERE agent_id = ?", [other])
        sets = ", ".join(f"{c.strip()} = ?" for c in columns.split(","))
        assert sql(home, f"UPDATE agent_proofs SET {sets} WHERE agent_id = 'gov-a'", row) == 1

    return tamper


def broken_opa(home: Path) -> dict[str, str | None]:
    script = home.parent / "broken-opa"
    script.write_text("#!/bin/sh\necho 'opa: broken on purpose' >&2\nexit 1\n")
    script.chmod(0o755)
    return {"AGOV_OPA_BIN": str(script)}


@dataclass(frozen=True)
class Cheat:
    id: str
    agent_id: str
    code: str
    tamper: Callable[[Path], object] = lambda home: None
    env: Callable[[Path], dict[str, str | None]] = field(default=lambda home: {})


CHEATS = [
    Cheat(
        "spec-edited",
        "gov-a",
        "ADMISSION_DENY_SPEC_HASH_MISMATCH",
        lambda home: edit_spec(home, "gov-a", set_budget),
    ),
    Cheat(
        "envelope-garbage",
        "gov-a",
        "ADMISSION_DENY_SIGNATURE_INVALID",
        lambda home: set_envelope(home, "gov-a", b"\x00garbage, not a DSSE envelope\xff"),
    ),
    Cheat(
        # what a sqlite3 shell edit stores: TEXT, not BLOB
        "envelope-garbage-as-text",
        "gov-a",
        "ADMISSION_DENY_SIGNATURE_INVALID",
        lambda home: sql(
            home, "UPDATE agent_proofs SET envelope = 'not a DSSE envelope' WHERE agent_id = 'gov-a'"
        ),
    ),
    Cheat("flip-payload", "gov-a", "ADMISSION_DENY_SIGNATURE_INVALID", flip("payload")),
    Cheat("flip-signature", "gov-a", "ADMISSION_DENY_SIGNATURE_INVALID", flip("sig")),
    Cheat("flip-end", "gov-a", "ADMISSION_DENY_SIGNATURE_INVALID", flip("end")),
    Cheat(
        "proof-deleted",
        "gov-a",
        "ADMISSION_DENY_PROOF_MISSING",
        lambda home: sql(home, "DELETE FROM agent_proofs WHERE agent_id = 'gov-a'"),
    ),
    Cheat("proof-of-another-agent", "gov-a", "ADMISSION_DENY_SPEC_HASH_MISMATCH", swap_in_proof_of("gov-b")),
    Cheat(
        "status-forged-to-governed",
        "sbx-agent",
        "ADMISSION_DENY_PROOF_MISSING",
        lambda home: sql(home, "UPDATE agents SET status = 'GOVERNED_VALID' WHERE id = 'sbx-agent'"),
    ),
    Cheat(
        "sandbox-expired",
        "sbx-agent",
        "ADMISSION_DENY_SANDBOX_EXPIRED",
        lambda home: sql(
            home,
            "UPDATE agents SET sandbox_expires_at = '2001-02-03T04:05:06.000000+00:00' WHERE id = 'sbx-agent'",
        ),
    ),
    Cheat(
        "sandbox-uncontained",
        "sbx-agent",
        "ADMISSION_DENY_CONTAINMENT_VIOLATION",
        lambda home: edit_spec(home, "sbx-agent", open_containment),
    ),
    Cheat(
        "invalidated",
        "gov-a",
        "ADMISSION_DENY_INVALIDATED",
        lambda home: sql(home, "UPDATE agents SET status = 'GOVERNED_INVALIDATED' WHERE id = 'gov-a'"),
    ),
    Cheat(
        "opa-false",
        "gov-a",
        "ADMISSION_DENY_ENGINE_UNAVAILABLE",
        env=lambda home: {"AGOV_OPA_BIN": "/bin/false"},
    ),
    Cheat("opa-exits-1", "gov-a", "ADMISSION_DENY_ENGINE_UNAVAILABLE", env=broken_opa),
]


@pytest.fixture(scope="module")
def cheated(ws: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    root = tmp_path_factory.mktemp("admit-cheats")

    def run(cheat: Cheat) -> Result:
        home = copy_ws(ws, root / cheat.id / "ws")
        cheat.tamper(home)
        return agov("admit", cheat.agent_id, home=home, env=cheat.env(home))

    return dict(zip([c.id for c in CHEATS], parallel(run, CHEATS), strict=True))


@pytest.mark.parametrize("cheat", CHEATS, ids=[c.id for c in CHEATS])
def test_cheating_is_denied_with_its_code(cheated: dict[str, Result], cheat: Cheat, active_hash: str) -> None:
    body = check_admission(cheated[cheat.id], allow=False, code=cheat.code, agent_id=cheat.agent_id)
    assert body["policy_hash"] == active_hash
    # each cheat fails one check, and no fact the engine never established is reported as a
    # failure of its own: a proof whose signature fails is not also called expired or a mismatch
    # (the engine's notes explain the one code, under the same code)
    assert {reason["code"] for reason in body["reasons"]} == {cheat.code}, body["reasons"]
    assert body["status"] is None, "a deny starts nothing: no status a runtime could start it as"
    if cheat.code == "ADMISSION_DENY_ENGINE_UNAVAILABLE":
        assert body["decision_id"] is None


def test_a_genuine_envelope_stored_as_text_is_the_same_envelope(ws: Path, tmp_path: Path) -> None:
    """The signature covers the bytes, not SQLite's storage class of them."""
    home = copy_ws(ws, tmp_path / "ws")
    genuine = envelope(home, "gov-a")
    assert sql(home, "UPDATE agent_proofs SET envelope = ? WHERE agent_id = 'gov-a'", [genuine.decode()]) == 1
    assert query(home, "SELECT typeof(envelope) FROM agent_proofs WHERE agent_id = 'gov-a'") == [("text",)]
    check_admission(agov("admit", "gov-a", home=home), allow=True, code="ADMISSION_ALLOW", agent_id="gov-a")


def test_engine_unavailable_names_the_cause(cheated: dict[str, Result]) -> None:
    reason = cheated["opa-exits-1"].json["reasons"][0]["message"]
    assert "broken on purpose" in reason


def test_revoked_signer_then_new_key_and_revalidation(ws: Path, tmp_path: Path) -> None:
    home = copy_ws(ws, tmp_path / "ws")
    (old,) = [k["keyid"] for k in ok("keys", "list", home=home) if k["active"]]

    revoked = ok("keys", "revoke", old[:12], "--reason", "key leaked", home=home)
    assert revoked["keyid"] == old
    assert revoked["revoked_at"] and revoked["revoke_reason"] == "key leaked"
    denied = check_admission(
        agov("admit", "gov-a", home=home), allow=False, code="ADMISSION_DENY_SIGNER_REVOKED", agent_id="gov-a"
    )
    # the proof's expiry and hashes are never read from a revoked signer's proof: not reported
    assert {reason["code"] for reason in denied["reasons"]} == {"ADMISSION_DENY_SIGNER_REVOKED"}, denied

    new = ok("keys", "generate", home=home)
    assert re.fullmatch(HEX64, new["keyid"]) and new["keyid"] != old and new["active"] is True
    report = ok("revalidate", home=home)
    assert (report["total"], report["valid"], report["invalidated"]) == (2, 2, 0)

    check_admission(agov("admit", "gov-a", home=home), allow=True, code="ADMISSION_ALLOW", agent_id="gov-a")
    proofs = ok("agent", "history", "gov-a", home=home)["proofs"]
    assert [(p["keyid"], p["superseded_at"] is None) for p in proofs] == [(old, False), (new["keyid"], True)]


def test_a_lost_bundle_signing_key_is_a_deny_that_writes_no_new_key(ws: Path, tmp_path: Path) -> None:
    """A decision starts the managed OPA on the bundle as built: with both halves of the bundle
    signing key gone it denies and says how to recover. Before, it wrote a new pair into keys/
    (a decision writing key material), which could never verify the bundle on disk."""
    home = copy_ws(ws, tmp_path / "ws")
    for name in ("bundle-signing.es256.key", "bundle-signing.es256.pub"):
        (home / "keys" / name).unlink()
    keys_before = sorted(p.name for p in (home / "keys").iterdir())
    before = snapshot(home)

    body = check_admission(
        agov("admit", "gov-a", home=home),
        allow=False,
        code="ADMISSION_DENY_ENGINE_UNAVAILABLE",
        agent_id="gov-a",
    )

    message = body["reasons"][0]["message"]
    assert "bundle signing key" in message and "are missing" in message and "agov policy build" in message
    assert sorted(p.name for p in (home / "keys").iterdir()) == keys_before
    assert_only_audit_changed(before, snapshot(home))
    # the recovery the message names: a new pair signs the active policy's bundle again
    ok("policy", "build", home=home)
    check_admission(agov("admit", "gov-a", home=home), allow=True, code="ADMISSION_ALLOW", agent_id="gov-a")


def test_agent_show_warns_when_the_stored_spec_no_longer_matches_its_recorded_hash(
    ws: Path, tmp_path: Path
) -> None:
    home = copy_ws(ws, tmp_path / "ws")
    assert "warning" not in ok("agent", "show", "gov-a", home=home)
    ((recorded,),) = query(home, "SELECT spec_hash FROM agent_versions WHERE agent_id = 'gov-a'")
    edit_spec(home, "gov-a", set_budget)

    shown = ok("agent", "show", "gov-a", home=home)
    assert shown["spec"]["spec"]["economics"]["monthly_budget_usd"] == 9000
    assert shown["spec_hash"] != recorded
    assert f"does not match the hash recorded with it ({recorded})" in shown["warning"]
    text = agov("agent", "show", "gov-a", home=home, as_json=False).out
    assert "warning: the stored spec does not match" in text
    denied = agov("admit", "gov-a", home=home)
    assert (denied.code, denied.json["code"]) == (1, "ADMISSION_DENY_SPEC_HASH_MISMATCH")


def test_keys_list_names_a_signing_key_whose_files_cannot_sign(ws: Path, tmp_path: Path) -> None:
    """`keys list` read the store alone: a signing key whose public file was gone was listed as
    `signing`, while every promotion and renewal refused to sign with it."""
    home = copy_ws(ws, tmp_path / "ws")
    (key,) = [k for k in ok("keys", "list", home=home) if k["active"]]
    assert key["state"] == "signing" and key["problem"] is None
    (home / "keys" / f"{key['keyid']}.ed25519.pub").unlink()

    (listed,) = [k for k in ok("keys", "list", home=home) if k["keyid"] == key["keyid"]]
    text = agov("keys", "list", home=home, as_json=False)

    assert listed["state"] == "signing"
    assert listed["problem"] and "may not sign" in listed["problem"], listed
    assert text.code == 0 and f"problem: {listed['problem']}" in text.out, str(text)


def test_the_revoke_hint_fits_the_key_revoked(ws: Path, tmp_path: Path) -> None:
    home = copy_ws(ws, tmp_path / "ws")
    (signer,) = [k["keyid"] for k in ok("keys", "list", home=home) if k["active"]]
    staged = ok("keys", "generate", "--not-before", "2999-01-01T00:00:00Z", home=home)["keyid"]

    cancelled = agov(
        "keys", "revoke", staged[:12], "--reason", "cancel the rotation", home=home, as_json=False
    )
    assert cancelled.code == 0, str(cancelled)
    assert f"the rotation to it is cancelled; {signer[:16]} keeps signing" in cancelled.out, cancelled.out

    successor = ok("keys", "generate", home=home)["keyid"]  # signs from now on
    retired = agov("keys", "revoke", signer[:12], "--reason", "leaked", home=home, as_json=False)
    assert retired.code == 0, str(retired)
    assert f"`agov revalidate` re-signs, with {successor[:16]}, the valid agents" in retired.out, retired.out

    last = agov("keys", "revoke", successor[:12], "--reason", "leaked too", home=home, as_json=False)
    assert last.code == 0, str(last)
    assert "no key signs now: `agov keys generate`, then `agov revalidate`" in last.out, last.out

    # a rotation cancelled when no key signs: the hint is the way out, not the rotation
    later = ok("keys", "generate", "--not-before", "2999-01-01T00:00:00Z", home=home)["keyid"]
    alone = agov("keys", "revoke", later[:12], "--reason", "not that one", home=home, as_json=False)
    assert alone.code == 0, str(alone)
    assert "no key signs now: `agov keys generate`" in alone.out, alone.out
