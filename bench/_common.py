"""Shared helpers for the agov benchmarks (not a test helper: nothing here asserts a timing).

Every figure is measured against a baseline *in the same run*, interleaved call by call, because
the machine is shared and noisy: absolute times drift between runs, ratios taken side by side do
not (much).
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import os
import platform
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agov.store.sqlite import Store

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
ACTOR = "bench"

perf_ns = time.perf_counter_ns


# --- arguments and results -----------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run, numbers not meaningful")
    p.add_argument("--json", type=Path, help="write the result document to this file")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also print a pyinstrument profile of the subject (its call tree)",
    )
    return p


def main_for(
    run: Callable[[bool, bool], dict[str, Any]], doc: str | None, argv: list[str] | None = None
) -> int:
    """The command line every figure script shares: parse, run, add the machine, emit."""
    args = parser(doc or "").parse_args(argv)
    result = run(args.quick, args.profile)
    result["machine"] = machine()
    emit(result, args.json)
    return 0


def emit(result: dict[str, Any], json_path: Path | None) -> None:
    """Print a readable summary to stderr and write the JSON document (or print it to stdout)."""
    print(render_text(result), file=sys.stderr)
    text = json.dumps(result, indent=2, sort_keys=False, default=str)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
    else:
        print(text)


def render_text(result: dict[str, Any]) -> str:
    lines = [f"== {result['figure']}: {result['title']}" + (" (quick)" if result.get("quick") else "")]
    for m in result.get("metrics", []):
        extra = f" n={m['n']}" if "n" in m else ""
        lines.append(
            f"  {m['name']:<58} p50 {fmt(m.get('p50'))} p99 {fmt(m.get('p99'))} {m.get('unit', '')}{extra}"
        )
    for r in result.get("ratios", []):
        lines.append(f"  ratio {r['name']:<52} {times(r)}  goal {r.get('goal', '-')}  {met(r)}")
    for g in result.get("goals", []):
        lines.append(f"  goal  {g['name']:<52} {fmt(g['value'])} {g.get('unit', '')}  {met(g)}")
    for b in result.get("breakdown", []):
        if "per_agent_us" in b:
            lines.append(f"    {b.get('run', '')[:30]:<30} {b['name']:<78} {fmt(b['per_agent_us'])} µs/agent")
        else:
            second = ("max", b["max"]) if "max" in b and "mean" not in b else ("mean", b.get("mean"))
            lines.append(
                f"    {b['name']:<60} p50 {fmt(b.get('p50'))} {second[0]} {fmt(second[1])} {b.get('unit', 'µs')}"
            )
    mem = result.get("memory")
    if mem:
        lines.append("  memory: " + ", ".join(f"{k} {fmt(v)}" for k, v in mem.items()))
    if result.get("bound"):
        lines.append(f"  bound: {result['bound']}")
    return "\n".join(lines)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def times(item: dict[str, Any]) -> str:
    """A ratio as ``1.23x``, with more decimals while fewer would print its goal's own value."""
    value, target = item["value"], item.get("target")
    for decimals in range(2, 18):  # 17 significant digits tell any two floats apart
        text = f"{value:.{decimals}f}"
        if target is None or value == target or text != f"{target:.{decimals}f}":
            break
    return text + "x"


def met(item: dict[str, Any]) -> str:
    if item.get("met") is None:
        return "(no goal)"
    return "MET" if item["met"] else "MISSED"


def goal(name: str, value: float, op: str, target: float, unit: str = "", note: str = "") -> dict[str, Any]:
    ok = value <= target if op == "<=" else value >= target
    return {
        "name": name,
        "value": value,
        "op": op,
        "target": target,
        "unit": unit,
        "met": ok,
        "goal": f"{op} {target:g}",
        "note": note,
    }


def ratio(name: str, value: float, op: str | None = None, target: float | None = None) -> dict[str, Any]:
    if op is None or target is None:
        return {"name": name, "value": value, "goal": "-", "met": None}
    ok = value <= target if op == "<=" else value >= target
    return {"name": name, "value": value, "op": op, "target": target, "goal": f"{op} {target:g}x", "met": ok}


# --- statistics ----------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in [0, 100])."""
    if not sorted_values:
        raise ValueError("no samples")
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def summarize(name: str, samples_ns: list[int], unit: str = "µs", scale: float = 1e-3) -> dict[str, Any]:
    """p50 / p90 / p99 / max / mean of nanosecond samples, in ``unit`` (µs by default)."""
    values = sorted(s * scale for s in samples_ns)
    return {
        "name": name,
        "unit": unit,
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": values[-1],
        "mean": sum(values) / len(values),
    }


def one(store: Store, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Row:
    """The one row a setup query must find."""
    row = store.query_one(sql, params)
    if row is None:
        raise RuntimeError(f"bench setup: no row for {sql}")
    return row


def interleave(
    subjects: dict[str, Callable[[], Any]], n: int, warmup: int, *, seed: int = 20261122
) -> dict[str, list[int]]:
    """Time every subject once per round, ``n`` rounds after ``warmup`` untimed rounds.

    Each round runs the subjects in a new random order (seeded, so a rerun repeats it), so each
    subject follows each other one about equally often. A fixed rotation does not do that: in a
    cyclic order a subject nearly always follows the same neighbour, and so inherits that
    neighbour's after-effects (a connection it closed, garbage it left for the collector).
    """
    names = list(subjects)
    fns = [subjects[k] for k in names]
    for _ in range(warmup):
        for fn in fns:
            fn()
    out: list[list[int]] = [[] for _ in names]
    rng = random.Random(seed)
    round_order = list(range(len(names)))
    for _ in range(n):
        rng.shuffle(round_order)
        for j in round_order:
            fn = fns[j]
            t0 = perf_ns()
            fn()
            out[j].append(perf_ns() - t0)
    return dict(zip(names, out, strict=True))


# --- profiling (only with --profile; the figures never run under a profiler) ----------------


@contextmanager
def profiled(label: str, operations: int = 1, lines: int = 60) -> Iterator[None]:
    """Sample the block with pyinstrument and print its call tree (share of the time per call
    path) to stderr. A sampling profiler's overhead does not grow with the number of Python
    calls, so fine-grained code is not inflated the way cProfile inflates it."""
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0002)
    profiler.start()
    try:
        yield
    finally:
        session = profiler.stop()
        per_op = session.duration / operations * 1e6
        print(
            f"\n-- pyinstrument {label}: {operations} operations, {per_op:.1f} µs each (under the profiler)",
            file=sys.stderr,
        )
        text = profiler.output_text(unicode=True, time="percent_of_total")
        print("\n".join(text.splitlines()[:lines]), file=sys.stderr)


def profile(fn: Callable[[], Any], calls: int, label: str = "") -> None:
    """Run ``fn`` ``calls`` times under :func:`profiled`."""
    with profiled(label, calls):
        for _ in range(calls):
            fn()


# --- machine ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": nproc,
        "cpu": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "opa": opa_version(),
        "kernel": platform.release(),
        "loadavg": loadavg(),
        "engine": engine_revision(),
    }


def engine_revision() -> str:
    """The commit the engine was measured at, and the engine or policy files changed since."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "engine", "policies"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    return head + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def opa_bin() -> Path:
    from agov.opa.binary import find_opa

    return find_opa()


def opa_version() -> str:
    try:
        out = subprocess.run([str(opa_bin()), "version"], capture_output=True, text=True, timeout=30).stdout
    except Exception as exc:  # the version is only informative
        return f"unknown ({type(exc).__name__})"
    for line in out.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


# --- workspaces ------------------------------------------------------------------------------


@contextmanager
def tempdir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def set_data_json(policies: Path, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Edit the workspace's ``agov/config/data.json`` in place (as an editor would)."""
    path = policies / "agov" / "config" / "data.json"
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data, indent=2) + "\n")


def research_agent(agent_id: str, temperature: float) -> dict[str, Any]:
    """The shipped research-analyst template (role class ``analysis``) with an id and a temperature."""
    from agov.registry import from_template

    doc = from_template("research-analyst", agent_id=agent_id, display_name=f"Research {agent_id}")
    doc["spec"]["anatomy"]["reasoning"]["temperature"] = temperature
    return doc


def copy_workspace(src: Path, dst: Path) -> Path:
    """Copy a closed workspace (files, keys with their modes, the SQLite database)."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def sqlite_checkpoint(db: Path) -> None:
    """Fold the WAL into the main file, so a copied workspace is self-contained."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def collect() -> None:
    """A full collection before a timed section, so one subject does not pay for another's garbage."""
    gc.collect()


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a Unix socket: the transport agov's client uses with the sidecar."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def http_connection(sidecar: Any, timeout: float) -> http.client.HTTPConnection:
    """A plain keep-alive ``http.client`` connection to a managed sidecar, over its Unix socket,
    the way agov reaches it."""
    return UnixHTTPConnection(str(sidecar.connection.unix_socket), timeout=timeout)
