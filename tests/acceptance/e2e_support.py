"""Helpers for the acceptance tests: run the ``agov`` CLI as a user would, and look at what it left.

Everything here drives the CLI through a subprocess and inspects the workspace with plain
``sqlite3`` and ``/proc``: no engine internals.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
R = TypeVar("R")

AGOV = [sys.executable, "-m", "agov.cli"]
ACTOR = "acceptance"
HEX64 = r"[0-9a-f]{64}"

ADMISSION_KEYS = {"agent_id", "decision", "allow", "code", "reasons", "policy_hash", "decision_id", "status"}


def base_env(**overrides: str | None) -> dict[str, str]:
    """The environment of one ``agov`` call: no stray ``AGOV_*`` settings but the OPA binary."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGOV_") or k == "AGOV_OPA_BIN"}
    env["AGOV_ACTOR"] = ACTOR
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.out)
        except json.JSONDecodeError as exc:  # pragma: no cover - a failure message
            raise AssertionError(
                f"stdout of {self.args} is not JSON ({exc}):\n{self.out}\n{self.err}"
            ) from exc

    def __str__(self) -> str:
        return f"agov {' '.join(self.args)} -> {self.code}\nstdout: {self.out}\nstderr: {self.err}"


def agov(
    *args: Any,
    home: Path | None = None,
    as_json: bool = True,
    env: Mapping[str, str | None] | None = None,
    stdin: str | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
) -> Result:
    """Run ``agov ARGS [--home HOME] [--json]`` and capture everything."""
    argv = [str(a) for a in args]
    if home is not None:
        argv += ["--home", str(home)]
    if as_json:
        argv.append("--json")
    proc = subprocess.run(
        [*AGOV, *argv],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=base_env(**(env or {})),
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
    return Result(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


def ok(*args: Any, **kwargs: Any) -> Any:
    """Run a command that must succeed (exit 0) and return its JSON output."""
    result = agov(*args, **kwargs)
    assert result.code == 0, str(result)
    return result.json


def expect_error(result: Result, code: int = 2) -> dict[str, Any]:
    """Assert a ``--json`` error answer with the given exit code and return its ``error``."""
    assert result.code == code, str(result)
    body = result.json
    assert set(body) == {"error", "exit_code"}, body
    assert body["exit_code"] == code
    assert set(body["error"]) == {"type", "message", "hint"}
    return dict(body["error"])


def parallel(func: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """Run independent jobs (each on its own workspace) a few at a time: the CLI is CPU-bound
    at start-up, so this only overlaps process start-up and OPA's boot."""
    with ThreadPoolExecutor(max_workers=(os.cpu_count() or 2) + 1) as pool:
        return list(pool.map(func, items))


# --- specs ------------------------------------------------------------------------------------


def make_spec(
    agent_id: str,
    *,
    name: str | None = None,
    agent_type: str = "supervised",
    role_class: str = "analysis",
    temperature: float = 0.2,
    budget: float = 100,
    inputs: list[dict[str, Any]] | None = None,
    actions: list[dict[str, Any]] | None = None,
    capabilities: list[str] | None = None,
    external_calls: bool = False,
    persistent_writes: bool = False,
) -> dict[str, Any]:
    return {
        "apiVersion": "agov/v1",
        "kind": "Agent",
        "metadata": {"id": agent_id, "name": name or agent_id.replace("-", " ").title(), "version": "1.0.0"},
        "spec": {
            "agent_type": agent_type,
            "role_class": role_class,
            "anatomy": {
                "reasoning": {"model": "acceptance-model", "temperature": temperature},
                "inputs": [{"name": "tickets", "classification": "internal"}] if inputs is None else inputs,
                "actions": [{"type": "ticket.read", "resource": "helpdesk"}] if actions is None else actions,
                "memory": {"kind": "session"},
            },
            "capabilities": ["ticket.read"] if capabilities is None else capabilities,
            "containment": {"external_calls": external_calls, "persistent_writes": persistent_writes},
            "economics": {"monthly_budget_usd": budget},
        },
    }


def write_doc(path: Path, document: Any, fmt: str = "yaml") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        path.write_text(json.dumps(document, indent=2))
    else:
        path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def create_from_spec(home: Path, document: Mapping[str, Any], where: Path) -> dict[str, Any]:
    """Create an agent from a spec file (import mode); returns the CLI's JSON summary."""
    path = write_doc(where / f"{document['metadata']['id']}.yaml", document)
    return dict(ok("agent", "create", "--from-file", path, home=home))


def patched(document: Mapping[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``document`` with one field (``a.b.c``) replaced."""
    doc = copy.deepcopy(dict(document))
    node: Any = doc
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return doc


# --- workspaces and the store -----------------------------------------------------------------


def copy_ws(src: Path, dst: Path) -> Path:
    """A workspace is a directory: copy it to get an independent one for a mutating test."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def db_path(home: Path) -> Path:
    return home / "agov.db"


def sql(home: Path, statement: str, params: Iterable[Any] = ()) -> int:
    """Edit the store behind agov's back; returns the number of rows changed."""
    conn = sqlite3.connect(db_path(home))
    try:
        changed = conn.execute(statement, tuple(params)).rowcount
        conn.commit()
        return changed
    finally:
        conn.close()


def query(home: Path, statement: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db_path(home)}?mode=ro", uri=True)
    try:
        return [tuple(r) for r in conn.execute(statement, tuple(params)).fetchall()]
    finally:
        conn.close()


def tables(home: Path) -> list[str]:
    return [r[0] for r in query(home, "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]


@dataclass(frozen=True)
class Snapshot:
    """Every row of every table but ``audit_events``, and the audit rows apart."""

    rows: dict[str, list[tuple[Any, ...]]]
    audit: list[tuple[Any, ...]]


def snapshot(home: Path) -> Snapshot:
    rows = {
        name: sorted(query(home, f'SELECT * FROM "{name}"'), key=repr)
        for name in tables(home)
        if name != "audit_events"
    }
    audit = query(
        home,
        "SELECT seq, time, type, agent_id, actor, policy_hash, payload, prev_hash, hash"
        " FROM audit_events ORDER BY seq",
    )
    return Snapshot(rows, audit)


def new_audit(before: Snapshot, after: Snapshot) -> list[tuple[Any, ...]]:
    """The audit rows added since ``before``; the old ones must be untouched."""
    assert after.audit[: len(before.audit)] == before.audit, "existing audit rows changed"
    return after.audit[len(before.audit) :]


def assert_only_audit_changed(before: Snapshot, after: Snapshot, *types: str) -> list[tuple[Any, ...]]:
    """No table but ``audit_events`` changed, and the audit log grew by exactly ``types``."""
    for name in before.rows:
        assert after.rows.get(name) == before.rows[name], f"table {name} changed"
    assert set(after.rows) == set(before.rows)
    added = new_audit(before, after)
    assert [row[2] for row in added] == list(types), added
    return added


def assert_rejected_unchanged(before: Snapshot, after: Snapshot) -> None:
    """A rejected request: no table changed, and at most one ``REQUEST_REJECTED`` event."""
    for name in before.rows:
        assert after.rows.get(name) == before.rows[name], f"table {name} changed"
    added = new_audit(before, after)
    assert len(added) <= 1, added
    assert all(row[2] == "REQUEST_REJECTED" for row in added), added


def listing(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` with its mtime (ns), size and mode."""
    out: dict[str, tuple[int, int, int]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_mtime_ns, st.st_size, st.st_mode)
    return out


def parse_time(text: str) -> datetime:
    parsed = datetime.fromisoformat(text)
    assert parsed.tzinfo is not None, text
    return parsed.astimezone(UTC)


# --- processes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpaSpy:
    """An ``AGOV_OPA_BIN`` that records the pid of every opa it starts, then execs the real one."""

    script: Path
    log: Path

    def pids(self) -> list[int]:
        if not self.log.exists():
            return []
        return [int(line) for line in self.log.read_text().split()]

    def env(self) -> dict[str, str | None]:
        return {"AGOV_OPA_BIN": str(self.script)}


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    """Running (a zombie that nobody reaped does not count: it runs nothing)."""
    state = _state(pid)
    return state is not None and state != "Z"


def opa_processes(marker: str) -> list[int]:
    """Live ``opa`` server processes whose command line mentions ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0] or Path(argv[0].decode(errors="replace")).name != "opa":
            continue
        if b"run" in argv and any(marker.encode() in a for a in argv) and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def wait_gone(pids: Iterable[int], timeout: float = 5.0) -> list[int]:
    """Wait until none of ``pids`` runs; returns those still running at the deadline."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if alive(p)]
    return left
