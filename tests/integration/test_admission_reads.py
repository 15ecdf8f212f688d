"""Admission keeps its store reads from one start to the next only while nothing commits: a
change by another process, another thread or the engine itself is seen by the very next start."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _reload_support import create_governed

from agov.decisions import Code
from agov.engine import Engine
from agov.store.sqlite import iso

AGENT = "memo-reconciler"
EDIT = ('"monthly_budget_usd":200', '"monthly_budget_usd":201')


@pytest.fixture
def engine(tmp_path: Path, opa_bin: Path) -> Iterator[Engine]:
    with Engine.init(tmp_path / "ws", actor="tester") as eng:
        create_governed(eng, AGENT)
        yield eng


def _edit_spec(db: Path, old: str, new: str) -> None:
    conn = sqlite3.connect(db)
    try:
        changed = conn.execute(
            "UPDATE agent_versions SET spec = replace(spec, ?, ?) WHERE agent_id = ?", (old, new, AGENT)
        ).rowcount
        conn.commit()
    finally:
        conn.close()
    assert changed == 1


def test_an_edit_by_another_connection_is_seen_by_the_next_start(engine: Engine) -> None:
    assert engine.admit(AGENT).allow
    assert engine.admit(AGENT).allow  # the second start reads nothing new
    _edit_spec(engine.workspace.db_path, *EDIT)
    decision = engine.admit(AGENT)
    assert (decision.allow, decision.code) == (False, Code.ADMISSION_DENY_SPEC_HASH_MISMATCH)
    _edit_spec(engine.workspace.db_path, *reversed(EDIT))
    assert engine.admit(AGENT).allow


def test_a_commit_by_another_thread_is_seen_by_the_next_start(engine: Engine) -> None:
    assert engine.admit(AGENT).allow
    key = next(k for k in engine.list_keys() if k.active)
    worker = threading.Thread(
        target=engine.revoke_key, args=(key.keyid,), kwargs={"reason": "t", "actor": "t"}
    )
    worker.start()
    worker.join(timeout=30)
    decision = engine.admit(AGENT)
    assert (decision.allow, decision.code) == (False, Code.ADMISSION_DENY_SIGNER_REVOKED)


def test_the_engines_own_write_is_seen_by_the_next_start(engine: Engine) -> None:
    assert "proof_present" in engine.admit(AGENT).facts  # judged as a governed agent, by its proof
    document = engine.get_agent(AGENT).spec.document
    document["spec"]["economics"]["monthly_budget_usd"] = 150
    engine.update_agent(AGENT, document, actor="tester")
    # an updated agent is back in the sandbox: judged by the sandbox facts now
    assert "sandbox_not_expired" in engine.admit(AGENT).facts


def test_a_reconnected_store_does_not_serve_reads_from_before(engine: Engine) -> None:
    # a reader that never writes (as `agov serve` admitting starts): both counters of a new
    # connection start where the closed one's stood
    with Engine.open(engine.workspace.home) as reader:
        assert reader.admit(AGENT).allow
        reader.store.close()  # the next read opens a new connection
        conn = sqlite3.connect(engine.workspace.db_path)
        try:
            conn.execute("UPDATE signing_keys SET revoked_at = ? WHERE active = 1", (iso(engine.clock()),))
            conn.commit()
        finally:
            conn.close()
        decision = reader.admit(AGENT)
    assert (decision.allow, decision.code) == (False, Code.ADMISSION_DENY_SIGNER_REVOKED)
