"""Revalidation renews the proof on record; it never issues a first proof or a later expiry.

A passing agent's new proof keeps the expiry of the proof it replaces. An agent whose proof has
expired, or that has no current proof for its version (its status was set outside a
promotion), is invalidated with a reason instead of being signed: only a promotion governs it
again. Before, every revalidation signed proofs with no expiry, so one policy reload brought
agents with expired proofs back for good, and a status flipped in the store became a signed proof.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from _reload_support import ACTOR, agent_doc, engine_governing

from agov.decisions import Status
from agov.engine import Engine
from agov.registry import CreationMode
from agov.store.sqlite import parse_iso

GOVERNED = ("renew-a", "renew-b")


@pytest.fixture
def engine(tmp_path: Path, opa_bin: Path) -> Iterator[Engine]:
    with engine_governing(tmp_path / "ws", GOVERNED) as eng:
        yield eng


def _set_clock(engine: Engine, at: datetime) -> None:
    engine.clock = lambda: at


def _current_proof(engine: Engine, agent_id: str) -> Any:
    return engine.store.query_one(
        "SELECT id, version, issued_at, expires_at, envelope FROM agent_proofs"
        " WHERE agent_id = ? AND superseded_at IS NULL",
        (agent_id,),
    )


def _signed_expiry(envelope: bytes) -> datetime | None:
    """The expiry the signed statement itself carries."""
    statement = json.loads(base64.b64decode(json.loads(envelope)["payload"]))
    text = statement["predicate"]["expires_at"]
    return None if text is None else datetime.fromisoformat(text.replace("Z", "+00:00"))


def _proofs(engine: Engine) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in engine.store.query("SELECT * FROM agent_proofs ORDER BY id")]


def _flip_status(engine: Engine, agent_id: str, status: Status) -> None:
    """An edit made to the store outside agov (not through a promotion)."""
    conn = sqlite3.connect(engine.workspace.db_path)
    try:
        conn.execute("UPDATE agents SET status = ? WHERE id = ?", (status.value, agent_id))
        conn.commit()
    finally:
        conn.close()


def test_a_renewed_proof_keeps_the_expiry_of_the_proof_it_replaces(engine: Engine) -> None:
    before = {a: _current_proof(engine, a) for a in GOVERNED}
    assert all(p["expires_at"] is not None for p in before.values()), "setup: promotions set an expiry"
    _set_clock(engine, engine.clock() + timedelta(days=30))

    report = engine.revalidate()

    assert (report.total, report.valid, report.invalidated) == (2, 2, 0)
    for agent_id, old in before.items():
        new = _current_proof(engine, agent_id)
        assert new["id"] != old["id"], "a fresh proof was signed"
        assert new["issued_at"] > old["issued_at"]
        assert new["expires_at"] == old["expires_at"]
        assert _signed_expiry(new["envelope"]) == parse_iso(old["expires_at"]), "and so does its statement"
        assert engine.admit(agent_id).allow


def test_an_expired_proof_is_not_renewed_and_the_agent_is_invalidated(engine: Engine) -> None:
    expires = parse_iso(_current_proof(engine, GOVERNED[0])["expires_at"])
    assert expires is not None
    _set_clock(engine, expires + timedelta(seconds=1))
    proofs = _proofs(engine)

    preview = engine.revalidate(dry_run=True)
    assert {c["agent_id"]: [d["code"] for d in c["deny"]] for c in preview.changes} == {
        a: ["REVALIDATION_PROOF_EXPIRED"] for a in GOVERNED
    }
    report = engine.revalidate()

    assert (report.total, report.valid, report.newly_invalidated) == (2, 0, 2)
    assert _proofs(engine) == proofs, "no proof was signed, none superseded"
    for agent_id in GOVERNED:
        row = engine.store.query_one("SELECT status, reasons FROM agents WHERE id = ?", (agent_id,))
        assert row["status"] == Status.GOVERNED_INVALIDATED.value
        assert "REVALIDATION_PROOF_EXPIRED" in row["reasons"]
        assert not engine.admit(agent_id).allow
    # a later revalidation does not restore it either; a promotion does
    assert engine.revalidate().restored == 0
    assert engine.promote(GOVERNED[0], actor=ACTOR, role="agent_admin").allow
    assert engine.admit(GOVERNED[0]).allow


def test_a_proof_one_second_from_expiry_is_still_renewed(engine: Engine) -> None:
    old = _current_proof(engine, GOVERNED[0])
    expires = parse_iso(old["expires_at"])
    assert expires is not None
    _set_clock(engine, expires - timedelta(seconds=1))

    report = engine.revalidate()

    assert report.valid == 2
    new = _current_proof(engine, GOVERNED[0])
    assert (new["id"] != old["id"], new["expires_at"]) == (True, old["expires_at"])


def test_a_status_set_outside_a_promotion_is_not_turned_into_a_proof(engine: Engine) -> None:
    engine.create_agent(agent_doc("never-promoted"), mode=CreationMode.IMPORT, source="x.yaml", actor=ACTOR)
    _flip_status(engine, "never-promoted", Status.GOVERNED_VALID)
    assert not engine.admit("never-promoted").allow, "setup: no proof, no admission"
    proofs = _proofs(engine)

    report = engine.revalidate()

    assert (report.total, report.valid, report.newly_invalidated) == (3, 2, 1)
    assert _current_proof(engine, "never-promoted") is None
    row = engine.store.query_one("SELECT status, reasons FROM agents WHERE id = ?", ("never-promoted",))
    assert row["status"] == Status.GOVERNED_INVALIDATED.value
    assert "REVALIDATION_PROOF_MISSING" in row["reasons"]
    assert not engine.admit("never-promoted").allow
    # the two real agents were renewed; nothing else was signed
    assert len(_proofs(engine)) == len(proofs) + 2


def test_a_current_proof_for_an_older_version_does_not_cover_the_new_one(engine: Engine) -> None:
    agent_id = GOVERNED[0]
    engine.update_agent(agent_id, agent_doc(agent_id, budget=300), actor=ACTOR)  # back to SANDBOX, v2
    assert _current_proof(engine, agent_id) is None, "setup: the update superseded the v1 proof"
    # outside agov: the v1 proof made current again, and the status set to governed
    conn = sqlite3.connect(engine.workspace.db_path)
    try:
        conn.execute(
            "UPDATE agent_proofs SET superseded_at = NULL WHERE id ="
            " (SELECT MAX(id) FROM agent_proofs WHERE agent_id = ? AND version = 1)",
            (agent_id,),
        )
        conn.commit()
    finally:
        conn.close()
    _flip_status(engine, agent_id, Status.GOVERNED_VALID)
    proofs = _proofs(engine)

    engine.revalidate()

    assert _current_proof(engine, agent_id)["version"] == 1, "nothing was signed for v2"
    assert [p for p in _proofs(engine) if p[1] == agent_id] == [p for p in proofs if p[1] == agent_id]
    row = engine.store.query_one("SELECT status, reasons FROM agents WHERE id = ?", (agent_id,))
    assert row["status"] == Status.GOVERNED_INVALIDATED.value
    assert "REVALIDATION_PROOF_MISSING" in row["reasons"]
    assert not engine.admit(agent_id).allow
