"""Revalidation splices each agent's stored spec bytes into the OPA input unparsed, so it first
checks them against the recorded spec hash: a spec edited outside agov (here, bytes that try to
smuggle a second agent entry into the chunk) is invalidated and never sent."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from _reload_support import ACTOR, agent_doc, create_governed, edit_data, set_analysis_limit

from agov import revalidation
from agov.decisions import Status
from agov.engine import Engine
from agov.hashing import canonical_json

AGENTS = ("tamper-a", "tamper-b")


@pytest.fixture
def engine(tmp_path: Path, opa_bin: Path) -> Iterator[Engine]:
    with Engine.init(tmp_path / "ws", actor="tester") as eng:
        for agent_id in AGENTS:
            create_governed(eng, agent_id)
        yield eng


def test_a_spec_edited_outside_agov_is_invalidated_and_never_sent(engine: Engine) -> None:
    conn = sqlite3.connect(engine.workspace.db_path)
    try:
        (spec,) = conn.execute("SELECT spec FROM agent_versions WHERE agent_id = ?", (AGENTS[0],)).fetchone()
        smuggled = spec[:-1] + '},{"id":"' + AGENTS[1] + '","agent":' + spec
        conn.execute("UPDATE agent_versions SET spec = ? WHERE agent_id = ?", (smuggled, AGENTS[0]))
        conn.commit()
    finally:
        conn.close()

    report = engine.revalidate()

    assert (report.total, report.valid, report.newly_invalidated) == (2, 1, 1)
    tampered = engine.store.query_one("SELECT status, reasons FROM agents WHERE id = ?", (AGENTS[0],))
    assert tampered["status"] == Status.GOVERNED_INVALIDATED.value
    assert "REVALIDATION_SPEC_HASH_MISMATCH" in tampered["reasons"]
    assert engine.get_agent(AGENTS[1]).status is Status.GOVERNED_VALID
    assert engine.admit(AGENTS[1]).allow
    assert not engine.admit(AGENTS[0]).allow


def test_an_agent_whose_version_row_is_gone_is_invalidated_not_skipped(engine: Engine) -> None:
    """Before, the chunk query's inner join left such an agent out of every run (the report
    counted one agent fewer) while it stayed GOVERNED_VALID on its old proof."""
    _outside_agov(engine, ("UPDATE agents SET current_version = 99 WHERE id = ?", (AGENTS[0],)))

    report = engine.revalidate()

    assert (report.total, report.valid, report.newly_invalidated) == (2, 1, 1)
    gone = engine.store.query_one("SELECT status, reasons FROM agents WHERE id = ?", (AGENTS[0],))
    assert gone["status"] == Status.GOVERNED_INVALIDATED.value
    assert "REVALIDATION_SPEC_UNREADABLE" in gone["reasons"] and "version row was removed" in gone["reasons"]
    assert engine.admit(AGENTS[1]).allow
    assert not engine.admit(AGENTS[0]).allow
    assert engine.revalidate().total == 2  # judged again by the next run, and still invalid
    assert engine.store.query_one("SELECT status FROM agents WHERE id = ?", (AGENTS[0],))[0] == (
        Status.GOVERNED_INVALIDATED.value
    )


def _outside_agov(engine: Engine, *edits: tuple[str, tuple[object, ...]]) -> None:
    """Statements (SQL, parameters) run on the store as the sqlite3 shell would, in one
    transaction."""
    conn = sqlite3.connect(engine.workspace.db_path)
    try:
        for sql, params in edits:
            conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


def _set_spec(engine: Engine, agent_id: str, spec: str) -> None:
    """The stored spec and its recorded hash, both edited outside agov, so that they agree."""
    digest = hashlib.sha256(spec.encode()).hexdigest()
    _outside_agov(
        engine,
        ("UPDATE agent_versions SET spec = ?, spec_hash = ? WHERE agent_id = ?", (spec, digest, agent_id)),
        ("UPDATE agent_proofs SET spec_hash = ? WHERE agent_id = ?", (digest, agent_id)),
    )


@pytest.mark.parametrize("edit", ["not JSON", "a second entry smuggled in"])
def test_a_spec_edited_with_its_hash_into_bytes_that_are_not_one_json_object_stops_nobody_else(
    engine: Engine, edit: str
) -> None:
    """Before, such bytes broke the whole chunk's input: every run stopped at that chunk, and the
    agents in it and after it stayed bound to the old policy, denied at every start."""
    edited, other = AGENTS
    if edit == "not JSON":
        _set_spec(engine, edited, "{")
    else:
        (spec,) = engine.store.query_one("SELECT spec FROM agent_versions WHERE agent_id = ?", (other,))
        # the other agent again, with a second result for its id: a conflict in OPA
        _set_spec(engine, edited, spec[:-1] + ',"x":1},{"id":"' + other + '","agent":{}')

    report = engine.revalidate()

    assert (report.total, report.valid, report.newly_invalidated) == (2, 1, 1)
    row = engine.store.query_one("SELECT status, reasons FROM agents WHERE id = ?", (edited,))
    assert row["status"] == Status.GOVERNED_INVALIDATED.value
    assert "REVALIDATION_SPEC_UNREADABLE" in row["reasons"]
    assert engine.get_agent(other).status is Status.GOVERNED_VALID
    assert engine.admit(other).allow


def test_a_spec_edited_with_its_hash_cannot_have_another_agent_judged_on_other_bytes(engine: Engine) -> None:
    """The edited spec closes the chunk's agents and opens a second "agents" key (OPA keeps the
    last one), in which its neighbour stands with a spec the stricter policy passes. Before, the
    neighbour was renewed under that policy on those bytes, and admitted."""
    victim, edited = AGENTS
    (own,) = engine.store.query_one("SELECT spec FROM agent_versions WHERE agent_id = ?", (edited,))
    passing = canonical_json(agent_doc(victim, temperature=0.1)).decode()
    smuggled = '}],"agents":[{"id":"' + victim + '","agent":' + passing + '},{"id":"' + edited + '","agent":'
    _set_spec(engine, edited, own + smuggled + own)
    edit_data(engine.workspace.home, set_analysis_limit(0.2))  # both agents have temperature 0.3

    engine.reload_policy(actor=ACTOR, reason="stricter")

    for agent_id, code in (
        (victim, "PROMOTION_DENY_TEMPERATURE_EXCEEDS_LIMIT"),
        (edited, "REVALIDATION_SPEC_UNREADABLE"),
    ):
        row = engine.store.query_one("SELECT status, reasons FROM agents WHERE id = ?", (agent_id,))
        assert row["status"] == Status.GOVERNED_INVALIDATED.value, agent_id
        assert code in row["reasons"], agent_id
        assert not engine.admit(agent_id).allow


def test_chunks_carry_a_bounded_number_of_spec_bytes(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk of revalidation_chunk_size agents with large specs would exceed the request limit
    and stop every run: a chunk ends early instead, and a spec larger than a whole chunk may
    carry (which agov never stores) is invalidated on its own."""
    for agent_id in ("tamper-c", "tamper-d", "tamper-e"):
        create_governed(engine, agent_id)
    sizes = {len(r["spec"]) for r in engine.store.query("SELECT spec FROM agent_versions")}
    monkeypatch.setattr(revalidation, "_CHUNK_SPEC_BYTES", 2 * max(sizes) + 1)  # two specs a chunk
    (big,) = engine.store.query_one("SELECT spec FROM agent_versions WHERE agent_id = 'tamper-e'")
    _set_spec(engine, "tamper-e", big[:-1] + ',"padding":"' + "x" * (3 * max(sizes)) + '"}')
    chunks: list[int] = []

    report = engine.revalidate(progress=chunks.append)

    assert chunks == [2, 2, 1]
    assert (report.total, report.valid, report.newly_invalidated) == (5, 4, 1)
    row = engine.store.query_one("SELECT status, reasons FROM agents WHERE id = 'tamper-e'")
    assert "REVALIDATION_SPEC_UNREADABLE" in row["reasons"] and "bytes" in row["reasons"]
