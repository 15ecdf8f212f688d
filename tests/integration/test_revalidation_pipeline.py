"""Revalidation keeps two chunk queries in flight to OPA while it signs and commits a third.

Chunks must still be committed in cursor order, whatever order OPA answers in, and a query that
fails must stop the run at the last committed chunk, so that the next call resumes there. A
wrapper around the real managed sidecar delays the first chunk query (so the second answers
first) and fails the third; OPA itself judges every chunk.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from _reload_support import (
    ACTOR,
    create_governed,
    current_proofs,
    edit_data,
    set_analysis_limit,
    snapshot,
    statuses,
)

from agov import revalidation
from agov.config import Config, Limits
from agov.engine import Engine
from agov.errors import EngineUnavailableError
from agov.opa.evaluator import EncodedInput, Evaluation

CHUNK = 2
# ids sort in this order; temperatures above the new limit (0.35) fall
TEMPERATURES = {f"pipe-{i}": t for i, t in enumerate((0.1, 0.5, 0.2, 0.3, 0.6, 0.1, 0.4))}
NEW_LIMIT = 0.35
FALLING = {agent_id for agent_id, t in TEMPERATURES.items() if t > NEW_LIMIT}


class ChunkFaults:
    """Wraps ``evaluate`` of the real sidecar. Chunks are numbered from 1 in cursor order (by
    their first agent); the chunks in ``slow`` are answered after ``delay_s``, chunk ``failing``
    raises."""

    def __init__(
        self,
        inner: Callable[..., Evaluation],
        *,
        slow: set[int],
        delay_s: float = 0.5,
        failing: int | None,
    ) -> None:
        self.inner = inner
        self.slow = slow
        self.delay_s = delay_s
        self.failing = failing
        self.in_flight = 0
        self.answered: list[int] = []
        self.most_in_flight = 0
        self.deadlines: set[float | None] = set()
        self.lock = threading.Lock()

    def evaluate(
        self,
        path: str,
        input: Mapping[str, Any] | EncodedInput,
        *,
        expected_revision: str | None = None,
        timeout_s: float | None = None,
    ) -> Evaluation:
        if path != "agov/revalidation/results":
            return self.inner(path, input, expected_revision=expected_revision, timeout_s=timeout_s)
        assert isinstance(input, EncodedInput)
        first = json.loads(input.json)["agents"][0]["id"]
        number = sorted(TEMPERATURES).index(first) // CHUNK + 1
        with self.lock:
            self.deadlines.add(timeout_s)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if number in self.slow:
                time.sleep(self.delay_s)
            if number == self.failing:
                raise EngineUnavailableError(f"injected: chunk {number} query failed")
            evaluation = self.inner(path, input, expected_revision=expected_revision, timeout_s=timeout_s)
        finally:
            with self.lock:
                self.in_flight -= 1
        with self.lock:
            self.answered.append(number)
        return evaluation


@pytest.fixture
def engine(tmp_path: Path, opa_bin: Path) -> Iterator[Engine]:
    with Engine.init(
        tmp_path / "ws", Config(limits=Limits(revalidation_chunk_size=CHUNK)), actor=ACTOR
    ) as eng:
        for agent_id, temperature in TEMPERATURES.items():
            create_governed(eng, agent_id, temperature=temperature)
        yield eng


def _cursor(engine: Engine) -> tuple[str, Any]:
    row = engine.store.query_one("SELECT cursor, finished_at FROM revalidation_runs ORDER BY id DESC")
    assert row is not None
    return str(row["cursor"]), row["finished_at"]


def _bound_to(engine: Engine, policy_hash: str) -> set[str]:
    return {
        agent_id
        for agent_id, proofs in current_proofs(engine.workspace.home).items()
        if [p["policy_hash"] for p in proofs] == [policy_hash]
    }


def _proof_rows(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    return {i: [tuple(p) for p in proofs] for i, proofs in current_proofs(engine.workspace.home).items()}


def test_a_failed_chunk_query_stops_at_the_last_committed_chunk_and_the_rerun_resumes(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = engine.workspace.home
    ids = sorted(TEMPERATURES)
    old_hash = engine.active_policy().hash
    sidecar = engine.evaluator()
    real_evaluate = sidecar.evaluate
    faults = ChunkFaults(real_evaluate, slow={1}, failing=3)
    monkeypatch.setattr(sidecar, "evaluate", faults.evaluate)
    proofs_before = _proof_rows(engine)
    edit_data(home, set_analysis_limit(NEW_LIMIT))

    with pytest.raises(EngineUnavailableError, match="injected"):
        engine.reload_policy(actor=ACTOR, reason="stricter analysis temperature")

    new_hash = engine.active_policy().hash
    assert new_hash != old_hash
    # precondition: the second query answered before the first, so order was really tested
    assert faults.answered[:2] == [2, 1], (
        f"chunk queries answered in order {faults.answered}: none overlapped"
    )
    # chunk queries run under the chunk deadline, not the one for a single decision
    assert faults.deadlines == {engine.config.limits.revalidation_timeout_s}
    committed, rest = ids[: 2 * CHUNK], ids[2 * CHUNK :]
    assert _cursor(engine) == (committed[-1], None)
    after_failure = statuses(home)
    assert {i for i in committed if after_failure[i] == "GOVERNED_INVALIDATED"} == FALLING & set(committed)
    assert _bound_to(engine, new_hash) == set(committed) - FALLING
    # nothing past the last committed chunk changed: still valid, the same proof rows
    assert {i: after_failure[i] for i in rest} == dict.fromkeys(rest, "GOVERNED_VALID")
    proofs_after = _proof_rows(engine)
    assert {i: proofs_after[i] for i in rest} == {i: proofs_before[i] for i in rest}

    monkeypatch.setattr(sidecar, "evaluate", ChunkFaults(real_evaluate, slow=set(), failing=None).evaluate)
    report = engine.resume_revalidation()

    assert report is not None and report.resumed
    assert (report.total, report.invalidated, report.newly_invalidated) == (7, len(FALLING), len(FALLING))
    assert _cursor(engine)[0] == ids[-1] and _cursor(engine)[1] is not None
    final = statuses(home)
    assert {i for i, s in final.items() if s == "GOVERNED_INVALIDATED"} == FALLING
    assert _bound_to(engine, new_hash) == set(ids) - FALLING
    invalidations = engine.store.query(
        "SELECT agent_id FROM audit_events WHERE type = 'AGENT_INVALIDATED' ORDER BY agent_id"
    )
    assert [r["agent_id"] for r in invalidations] == sorted(FALLING)


def test_two_chunk_queries_are_in_flight_while_a_chunk_is_committed(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    sidecar = engine.evaluator()
    # chunk 1 answers at once; the others take long enough to be seen running
    faults = ChunkFaults(sidecar.evaluate, slow={2, 3, 4}, delay_s=0.5, failing=None)
    monkeypatch.setattr(sidecar, "evaluate", faults.evaluate)
    seen_at_apply: list[int] = []
    apply = revalidation._apply

    def counting_apply(*args: Any) -> None:
        # the queries submitted for this commit need a moment to start in their threads
        deadline, seen = time.monotonic() + 0.3, 0
        while time.monotonic() < deadline and seen < 2:
            seen = max(seen, faults.in_flight)
            time.sleep(0.005)
        seen_at_apply.append(seen)
        apply(*args)

    monkeypatch.setattr(revalidation, "_apply", counting_apply)

    report = engine.revalidate()

    assert report.total == len(TEMPERATURES)
    # chunks 2 and 3 are judged while chunk 1 is signed and committed
    assert seen_at_apply[0] == 2, seen_at_apply
    assert faults.most_in_flight == 2


def _only_the_run_opened(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Nothing changed but the run's own row and the REVALIDATION_STARTED event that opened it."""
    others = ("revalidation_runs", "audit_events", "__anchor__")
    assert {t: r for t, r in after.items() if t not in others} == {
        t: r for t, r in before.items() if t not in others
    }
    old, new = before["audit_events"], after["audit_events"]
    assert new[: len(old)] == old
    assert [row[2] for row in new[len(old) :]] == ["REVALIDATION_STARTED"]


def test_a_failed_chunk_query_does_not_wait_for_the_other_one_in_flight(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(engine.workspace.home)
    sidecar = engine.evaluator()
    faults = ChunkFaults(sidecar.evaluate, slow={2}, delay_s=3.0, failing=1)
    monkeypatch.setattr(sidecar, "evaluate", faults.evaluate)
    started = time.monotonic()

    with pytest.raises(EngineUnavailableError, match="injected: chunk 1"):
        engine.revalidate()

    assert time.monotonic() - started < 1.5
    # only the run's own row (and the event that opened it) is new; no agent or proof changed
    _only_the_run_opened(before, snapshot(engine.workspace.home))


def test_an_error_while_a_chunk_is_committed_does_not_wait_for_the_queries_in_flight(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(engine.workspace.home)
    sidecar = engine.evaluator()
    monkeypatch.setattr(
        sidecar, "evaluate", ChunkFaults(sidecar.evaluate, slow={2}, delay_s=3.0, failing=None).evaluate
    )

    def broken_apply(*args: Any) -> None:
        raise RuntimeError("injected: the commit failed")

    monkeypatch.setattr(revalidation, "_apply", broken_apply)
    started = time.monotonic()

    with pytest.raises(RuntimeError, match="injected"):
        engine.revalidate()

    assert time.monotonic() - started < 1.5
    # only the run's own row (and the event that opened it) is new; no agent or proof changed
    _only_the_run_opened(before, snapshot(engine.workspace.home))


# The child judges chunk 1 (which fails at once) and chunk 2 (whose OPA answers only after 5 s),
# through revalidation's own pipeline; only OPA's answers and the chunk reads are faked.
_EXIT_CHILD = """
import sys, time
from datetime import datetime, timezone
from agov import revalidation
from agov.errors import EngineUnavailableError

class Row:
    def __init__(self, agent_id):
        self.agent_id = agent_id

chunks = {"": [Row("a")], "a": [Row("b")], "b": []}
revalidation._chunk = lambda store, after, size: chunks[after]
revalidation._governed_after = lambda store, after: 2

def verdicts(evaluator, rows, *rest):
    if rows[0].agent_id == "a":
        raise EngineUnavailableError("chunk 1 failed")
    time.sleep(5)
    return {}, None, None

revalidation._verdicts = verdicts
pipeline = revalidation._judged_chunks(None, None, "", 1, b"{}", "h", lambda: datetime.now(timezone.utc), 5.0)
try:
    for _ in pipeline:
        pass
except EngineUnavailableError:
    sys.exit(3)
"""


def test_a_failed_run_does_not_hold_the_process_at_exit() -> None:
    """A CLI call that failed must exit now, not when the query still in flight gives up."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _EXIT_CHILD], capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - started
    assert done.returncode == 3, done.stderr
    assert elapsed < 3.0, f"the process exited after {elapsed:.1f} s"


def test_the_last_chunks_of_a_run_are_smaller_and_every_agent_is_judged_once(
    tmp_path: Path, opa_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the floor lowered to 1 so that 12 agents show the tail: chunks of at most 4, until fewer
    # than 4 chunks of 4 remain, then a quarter of the rest
    monkeypatch.setattr(revalidation, "_TAIL_CHUNK_MIN", 1)
    temperatures = {f"tail-{i:02d}": (0.5 if i % 3 == 0 else 0.1) for i in range(12)}
    falling = {agent_id for agent_id, t in temperatures.items() if t > NEW_LIMIT}
    home = tmp_path / "ws"
    with Engine.init(home, Config(limits=Limits(revalidation_chunk_size=4)), actor=ACTOR) as eng:
        for agent_id, temperature in temperatures.items():
            create_governed(eng, agent_id, temperature=temperature)
        old_hash = eng.active_policy().hash
        sidecar = eng.evaluator()
        sent: list[list[str]] = []
        real_evaluate = sidecar.evaluate

        def recording(path: str, input: Any, **kwargs: Any) -> Evaluation:
            if path == revalidation.REVALIDATION_PATH:
                sent.append([a["id"] for a in json.loads(input.json)["agents"]])
            return real_evaluate(path, input, **kwargs)

        monkeypatch.setattr(sidecar, "evaluate", recording)
        edit_data(home, set_analysis_limit(NEW_LIMIT))
        committed: list[int] = []
        eng.reload_policy(actor=ACTOR, reason="stricter analysis temperature", progress=committed.append)
        new_hash = eng.active_policy().hash

        assert new_hash != old_hash
        assert committed == [3, 2, 1, 1, 1, 1, 1, 1, 1]
        # each agent was sent once, in cursor order
        assert [i for chunk in sent for i in chunk] == sorted(temperatures)
        final = statuses(home)
        assert {i for i, s in final.items() if s == "GOVERNED_INVALIDATED"} == falling
        assert _bound_to(eng, new_hash) == set(temperatures) - falling


@pytest.mark.parametrize(
    ("size", "remaining", "expected"),
    [
        (1000, 100_000, 1000),  # far from the end: the configured size
        (1000, 4000, 1000),
        (1000, 3999, 999),  # fewer than 4 chunks left: a quarter of the rest
        (1000, 1000, 250),
        (1000, 255, 64),  # never below the floor
        (1000, 10, 64),  # the chunk takes what is left
        (1000, -5, 64),  # more agents than counted at the start (promoted during the run)
        (50, 120, 50),  # sizes up to the floor are kept as configured
        (1, 7, 1),
    ],
)
def test_chunk_size_shrinks_only_at_the_tail(size: int, remaining: int, expected: int) -> None:
    assert revalidation._chunk_size(size, remaining) == expected
