"""The README's five-minute tour, run as written: every command, in order, in one workspace.

A command's trailing comment states what it answers (``# exit 1: CODE``; no exit given means 0),
and the comment lines under a command show its output: JSON whose values must match (``…``
stands for any value), or lines that must appear verbatim. Once, the tour promoted an agent that
was already governed and expected a role denial; this test keeps the README true.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.acceptance

README = Path(__file__).resolve().parents[2] / "README.md"
EXIT = re.compile(r"#\s*exit (\d+)(?::\s*([A-Z][A-Z_]+))?")


@dataclass
class Step:
    command: str
    exit_code: int = 0
    code: str | None = None
    shown: list[str] = field(default_factory=list)  # the comment lines under the command


def tour_steps() -> list[Step]:
    text = README.read_text()
    tour = text[text.index("## A five-minute tour") :]
    tour = tour[: tour.index("\n## ", 1)]
    steps: list[Step] = []
    for block in re.findall(r"```sh\n(.*?)```", tour, flags=re.S):
        for line in block.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                steps[-1].shown.append(line[1:])
                continue
            command, _, comment = line.partition("  #")
            step = Step(command.strip())
            if found := EXIT.search("#" + comment):
                step.exit_code, step.code = int(found.group(1)), found.group(2)
            steps.append(step)
    return steps


def _active_hash(home: Path) -> str:
    conn = sqlite3.connect(home / "agov.db")
    try:
        return str(conn.execute("SELECT hash FROM policy_versions WHERE active = 1").fetchone()[0])
    finally:
        conn.close()


def _check_shown(step: Step, out: str) -> None:
    shown = "\n".join(step.shown).strip()
    if not shown:
        return
    if shown.startswith("{"):  # JSON: every value given must match; "…" is any value
        expected = json.loads(re.sub(r'"…"', "null", " ".join(s.strip() for s in step.shown)))
        actual = json.loads(out)
        for key, value in expected.items():
            assert key in actual, f"{step.command}: no {key!r} in {out}"
            if value is not None:
                assert actual[key] == value, (
                    f"{step.command}: {key} is {actual[key]!r}, README says {value!r}"
                )
    else:  # lines of output, verbatim
        for line in step.shown:
            assert line.strip() in out, f"{step.command}: README shows {line.strip()!r}, output:\n{out}"


def test_the_readme_tour_runs_as_written(tmp_path: Path, opa_bin: Path) -> None:
    steps = tour_steps()
    assert len(steps) >= 12, [s.command for s in steps]
    home = tmp_path / "tour" / ".agov"  # the README's own kind of path: under a hidden directory
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AGOV_")},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{opa_bin.parent}{os.pathsep}{os.environ['PATH']}",
        "AGOV_HOME": str(home),
        "AGOV_ACTOR": "alice",
        "AGOV_OPA_BIN": str(opa_bin),
    }
    before_reload: str | None = None
    for step in steps:
        if step.command.startswith("export "):
            continue  # the environment above stands for these
        command = step.command
        if command.startswith("agov policy reload"):
            before_reload = _active_hash(home)
        if "<previous hash>" in command:
            assert before_reload is not None
            command = command.replace("<previous hash>", before_reload)
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        output = result.stdout + result.stderr
        assert result.returncode == step.exit_code, f"{command}: exit {result.returncode}\n{output}"
        if step.code:
            assert step.code in output, f"{command}: no {step.code} in\n{output}"
        if "<previous hash>" in step.command:  # the files still hold the edit: rollback says so
            assert "note: the files under policies/ still hash to" in result.stdout, result.stdout
        if step.command == "agov policy history":  # after the reload: two versions, two switches
            assert re.search(r"^\* [0-9a-f]{16} ", result.stdout, flags=re.M), result.stdout
            switches = re.findall(
                r"^    activated .* by alice(?: \(replacing ([0-9a-f]{16})\))?:", result.stdout, re.M
            )
            assert before_reload is not None and switches == ["", before_reload[:16]], result.stdout
        _check_shown(step, result.stdout)
    # the rollback restored the agent
    final = subprocess.run(
        ["bash", "-c", "agov admit research-analyst --json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert final.returncode == 0 and json.loads(final.stdout)["code"] == "ADMISSION_ALLOW", final.stdout
