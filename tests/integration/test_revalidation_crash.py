"""R11: kill -9 at random points during a policy reload's revalidation, then resume.

Setup (once): a workspace with ``AGENTS`` agents, each created and promoted through OPA one by
one (``engine.create_agent`` + ``engine.promote``: the real path, no rows written by hand), and
``limits.revalidation_chunk_size: 50``. Then ``data.json`` is edited (analysis temperature
<= 0.4) so that half of them fall. The four kinds of agent:

    i % 4 == 0   temperature 0.5, budget 200   VALID       -> INVALIDATED
    i % 4 == 1   temperature 0.5, budget 900   RESTRICTED  -> INVALIDATED
    i % 4 == 2   temperature 0.3, budget 200   VALID       -> VALID (new proof)
    i % 4 == 3   temperature 0.3, budget 900   RESTRICTED  -> RESTRICTED (new proof)

A clean run of the reload on a copy gives the expected end state. Each trial copies the edited
workspace, runs the reload in a child process (``_reload_child.py``: ``Engine.open(home)
.reload_policy(...)``, what ``agov policy reload`` does), SIGKILLs it at a random moment (fixed
seed; stratified: a quarter over the start-up and activation, the rest over the revalidation),
and resumes in this process the way an operator would after a crash: ``reload`` again (it
activates the policy if the kill came before activation), then ``revalidate`` if the active
policy has no finished run (it resumes the unfinished one from its cursor).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _reload_support import ACTOR, GOVERNED, KnownBug, connect, create_governed, edit_data, set_analysis_limit

from agov.config import Config, Limits
from agov.engine import Engine

pytestmark = pytest.mark.integration

AGENTS = 2000
CHUNK = 50
TRIALS = 20
SEED = 20_251_111
CHILD = Path(__file__).with_name("_reload_child.py")


@dataclass
class ChildRun:
    lines: list[tuple[float, str]] = field(default_factory=list)  # (seconds since spawn, line)
    returncode: int | None = None
    killed_at: float | None = None

    @property
    def chunks(self) -> int:
        return sum(1 for _, line in self.lines if line.startswith("chunk "))

    @property
    def opa_pid(self) -> int | None:
        for _, line in self.lines:
            if line.startswith("opa ") and line[4:].isdigit():
                return int(line[4:])
        return None

    @property
    def done(self) -> bool:
        return any(line.startswith("done") for _, line in self.lines)


@dataclass(frozen=True)
class Kill:
    """SIGKILL the child ``delay_s`` after it reports ``after_chunks`` committed chunks (0: after
    the spawn). Anchoring on a chunk keeps the kills spread over the revalidation, whatever the
    machine's load does to the start-up time."""

    after_chunks: int
    delay_s: float

    def describe(self) -> str:
        anchor = "spawn" if self.after_chunks == 0 else f"chunk {self.after_chunks}"
        return f"{self.delay_s * 1000:.0f} ms after {anchor}"


def _run_child(home: Path, kill: Kill | None) -> ChildRun:
    run = ChildRun()
    tmpdir = home.with_name(home.name + ".tmp")  # a killed child cannot clean its temp dirs
    tmpdir.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmpdir)}
    stderr_path = home.with_name(home.name + ".stderr")
    progress = threading.Condition()
    eof = False
    with open(stderr_path, "w") as stderr:
        spawned = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(home)], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
        )

        def read() -> None:
            nonlocal eof
            assert proc.stdout is not None
            for line in proc.stdout:  # the only reader of the pipe
                with progress:
                    run.lines.append((time.perf_counter() - spawned, line.strip()))
                    progress.notify_all()
            with progress:
                eof = True
                progress.notify_all()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            if kill is not None:
                with progress:
                    progress.wait_for(lambda: eof or run.chunks >= kill.after_chunks, timeout=120)
                try:
                    proc.wait(kill.delay_s)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    run.killed_at = time.perf_counter() - spawned
            proc.wait(120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(timeout=10)
    run.returncode = proc.returncode
    if run.killed_at is None:
        assert proc.returncode == 0, f"child failed: {stderr_path.read_text()[-3000:]}"
    return run


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _phase(run: ChildRun, interrupted: EndState, expected: EndState) -> str:
    """Where the kill landed, read from the store it left behind."""
    if run.killed_at is None:
        return "exited before the kill"
    if interrupted.policy_hash != expected.policy_hash:
        return "before activation"
    if not interrupted.runs or interrupted.runs[0]["total"] == 0:
        return "activated, no chunk committed"
    if interrupted.runs[0]["finished_at"] is None:
        return "mid-revalidation"
    return "after the run finished"


def _resume(home: Path) -> None:
    """What an operator does after the crash: reload again; revalidate if the run is unfinished."""
    with Engine.open(home) as engine:
        result = engine.reload_policy(actor=ACTOR, reason="R11 resume")
        if not result["changed"]:
            active = engine.active_policy().hash
            runs = engine.store.query(
                "SELECT finished_at FROM revalidation_runs WHERE policy_hash = ?", (active,)
            )
            if not runs or any(r["finished_at"] is None for r in runs):
                engine.revalidate()


@dataclass(frozen=True)
class EndState:
    policy_hash: str
    statuses: dict[str, str]
    runs: list[dict[str, Any]]  # revalidation_runs rows for policy_hash
    current_proofs: Counter[str]  # agent -> number of current proofs
    current_bound: dict[str, str]  # agent -> policy hash of its current proof
    proofs_for_hash: Counter[str]  # agent -> proofs ever issued under policy_hash
    invalidated_events: Counter[str]  # agent -> AGENT_INVALIDATED events under policy_hash
    restored_events: int
    reval_events: list[dict[str, Any]]  # POLICY_REVALIDATION payloads under policy_hash
    activations: int  # POLICY_HOTRELOAD events naming policy_hash
    integrity: str
    audit_ok: bool


def _end_state(home: Path) -> EndState:
    conn = connect(home / "agov.db")
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        (policy_hash,) = conn.execute("SELECT hash FROM policy_versions WHERE active = 1").fetchone()

        def count(sql: str, *params: Any) -> Counter[str]:
            return Counter({r[0]: r[1] for r in conn.execute(sql, params)})

        state = EndState(
            policy_hash=policy_hash,
            statuses={r["id"]: r["status"] for r in conn.execute("SELECT id, status FROM agents")},
            runs=[
                dict(r)
                for r in conn.execute("SELECT * FROM revalidation_runs WHERE policy_hash = ?", (policy_hash,))
            ],
            current_proofs=count(
                "SELECT agent_id, COUNT(*) FROM agent_proofs WHERE superseded_at IS NULL GROUP BY agent_id"
            ),
            current_bound={
                r[0]: r[1]
                for r in conn.execute(
                    "SELECT agent_id, policy_hash FROM agent_proofs WHERE superseded_at IS NULL"
                )
            },
            proofs_for_hash=count(
                "SELECT agent_id, COUNT(*) FROM agent_proofs WHERE policy_hash = ? GROUP BY agent_id",
                policy_hash,
            ),
            invalidated_events=count(
                "SELECT agent_id, COUNT(*) FROM audit_events WHERE type = 'AGENT_INVALIDATED' AND policy_hash = ?"
                " GROUP BY agent_id",
                policy_hash,
            ),
            restored_events=conn.execute(
                "SELECT COUNT(*) FROM audit_events WHERE type = 'AGENT_RESTORED'"
            ).fetchone()[0],
            reval_events=[
                json.loads(r[0])
                for r in conn.execute(
                    "SELECT payload FROM audit_events WHERE type = 'POLICY_REVALIDATION' AND policy_hash = ?",
                    (policy_hash,),
                )
            ],
            activations=conn.execute(
                "SELECT COUNT(*) FROM audit_events WHERE type = 'POLICY_HOTRELOAD' AND policy_hash = ?",
                (policy_hash,),
            ).fetchone()[0],
            integrity=integrity,
            audit_ok=False,
        )
    finally:
        conn.close()
    with Engine.open(home) as engine:  # no decision: OPA is not started
        audit_ok = engine.verify_audit().ok
    return dataclasses.replace(state, audit_ok=audit_ok)


def _compare(state: EndState, expected: EndState) -> tuple[list[str], list[str]]:
    """(lost, duplicated): every record a clean run has that this one lacks, or has twice."""
    lost: list[str] = []
    duplicated: list[str] = []
    if state.policy_hash != expected.policy_hash:
        lost.append(f"active policy {state.policy_hash[:12]}, want {expected.policy_hash[:12]}")
    for agent_id, want in expected.statuses.items():
        got = state.statuses.get(agent_id)
        if got != want:
            lost.append(f"{agent_id}: status {got}, want {want}")
        if want not in GOVERNED:
            continue
        n = state.current_proofs[agent_id]
        if n != 1:
            (lost if n == 0 else duplicated).append(f"{agent_id}: {n} current proofs")
        if state.current_bound.get(agent_id) != expected.current_bound[agent_id]:
            lost.append(f"{agent_id}: current proof bound to the wrong hash")
        for name, got_n, want_n in (
            (
                "proofs under the new hash",
                state.proofs_for_hash[agent_id],
                expected.proofs_for_hash[agent_id],
            ),
            (
                "AGENT_INVALIDATED events",
                state.invalidated_events[agent_id],
                expected.invalidated_events[agent_id],
            ),
        ):
            if got_n < want_n:
                lost.append(f"{agent_id}: {got_n} {name}, want {want_n}")
            elif got_n > want_n:
                duplicated.append(f"{agent_id}: {got_n} {name}, want {want_n}")
    if state.restored_events != expected.restored_events:
        duplicated.append(f"{state.restored_events} AGENT_RESTORED events, want {expected.restored_events}")
    if state.activations != 1:
        (lost if state.activations == 0 else duplicated).append(f"{state.activations} activations")
    counters = ("total", "valid", "restricted", "invalidated", "newly_invalidated", "restored")
    want_counts = {k: expected.runs[0][k] for k in counters}
    if len(state.runs) != 1 or state.runs[0]["finished_at"] is None:
        (lost if not state.runs else duplicated).append(
            f"{len(state.runs)} runs, finished: {[r['finished_at'] is not None for r in state.runs]}"
        )
    for run in state.runs:
        got_counts = {k: run[k] for k in counters}
        if got_counts != want_counts:
            (duplicated if run["total"] > want_counts["total"] else lost).append(f"run counters {got_counts}")
    if [{k: e[k] for k in counters} for e in state.reval_events] != [want_counts]:
        duplicated.append(f"POLICY_REVALIDATION events {state.reval_events}")
    return lost, duplicated


@pytest.fixture(scope="module")
def edited_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workspace before the reload: agents governed, data.json already edited."""
    home = tmp_path_factory.mktemp("r11") / "base"
    started = time.perf_counter()
    with Engine.init(home, Config(limits=Limits(revalidation_chunk_size=CHUNK)), actor=ACTOR) as engine:
        for i in range(AGENTS):
            create_governed(
                engine, f"agent-{i:05d}", temperature=0.5 if i % 4 < 2 else 0.3, budget=900 if i % 2 else 200
            )
    edit_data(home, set_analysis_limit(0.4))
    print(
        f"\nR11 setup: {AGENTS} agents created and promoted through OPA in {time.perf_counter() - started:.1f} s"
    )
    return home


@dataclass(frozen=True)
class CleanRun:
    home: Path
    run: ChildRun
    expected: EndState


@pytest.fixture(scope="module")
def clean_run(edited_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> CleanRun:
    """The reload run to the end, undisturbed, on a copy: the expected end state."""
    home = tmp_path_factory.mktemp("r11-clean") / "clean"
    shutil.copytree(edited_workspace, home)
    run = _run_child(home, kill=None)
    assert run.done and run.chunks == AGENTS // CHUNK
    expected = _end_state(home)
    assert Counter(expected.statuses.values()) == {
        "GOVERNED_INVALIDATED": AGENTS // 2,
        "GOVERNED_VALID": AGENTS // 4,
        "GOVERNED_RESTRICTED": AGENTS // 4,
    }
    assert expected.integrity == "ok" and expected.audit_ok
    assert len(expected.runs) == 1 and expected.runs[0]["total"] == AGENTS
    assert sum(expected.invalidated_events.values()) == AGENTS // 2
    assert _compare(expected, expected) == ([], [])
    return CleanRun(home, run, expected)


def _kill_plan(clean: ChildRun) -> list[Kill]:
    """Stratified random kill points (one per stratum, fixed seed): a quarter of the trials
    over the start (interpreter, policy build, OPA start, activation, first chunk), the rest
    over the chunks: after chunk k (uniform) plus a random part of one chunk's duration, so
    that every chunk, and the end of the run, can be hit at any point inside it."""
    rng = random.Random(SEED)
    chunk_times = [t for t, line in clean.lines if line.startswith("chunk ")]
    first_chunk = chunk_times[0]
    per_chunk = (chunk_times[-1] - chunk_times[0]) / (len(chunk_times) - 1)
    early = TRIALS // 4
    plan = [Kill(0, first_chunk * (i + rng.random()) / early) for i in range(early)]
    late = TRIALS - early
    for i in range(late):
        position = len(chunk_times) * (i + rng.random()) / late  # in chunks, from the first one
        plan.append(Kill(1 + int(position), per_chunk * (position % 1)))
    return plan


def test_r11_kill_9_during_revalidation_then_resume(
    edited_workspace: Path, clean_run: CleanRun, tmp_path: Path
) -> None:
    began = time.perf_counter()
    expected = clean_run.expected
    lost_total = duplicated_total = integrity_ok = 0
    phases: Counter[str] = Counter()
    chunks_at_kill: list[int] = []
    failures: list[str] = []
    for trial, kill in enumerate(_kill_plan(clean_run.run)):
        home = tmp_path / f"trial-{trial:02d}"
        shutil.copytree(edited_workspace, home)
        run = _run_child(home, kill=kill)
        chunks_at_kill.append(run.chunks)
        if run.opa_pid is not None:  # its OPA went down with it (PR_SET_PDEATHSIG)
            deadline = time.monotonic() + 5
            while _alive(run.opa_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(run.opa_pid), f"trial {trial}: OPA {run.opa_pid} outlived its parent"
        interrupted = _end_state(home)
        assert interrupted.integrity == "ok", f"trial {trial}: {interrupted.integrity}"
        phases[_phase(run, interrupted, expected)] += 1
        _resume(home)
        state = _end_state(home)
        integrity_ok += state.integrity == "ok"
        lost, duplicated = _compare(state, expected)
        if not state.audit_ok:
            lost.append("audit chain does not verify")
        lost_total += len(lost)
        duplicated_total += len(duplicated)
        if lost or duplicated:
            failures.append(
                f"trial {trial} (kill {kill.describe()}, {run.chunks} chunks): {(lost + duplicated)[:5]}"
            )
        shutil.rmtree(home)

    print(
        f"\nR11 kill -9 during revalidation: {TRIALS} trials, lost={lost_total}, duplicated={duplicated_total}, "
        f"integrity ok {integrity_ok}/{TRIALS}"
    )
    print(
        f"    {AGENTS} agents, chunk {CHUNK}; clean run {clean_run.run.lines[-1][0]:.2f} s; "
        f"kills: {dict(phases)}; chunks committed at kill: {sorted(chunks_at_kill)}; "
        f"trials took {time.perf_counter() - began:.0f} s"
    )
    assert not failures, failures
    assert integrity_ok == TRIALS
    # the kills really landed inside the revalidation, not only around it
    assert phases["mid-revalidation"] >= TRIALS // 2, phases


def test_r11_checks_see_a_lost_and_a_duplicated_record(clean_run: CleanRun, tmp_path: Path) -> None:
    """The comparison above can fail: damage a clean end state both ways and it notices."""
    home = tmp_path / "damaged"
    shutil.copytree(clean_run.home, home)
    expected = clean_run.expected
    conn = sqlite3.connect(home / "agov.db")
    with conn:
        victim = next(a for a, s in sorted(expected.statuses.items()) if s == "GOVERNED_INVALIDATED")
        conn.execute("UPDATE agents SET status = 'GOVERNED_VALID' WHERE id = ?", (victim,))
        conn.execute(
            "UPDATE revalidation_runs SET total = total + 50 WHERE policy_hash = ?", (expected.policy_hash,)
        )
        twice = next(a for a, s in sorted(expected.statuses.items()) if s == "GOVERNED_VALID")
        conn.execute(
            "INSERT INTO agent_proofs (agent_id, version, policy_hash, spec_hash, envelope, keyid, governance_status,"
            " issued_at, expires_at, superseded_at) SELECT agent_id, version, policy_hash, spec_hash, envelope, keyid,"
            " governance_status, issued_at, expires_at, issued_at FROM agent_proofs"
            " WHERE agent_id = ? AND superseded_at IS NULL",
            (twice,),
        )
    conn.close()
    lost, duplicated = _compare(_end_state(home), expected)
    assert any(victim in item for item in lost), lost
    assert any("run counters" in item for item in duplicated), duplicated
    assert any(twice in item and "proofs under the new hash" in item for item in duplicated), duplicated


def test_reload_after_a_crash_finishes_the_interrupted_revalidation(
    edited_workspace: Path, clean_run: CleanRun, tmp_path: Path
) -> None:
    home = tmp_path / "crashed"
    shutil.copytree(edited_workspace, home)
    run = _run_child(home, kill=Kill(after_chunks=5, delay_s=0.0))
    interrupted = _end_state(home)
    # preconditions (a plain AssertionError here is a real failure, not the known bug)
    assert run.killed_at is not None
    assert interrupted.policy_hash == clean_run.expected.policy_hash
    assert interrupted.runs and interrupted.runs[0]["finished_at"] is None

    with Engine.open(home) as engine:
        result = engine.reload_policy(actor=ACTOR, reason="restarted after a crash")

    lost, duplicated = _compare(_end_state(home), clean_run.expected)
    if lost or duplicated:
        raise KnownBug(
            f"reload returned changed={result['changed']}; {len(lost)} records missing: {lost[:3]}"
        )
