"""Revalidation renews a proof row only when agov wrote it: the row carries agov's seal (an HMAC
keyed by ``keys/proof-seal.key``), or else its envelope verifies against the workspace's keys and
binds what the row says.

Before, a revalidation renewed whatever proof row the store held for the agent's version: a
status flipped and a proof row written into agov.db by hand (here, another agent's genuine
envelope, or a garbage one) came out of the next policy change as a proof signed by agov, and
admission let the agent start although no promotion ever approved it.
"""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from _reload_support import ACTOR, agent_doc, edit_data, engine_governing, set_analysis_limit

from agov import revalidation
from agov.decisions import Status
from agov.engine import Engine
from agov.errors import KeyMaterialError
from agov.keys import PROOF_SEAL_KEY_NAME
from agov.registry import CreationMode
from agov.store.sqlite import SCHEMA_VERSION, iso

GOVERNED = ("seal-a", "seal-b")
UNVERIFIED = "REVALIDATION_PROOF_UNVERIFIED"


@pytest.fixture
def engine(tmp_path: Path, opa_bin: Path) -> Iterator[Engine]:
    with engine_governing(tmp_path / "ws", GOVERNED) as eng:
        yield eng


def _edit(engine: Engine, *statements: tuple[str, tuple[Any, ...]]) -> None:
    """Edits made to agov.db outside agov."""
    conn = sqlite3.connect(engine.workspace.db_path)
    try:
        with conn:
            for sql, args in statements:
                conn.execute(sql, args)
    finally:
        conn.close()


def _proofs(engine: Engine) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in engine.store.query("SELECT * FROM agent_proofs ORDER BY id")]


def _current(engine: Engine, agent_id: str) -> Any:
    return engine.store.query_one(
        "SELECT * FROM agent_proofs WHERE agent_id = ? AND superseded_at IS NULL", (agent_id,)
    )


def _agent(engine: Engine, agent_id: str) -> Any:
    return engine.store.query_one("SELECT status, reasons FROM agents WHERE id = ?", (agent_id,))


def _forge_governed(engine: Engine, agent_id: str, *, envelope: Any, seal: str | None) -> None:
    """A sandbox agent made governed outside agov: status flipped, and a current proof row for its
    version and spec hash inserted by hand."""
    engine.create_agent(agent_doc(agent_id), mode=CreationMode.IMPORT, source="x.yaml", actor=ACTOR)
    spec_hash = engine.get_agent(agent_id).spec.hash
    donor = _current(engine, GOVERNED[0])
    _edit(
        engine,
        ("UPDATE agents SET status = ? WHERE id = ?", (Status.GOVERNED_VALID.value, agent_id)),
        (
            "INSERT INTO agent_proofs (agent_id, version, policy_hash, spec_hash, envelope, keyid,"
            " governance_status, issued_at, expires_at, seal) VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                agent_id,
                donor["policy_hash"],
                spec_hash,
                envelope,
                donor["keyid"],
                donor["governance_status"],
                donor["issued_at"],
                donor["expires_at"],
                seal,
            ),
        ),
    )


FORGERIES = {
    "another agent's envelope and seal": None,  # the donor's own
    "a garbage envelope, no seal": b'{"payload": "", "signatures": []}',
    "an envelope stored as text": '{"payload": "", "signatures": []}',
    "an envelope stored as a huge integer": 10**12,
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_proof_row_written_outside_agov_is_not_renewed(engine: Engine, forgery: str) -> None:
    donor = _current(engine, GOVERNED[0])
    if FORGERIES[forgery] is None:
        _forge_governed(engine, "forged", envelope=donor["envelope"], seal=donor["seal"])
    else:
        _forge_governed(engine, "forged", envelope=FORGERIES[forgery], seal=None)
    assert not engine.admit("forged").allow, "setup: admission verifies the proof itself"
    proofs = _proofs(engine)

    preview = engine.revalidate(dry_run=True)
    assert {c["agent_id"]: [d["code"] for d in c["deny"]] for c in preview.changes} == {
        "forged": [UNVERIFIED]
    }
    assert _proofs(engine) == proofs, "a dry run signs nothing"
    report = engine.revalidate()

    assert (report.total, report.valid, report.newly_invalidated) == (3, 2, 1)
    forged = _agent(engine, "forged")
    assert forged["status"] == Status.GOVERNED_INVALIDATED.value
    assert UNVERIFIED in forged["reasons"]
    assert "promote the agent again" in forged["reasons"]
    assert [p for p in _proofs(engine) if p[1] == "forged"] == [p for p in proofs if p[1] == "forged"], (
        "nothing was signed for it"
    )
    assert not engine.admit("forged").allow
    assert all(engine.admit(a).allow for a in GOVERNED), "the agents agov promoted were renewed"
    # a promotion (which the policy and a role approve) governs it
    assert engine.promote("forged", actor=ACTOR, role="agent_admin").allow
    assert engine.admit("forged").allow


def test_rows_from_before_seals_are_verified_in_full_renewed_and_sealed(engine: Engine) -> None:
    """A store from agov before seals (schema 2): its rows carry none; each genuine one is renewed
    once it verifies, and the renewed row is sealed."""
    home = engine.workspace.home
    before = {a: _current(engine, a)["id"] for a in GOVERNED}
    engine.close()
    conn = sqlite3.connect(home / "agov.db")
    with conn:
        conn.execute("ALTER TABLE agent_proofs DROP COLUMN seal")
        conn.execute("PRAGMA user_version = 2")
    conn.close()

    with Engine.open(home) as upgraded:
        assert upgraded.store.schema_version() == SCHEMA_VERSION
        assert all(_current(upgraded, a)["seal"] is None for a in GOVERNED)
        report = upgraded.revalidate()
        assert (report.total, report.valid, report.invalidated) == (2, 2, 0)
        for agent_id in GOVERNED:
            renewed = _current(upgraded, agent_id)
            assert renewed["id"] != before[agent_id] and renewed["seal"] is not None
            assert upgraded.admit(agent_id).allow


def test_a_lost_seal_key_costs_one_full_verify_not_the_fleet(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    seal_key = engine.workspace.keys / PROOF_SEAL_KEY_NAME
    old_key = seal_key.read_bytes()
    old_seals = {a: _current(engine, a)["seal"] for a in GOVERNED}
    seal_key.unlink()

    preview = engine.revalidate(dry_run=True)
    assert (preview.valid, preview.changes) == (2, []), "a dry run verifies them in full too"
    assert not seal_key.exists(), "a dry run writes no key"
    report = engine.revalidate()

    assert (report.total, report.valid, report.invalidated) == (2, 2, 0)
    assert seal_key.read_bytes() != old_key, "a new seal key was written"
    assert stat.S_IMODE(seal_key.stat().st_mode) == 0o600
    for agent_id in GOVERNED:
        assert _current(engine, agent_id)["seal"] not in (None, old_seals[agent_id])
        assert engine.admit(agent_id).allow

    def no_full_verify(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a sealed row was verified in full")

    monkeypatch.setattr(revalidation, "verify_proof", no_full_verify)
    assert engine.revalidate().valid == 2, "the rows sealed by the new key take the fast path"


def test_an_expiry_moved_in_the_row_is_not_carried_into_the_renewed_proof(engine: Engine) -> None:
    agent_id = GOVERNED[0]
    row = _current(engine, agent_id)
    assert row["expires_at"] is not None, "setup: promotions set an expiry"
    later = iso(engine.clock() + timedelta(days=3650))
    _edit(engine, ("UPDATE agent_proofs SET expires_at = ? WHERE id = ?", (later, row["id"])))

    report = engine.revalidate()

    assert (report.valid, report.newly_invalidated) == (1, 1)
    edited = _agent(engine, agent_id)
    assert edited["status"] == Status.GOVERNED_INVALIDATED.value
    assert UNVERIFIED in edited["reasons"] and "expires_at" in edited["reasons"]
    assert _current(engine, agent_id)["id"] == row["id"], "nothing was signed for it"
    assert engine.admit(GOVERNED[1]).allow


def test_an_unsealed_row_signed_by_a_revoked_key_is_not_renewed(engine: Engine) -> None:
    """The full verify judges the signer as admission does; an agov-sealed row of a revoked key
    is still renewed under the new key (R8), since agov itself wrote it."""
    keyid = _current(engine, GOVERNED[0])["keyid"]
    _edit(engine, ("UPDATE agent_proofs SET seal = NULL WHERE agent_id = ?", (GOVERNED[0],)))
    engine.revoke_key(keyid, reason="test", actor=ACTOR)
    engine.generate_key(alg="ed25519", actor=ACTOR)

    report = engine.revalidate()

    assert (report.valid, report.newly_invalidated) == (1, 1)
    unsealed = _agent(engine, GOVERNED[0])
    assert UNVERIFIED in unsealed["reasons"] and "revoked" in unsealed["reasons"]
    assert not engine.admit(GOVERNED[0]).allow
    assert engine.admit(GOVERNED[1]).allow


@pytest.mark.parametrize(
    ("column", "value", "renewed"),
    [
        ("seal", "é" * 64, True),  # a genuine row whose seal is damaged verifies in full
        ("seal", b"\x00" * 32, True),
        ("governance_status", b"GOVERNED_VALID", True),
        ("keyid", 7, False),
        ("expires_at", "soon", False),
        ("expires_at", "2099-01-01T00:00:00", False),  # no UTC offset
    ],
)
def test_a_column_of_a_type_agov_never_writes_is_judged_for_its_agent_alone(
    engine: Engine, column: str, value: Any, renewed: bool
) -> None:
    """One odd row must not stop the run (before, a TypeError did, for every agent after it)."""
    edited, other = GOVERNED
    _edit(engine, (f"UPDATE agent_proofs SET {column} = ? WHERE agent_id = ?", (value, edited)))

    report = engine.revalidate()

    assert report.total == 2
    assert _agent(engine, other)["status"] == Status.GOVERNED_VALID.value
    assert engine.admit(other).allow
    row = _agent(engine, edited)
    if renewed:
        assert row["status"] == Status.GOVERNED_VALID.value
        assert engine.admit(edited).allow
    else:
        assert row["status"] == Status.GOVERNED_INVALIDATED.value
        assert not engine.admit(edited).allow


def test_an_unusable_seal_key_refuses_a_reload_and_denies_a_promotion_before_anything_changes(
    engine: Engine,
) -> None:
    seal_key = engine.workspace.keys / PROOF_SEAL_KEY_NAME
    seal_key.chmod(0o644)
    active = engine.active_policy().hash
    engine.create_agent(agent_doc("waiting"), mode=CreationMode.IMPORT, source="x.yaml", actor=ACTOR)
    proofs = _proofs(engine)

    result = engine.promote("waiting", actor=ACTOR, role="agent_admin")
    assert not result.allow
    assert [r.code for r in result.deny] == ["PROMOTION_DENY_ENGINE_UNAVAILABLE"]
    assert "proof-seal.key" in result.deny[0].message
    assert engine.get_agent("waiting").status is Status.SANDBOX
    edit_data(engine.workspace.home, set_analysis_limit(0.35))
    with pytest.raises(KeyMaterialError, match=r"proof-seal\.key"):
        engine.reload_policy(actor=ACTOR, reason="stricter")
    assert engine.active_policy().hash == active, "the policy was not switched"
    assert _proofs(engine) == proofs


NOT_UTF8 = "CAST(X'FFFE' AS TEXT)"


@pytest.mark.parametrize(
    ("statement", "renewed"),
    [
        (f"UPDATE agent_proofs SET seal = {NOT_UTF8} WHERE agent_id = ?", True),
        (f"UPDATE agent_proofs SET issued_at = {NOT_UTF8} WHERE agent_id = ?", True),
        (f"UPDATE agent_proofs SET keyid = {NOT_UTF8} WHERE agent_id = ?", False),
        (f"UPDATE agent_proofs SET seal = NULL, envelope = {NOT_UTF8} WHERE agent_id = ?", False),
        (f"UPDATE agent_versions SET spec = {NOT_UTF8} WHERE agent_id = ?", False),
        (f"UPDATE agent_versions SET spec_hash = {NOT_UTF8} WHERE agent_id = ?", False),
    ],
)
def test_text_that_is_not_utf8_is_judged_for_its_agent_alone(
    engine: Engine, statement: str, renewed: bool
) -> None:
    """sqlite3 fails a whole fetch on such text: before, the run stopped at that chunk, every time."""
    edited, other = GOVERNED
    _edit(engine, (statement, (edited,)))

    report = engine.revalidate()

    assert report.total == 2
    assert engine.admit(other).allow
    status = _agent(engine, edited)["status"]
    assert status == (Status.GOVERNED_VALID.value if renewed else Status.GOVERNED_INVALIDATED.value)


def test_a_signer_window_agov_never_wrote_fails_the_full_verify_of_that_row_alone(engine: Engine) -> None:
    edited, other = GOVERNED
    old_keyid = _current(engine, edited)["keyid"]
    engine.generate_key(alg="ed25519", actor=ACTOR)  # the old key still verifies, no longer signs
    _edit(
        engine,
        ("UPDATE agent_proofs SET seal = NULL WHERE agent_id = ?", (edited,)),
        ("UPDATE signing_keys SET not_before = 'not a time' WHERE keyid = ?", (old_keyid,)),
    )

    report = engine.revalidate()

    assert (report.total, report.valid, report.newly_invalidated) == (2, 1, 1)
    assert _agent(engine, other)["status"] == Status.GOVERNED_VALID.value, "its sealed row needs no key"
    edited_row = _agent(engine, edited)
    assert UNVERIFIED in edited_row["reasons"] and "ValueError" in edited_row["reasons"]


def test_an_active_signer_window_agov_never_wrote_refuses_the_run_before_anything_changes(
    engine: Engine,
) -> None:
    keyid = _current(engine, GOVERNED[0])["keyid"]
    _edit(engine, ("UPDATE signing_keys SET not_after = '2030-01-01T00:00:00' WHERE keyid = ?", (keyid,)))
    proofs = _proofs(engine)

    with pytest.raises(KeyMaterialError, match="validity window agov did not write"):
        engine.revalidate()
    assert _proofs(engine) == proofs
    assert all(_agent(engine, a)["status"] == Status.GOVERNED_VALID.value for a in GOVERNED)


def test_a_key_row_with_text_that_is_not_utf8_fails_the_full_verify_of_that_row_alone(engine: Engine) -> None:
    edited, other = GOVERNED
    old_keyid = _current(engine, edited)["keyid"]
    engine.generate_key(alg="ed25519", actor=ACTOR)
    _edit(
        engine,
        ("UPDATE agent_proofs SET seal = NULL WHERE agent_id = ?", (edited,)),
        (f"UPDATE signing_keys SET not_before = {NOT_UTF8} WHERE keyid = ?", (old_keyid,)),
    )

    report = engine.revalidate()

    assert (report.total, report.valid, report.newly_invalidated) == (2, 1, 1)
    assert UNVERIFIED in _agent(engine, edited)["reasons"]
    assert engine.admit(other).allow
