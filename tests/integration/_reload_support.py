"""Shared helpers for the integration tests: reload, hot-reload race (R10), revalidation crash (R11) and others.

Imported by those test modules (pytest puts this directory on ``sys.path``); not a test itself.
Everything here goes through agov's own API or reads its SQLite file: no mocks.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from agov.engine import Engine
from agov.registry import CreationMode, from_template
from agov.store.sqlite import utcnow

ACTOR = "reload-tester"
ADMIN_ROLE = "agent_admin"
GOVERNED = ("GOVERNED_VALID", "GOVERNED_RESTRICTED", "GOVERNED_INVALIDATED")


def agent_doc(
    agent_id: str,
    *,
    temperature: float = 0.3,
    budget: float = 200,
    role_class: str = "analysis",
    agent_type: str = "advisory",
) -> dict[str, Any]:
    """A complete, promotable spec (from the research-analyst template) with the given knobs."""
    doc = copy.deepcopy(from_template("research-analyst", agent_id=agent_id, display_name=agent_id))
    spec = doc["spec"]
    spec["role_class"] = role_class
    spec["agent_type"] = agent_type
    spec["anatomy"]["reasoning"]["temperature"] = temperature
    spec["economics"]["monthly_budget_usd"] = budget
    return doc


def create_governed(engine: Engine, agent_id: str, **knobs: Any) -> str:
    """Create in SANDBOX, then promote through OPA (the real path); fail if not governed."""
    engine.create_agent(
        agent_doc(agent_id, **knobs), mode=CreationMode.IMPORT, source=f"{agent_id}.yaml", actor=ACTOR
    )
    result = engine.promote(agent_id, actor=ACTOR, role=ADMIN_ROLE)
    assert result.allow, f"setup: promotion of {agent_id} denied: {result.deny}"
    return agent_id


@contextmanager
def engine_governing(home: Path, agent_ids: Iterable[str]) -> Iterator[Engine]:
    """A new workspace whose clock stands still, with ``agent_ids`` governed."""
    with Engine.init(home, actor=ACTOR) as engine:
        start = utcnow()
        engine.clock = lambda: start
        for agent_id in agent_ids:
            create_governed(engine, agent_id)
        yield engine


def data_file(home: Path) -> Path:
    return home / "policies" / "agov" / "config" / "data.json"


def edit_data(home: Path, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Edit the workspace's ``data.json`` in place (as a user would)."""
    path = data_file(home)
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data, indent=2) + "\n")


def set_analysis_limit(limit: float) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        data["temperature_limits"]["analysis"] = limit

    return mutate


def edit_config(home: Path, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Edit ``agov.yaml`` (its org limits are read whenever an engine judges)."""
    path = home / "agov.yaml"
    raw = yaml.safe_load(path.read_text())
    mutate(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def connect(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    return conn


def snapshot(home: Path) -> dict[str, Any]:
    """Every row of every table (plus the audit anchor file): the whole stored state."""
    conn = connect(home / "agov.db")
    try:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        state: dict[str, Any] = {
            t: [tuple(r) for r in conn.execute(f'SELECT * FROM "{t}" ORDER BY rowid')] for t in tables
        }
    finally:
        conn.close()
    anchor = home / "agov.db.audit-anchor"
    state["__anchor__"] = anchor.read_text() if anchor.exists() else None
    return state


def statuses(home: Path) -> dict[str, str]:
    conn = connect(home / "agov.db")
    try:
        return {r["id"]: r["status"] for r in conn.execute("SELECT id, status FROM agents ORDER BY id")}
    finally:
        conn.close()


def current_proofs(home: Path) -> dict[str, list[sqlite3.Row]]:
    """Agent id -> its current (not superseded) proof rows, for every governed agent."""
    conn = connect(home / "agov.db")
    try:
        out: dict[str, list[sqlite3.Row]] = {
            r["id"]: []
            for r in conn.execute(
                f"SELECT id FROM agents WHERE status IN ({','.join('?' * len(GOVERNED))})", GOVERNED
            )
        }
        for row in conn.execute("SELECT * FROM agent_proofs WHERE superseded_at IS NULL"):
            if row["agent_id"] in out:
                out[row["agent_id"]].append(row)
        return out
    finally:
        conn.close()


def metric(engine: Engine, name: str) -> float:
    value = engine.metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


class KnownBug(AssertionError):
    """Raised only by the assertion that shows a known bug, so that ``xfail(raises=KnownBug)``
    does not also swallow a broken precondition of the same test."""


def reload_interrupted_at(engine: Engine, agent_id: str, monkeypatch: Any, *, limit: float = 0.4) -> None:
    """Reload to a policy whose analysis limit is ``limit`` (P2: 0.4); OPA fails on the chunk that
    starts with ``agent_id``, so the chunks before it are committed and the run is left unfinished."""
    edit_data(engine.workspace.home, set_analysis_limit(limit))
    reload_stopped_at(engine, agent_id, monkeypatch, reason=f"analysis limit {limit}, interrupted")


def reload_stopped_at(engine: Engine, agent_id: str, monkeypatch: Any, *, reason: str) -> None:
    """Reload what the workspace holds now; OPA fails on the chunk that starts with ``agent_id``."""
    from agov import revalidation
    from agov.errors import EngineUnavailableError

    judge = revalidation._verdicts

    def chunk_fails(evaluator: Any, rows: list[Any], *args: Any) -> Any:
        if rows[0].agent_id == agent_id:
            raise EngineUnavailableError("injected: OPA went away")
        return judge(evaluator, rows, *args)

    monkeypatch.setattr(revalidation, "_verdicts", chunk_fails)
    try:
        engine.reload_policy(actor=ACTOR, reason=reason)
    except EngineUnavailableError:
        pass
    else:
        raise AssertionError(f"setup: the reload was not interrupted at {agent_id}")
    finally:
        monkeypatch.setattr(revalidation, "_verdicts", judge)


class _KilledAfterSwitch(BaseException):
    """The reloading process killed right after the switch, before it began the run."""


def reload_killed_after_switch(engine: Engine, monkeypatch: Any, *, reason: str) -> None:
    """Reload what the workspace holds now; the process dies right after the switch, before it
    begins the run, which is left open as the switch opened it."""
    revalidate = type(engine).revalidate

    def died(*_args: Any, **_kwargs: Any) -> Any:
        raise _KilledAfterSwitch

    monkeypatch.setattr(type(engine), "revalidate", died)
    try:
        engine.reload_policy(actor=ACTOR, reason=reason)
    except _KilledAfterSwitch:
        pass
    else:
        raise AssertionError("setup: the reload did not reach its run")
    finally:
        monkeypatch.setattr(type(engine), "revalidate", revalidate)


def configmap_volume(mount: Path, files: dict[str, str], stamp: str) -> None:
    """Write ``files`` (relative path -> text) into ``mount`` as the kubelet updates a ConfigMap
    volume: into a new hidden directory, then a symlink to it renamed over ``..data``, then the
    old directory removed. The visible names are symlinks through ``..data``, untouched by an
    update."""
    new = mount / f"..{stamp}"
    for name, text in files.items():
        (new / name).parent.mkdir(parents=True, exist_ok=True)
        (new / name).write_text(text)
    data = mount / "..data"
    old = Path(os.readlink(data)) if data.is_symlink() else None
    os.symlink(new.name, mount / "..data_tmp")
    os.rename(mount / "..data_tmp", data)
    for top in {name.split("/")[0] for name in files}:
        if not (mount / top).is_symlink():
            os.symlink(f"..data/{top}", mount / top)
    if old is not None:
        shutil.rmtree(mount / old)
