"""Run every benchmark, collect their JSON results, and write docs/benchmarks.md (``make bench``).

    python bench/run_all.py              # the full run (P3 at 100k agents takes minutes)
    python bench/run_all.py --no-100k    # skip the 100,000-agent revalidation
    python bench/run_all.py --quick      # smoke run, small sizes; writes to a temp file
                                         # unless --out is given (numbers not meaningful)

Each figure runs in its own process (``bench/p*.py``), one after the other, never two at once.
Exit status: 0 when every figure ran (whether or not its goals are met), 1 if one failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as c

FIGURES = [
    ("P1", "p1_decision_latency.py"),
    ("P3", "p3_revalidation.py"),
    ("P4", "p4_hot_reload.py"),
    ("P5", "p5_proofs.py"),
]
DOC = c.REPO / "docs" / "benchmarks.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    p.add_argument("--no-100k", action="store_true", help="skip P3's 100,000-agent run")
    p.add_argument("--out", type=Path, help=f"markdown output (default {DOC.relative_to(c.REPO)})")
    p.add_argument("--results", type=Path, help="also keep the JSON results in this directory")
    p.add_argument("--only", help="comma-separated figures to run, e.g. P1,P5")
    p.add_argument(
        "--render",
        type=Path,
        metavar="DIR",
        help="run nothing: rewrite the markdown from the JSON results kept in DIR by --results",
    )
    args = p.parse_args(argv)
    if args.render is not None:
        return render_saved(args.render, args.out or DOC)
    out = args.out
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="agov-bench-")) / "benchmarks.md" if args.quick else DOC
    only = {f.strip().upper() for f in args.only.split(",")} if args.only else None

    machine = c.machine()
    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="agov-bench-results-") as tmp:
        for figure, script in FIGURES:
            if only and figure not in only:
                continue
            target = (args.results or Path(tmp)) / f"{figure.lower()}.json"
            cmd = [sys.executable, str(c.BENCH_DIR / script), "--json", str(target)]
            if args.quick:
                cmd.append("--quick")
            if figure == "P3" and args.no_100k:
                cmd.append("--no-100k")
            print(f"run_all: {figure}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, timeout=7200, check=False)
            took = time.perf_counter() - t0
            if proc.returncode != 0 or not target.exists():
                failures[figure] = f"exit {proc.returncode}"
                print(f"run_all: {figure} FAILED ({failures[figure]})", file=sys.stderr)
                continue
            results[figure] = json.loads(target.read_text())
            results[figure]["wall_seconds"] = took
            target.write_text(json.dumps(results[figure], indent=2, default=str) + "\n")
    total = time.perf_counter() - started
    machine["loadavg_end"] = c.loadavg()
    if args.results is not None:
        run = {"machine": machine, "total_s": total, "quick": args.quick, "failures": failures}
        (args.results / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(machine, results, failures, quick=args.quick, total_s=total))
    print(f"run_all: wrote {out} ({total:.0f} s)", file=sys.stderr)
    return 1 if failures else 0


def render_saved(directory: Path, out: Path) -> int:
    """Rewrite the markdown from kept results, recomputing each figure's sentence with its script."""
    run = json.loads((directory / "run.json").read_text())
    results: dict[str, dict[str, Any]] = {}
    for figure, script in FIGURES:
        path = directory / f"{figure.lower()}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        module = importlib.import_module(script.removesuffix(".py"))
        result["bound"] = module.bound(result)
        results[figure] = result
    out.write_text(
        render(run["machine"], results, run["failures"], quick=run["quick"], total_s=run["total_s"])
    )
    print(f"run_all: wrote {out} from {directory}", file=sys.stderr)
    return 0


# --- markdown --------------------------------------------------------------------------------


def render(
    machine: dict[str, Any],
    results: dict[str, dict[str, Any]],
    failures: dict[str, str],
    *,
    quick: bool,
    total_s: float,
) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`bench/run_all.py`); do not edit by hand, rerun it. "
        + ("**Quick smoke run: small sizes, numbers not meaningful.**" if quick else ""),
        "",
        "How to read these numbers: the machine is shared and noisy, so every figure is measured "
        "against a baseline *in the same run*, interleaved call by call (or trial by trial), and the "
        "ratios are what to compare between runs; absolute times drift with the load. Benchmarks, "
        "never timed tests: nothing here fails a build.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| date | {machine['date']} |",
        f"| cores (nproc) | {machine['nproc']} |",
        f"| CPU | {machine['cpu']} |",
        f"| Python | {machine['implementation']} {machine['python']} |",
        f"| OPA | {machine['opa']} |",
        f"| engine measured | {machine.get('engine', '?')} |",
        f"| kernel | {machine['kernel']} |",
        f"| load average (1, 5, 15 min) at start / at end | {machine['loadavg']} / {machine.get('loadavg_end', '?')} |",
        f"| wall time of the run | {total_s / 60:.1f} min |",
        "",
        "## Goals",
        "",
        "| figure | goal | measured | met |",
        "|---|---|---|---|",
    ]
    for figure, _script in FIGURES:
        r = results.get(figure)
        if r is None:
            if figure in failures:
                lines.append(f"| {figure} | (did not run: {failures[figure]}) | | |")
            continue
        for g in r.get("goals", []):
            lines.append(f"| {figure} | {g['name']} | {_v(g['value'], g.get('unit', ''))} | {_met(g)} |")
        for x in r.get("ratios", []):
            if x.get("met") is not None:
                lines.append(f"| {figure} | {x['name']} {x['goal']} | {c.times(x)} | {_met(x)} |")
    for figure, _script in FIGURES:
        r = results.get(figure)
        if r is not None:
            lines += ["", *_figure(r)]
    lines.append("")
    return "\n".join(lines)


def _figure(r: dict[str, Any]) -> list[str]:
    lines = [f"## {r['figure']}: {r['title']}", ""]
    if r.get("bound"):
        lines += [f"**What bounds it.** {r['bound']}", ""]
    lines += ["| measure | n | median (p50) | p99 | unit |", "|---|---|---|---|---|"]
    for m in r.get("metrics", []):
        few = m.get("n", 0) < 100  # with a few trials the p99 column is their maximum
        p99_text = f"{c.fmt(m.get('p99'))}" + (" (max)" if few else "")
        lines.append(
            f"| {m['name']} | {m.get('n', '')} | {c.fmt(m.get('p50'))} | {p99_text} | {m.get('unit', '')} |"
        )
    if r.get("ratios"):
        lines += ["", "| ratio (same run) | value | goal | met |", "|---|---|---|---|"]
        for x in r["ratios"]:
            lines.append(f"| {x['name']} | {c.times(x)} | {x.get('goal', '-')} | {_met(x)} |")
    mem = r.get("memory")
    if mem:
        lines += [
            "",
            f"**Peak memory of the revalidation at {mem['agents']:,} agents** (each trial is its own process):",
            "",
            "| | MB |",
            "|---|---|",
            f"| tracemalloc peak (Python heap, during `Engine.revalidate`) | {mem['tracemalloc_peak_mb']:.1f} |",
        ]
        if "ru_maxrss_mb_untraced" in mem:
            lines += [
                f"| ru_maxrss of the process after the run (untraced trial) | {mem['ru_maxrss_mb_untraced']:.1f} |",
                f"| ru_maxrss before the run (imports, engine, store open) | "
                f"{mem['ru_maxrss_before_mb_untraced']:.1f} |",
                f"| OPA sidecar VmHWM (separate process) | {mem['opa_vm_hwm_mb_untraced']:.1f} |",
            ]
        lines.append(f"| ru_maxrss of the tracemalloc trial | {mem['ru_maxrss_mb']:.1f} |")
        by_size = _rss_by_size(r.get("trials", {}))
        if len(by_size) > 1:
            growth = by_size[-1][1] / by_size[0][1]
            lines += [
                "",
                "ru_maxrss after `Engine.revalidate` by number of agents (untraced runs): "
                + ", ".join(f"{n:,}: {mb:.0f} MB" for n, mb in by_size)
                + (
                    f" — {growth:.1f}x from the smallest to the largest run: the process keeps data that "
                    "grows with the number of agents, although the work is chunked."
                    if growth > 2
                    else " — flat in the number of agents, as chunking intends."
                ),
            ]
    if r.get("breakdown"):
        lines += ["", "Breakdown (each stage timed on its own, in the same run):", ""]
        if any("per_agent_us" in b for b in r["breakdown"]):
            lines += ["| run | stage | µs per agent | share of the run |", "|---|---|---|---|"]
            for b in r["breakdown"]:
                share = f"{b['share'] * 100:.0f}%" if "share" in b else ""
                lines.append(
                    f"| {b.get('run', '')} | {_indent(b['name'])} | {c.fmt(b['per_agent_us'])} | {share} |"
                )
        elif any(b.get("unit") == "ms" for b in r["breakdown"]):
            lines += ["| stage | median ms | max ms |", "|---|---|---|"]
            for b in r["breakdown"]:
                lines.append(f"| {_indent(b['name'])} | {c.fmt(b['p50'])} | {c.fmt(b.get('max'))} |")
        else:
            lines += ["| stage | p50 µs | p99 µs | mean µs |", "|---|---|---|---|"]
            for b in r["breakdown"]:
                lines.append(
                    f"| {_indent(b['name'])} | {c.fmt(b['p50'])} | {c.fmt(b.get('p99'))} | {c.fmt(b.get('mean'))} |"
                )
    timers = r.get("opa_server_timers_us")
    if timers:
        lines += [
            "",
            "OPA's own timers for the same query (`?metrics=true`, median µs): "
            + ", ".join(f"{k.replace('timer_', '')} {v:.0f}" for k, v in timers.items()),
        ]
    extra = []
    if r.get("failed_closed_admissions_per_trial"):
        d = r["failed_closed_admissions_per_trial"]
        extra.append(
            f"admissions that failed closed during a switch: median {d['p50']}, max {d['max']} per trial"
        )
    if r.get("watcher"):
        w = r["watcher"]
        extra.append(
            f"watcher callbacks: {w['callbacks']} for {w['trials']} edits, "
            f"{w['reloads_that_changed_nothing']} of them reloads that changed nothing"
        )
    if r.get("setup_seconds"):
        extra.append(
            "bulk setup (not timed): "
            + ", ".join(f"{int(k):,} agents in {v:.1f} s" for k, v in r["setup_seconds"].items())
        )
    for note in r.get("notes", []) + extra:
        lines.append(f"- {note}")
    if extra or r.get("notes"):
        lines.insert(len(lines) - len(r.get("notes", []) + extra), "")
    lines.append(f"\n_{r['figure']} took {r.get('wall_seconds', 0):.0f} s to run._")
    return lines


def _rss_by_size(trials: dict[str, Any]) -> list[tuple[int, float]]:
    out = []
    for size, got in sorted(trials.items(), key=lambda kv: int(kv[0])):
        runs = [t for t in got.get("batch", []) if t.get("tracemalloc_peak_bytes") is None]
        if runs:
            out.append((int(size), max(t["rss_after_kb"] for t in runs) / 1024))
    return out


def _indent(name: str) -> str:
    stripped = name.lstrip(" ")
    depth = (len(name) - len(stripped)) // 2
    return "&nbsp;&nbsp;" * 2 * depth + stripped if depth else name


def _v(value: float, unit: str) -> str:
    return f"{c.fmt(value)} {unit}".strip()


def _met(item: dict[str, Any]) -> str:
    if item.get("met") is None:
        return "-"
    return "yes" if item["met"] else "**no**"


if __name__ == "__main__":
    sys.exit(main())
