"""`agov serve --watch` asked to stop while a reload revalidates the agents.

The run stops after a committed chunk (resumable, as after any interruption), serve says so and
exits 0, and nothing blames OPA: serve stopped the sidecar itself. Before, the reload went on
until serve had stopped OPA under it, and printed "refused the connection / is the OPA sidecar
running?".
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _reload_support import ACTOR, connect, create_governed, edit_data, set_analysis_limit, statuses

from agov.config import Config, Limits
from agov.engine import Engine

AGENTS = 300  # one agent per chunk: a run of a few hundred chunk queries, long enough to stop midway


class Serve:
    """`agov serve --watch` as a process, with its stderr read line by line."""

    def __init__(self, home: Path) -> None:
        tmpdir = home.with_name("tmp")
        tmpdir.mkdir(exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmpdir)}
        argv = [
            sys.executable,
            "-m",
            "agov.cli",
            "serve",
            "--watch",
            "--metrics-port",
            "0",
            "--home",
            str(home),
        ]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        self.text = ""

    def read_until(self, marker: str, timeout_s: float) -> str:
        assert self.proc.stderr is not None
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        try:
            while marker not in self.text and time.monotonic() < deadline:
                if selector.select(timeout=0.2):
                    line = self.proc.stderr.readline()
                    if not line:
                        break
                    self.text += line.decode()
        finally:
            selector.close()
        return self.text

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_row(home: Path, policy_hash: str) -> dict[str, object] | None:
    conn = connect(home / "agov.db")
    try:
        row = conn.execute(
            "SELECT * FROM revalidation_runs WHERE policy_hash = ? ORDER BY id DESC LIMIT 1", (policy_hash,)
        ).fetchone()
        return dict(row) if row is not None else None
    finally:
        conn.close()


def active_hash(home: Path) -> str:
    conn = connect(home / "agov.db")
    try:
        return str(conn.execute("SELECT hash FROM policy_versions WHERE active = 1").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_serve_stopped_during_a_reload_stops_its_run_after_a_chunk(tmp_path: Path, how: str) -> None:
    home = tmp_path / "ws"
    with Engine.init(home, Config(limits=Limits(revalidation_chunk_size=1)), actor=ACTOR) as engine:
        for i in range(AGENTS):
            create_governed(engine, f"agent-{i:04d}", temperature=0.3)
    old_hash = active_hash(home)

    serve = Serve(home)
    try:
        assert "metrics on http://" in serve.read_until("metrics on http://", 60), serve.text
        edit_data(home, set_analysis_limit(0.35))  # a new policy every agent still passes
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the reload's run has committed a chunk
            new_hash = active_hash(home)
            run = run_row(home, new_hash) if new_hash != old_hash else None
            if run is not None and run["cursor"]:
                break
            time.sleep(0.01)
        else:
            pytest.fail(f"no revalidation run started: {serve.text}")
        serve.proc.send_signal(getattr(signal, how))
        assert serve.proc.wait(timeout=30) == 0, serve.text
        text = serve.read_until("\0", 5)  # the rest of stderr, up to EOF
    finally:
        serve.kill()

    assert "reload interrupted: serve is stopping" in text, text
    assert "refused the connection" not in text and "sidecar running" not in text, text
    assert text.rstrip().endswith("serve stopped"), text
    stopped = run_row(home, new_hash)
    assert stopped is not None and stopped["finished_at"] is None, stopped
    assert 0 < int(str(stopped["total"])) < AGENTS, stopped  # stopped midway, at a committed chunk

    # the next `agov revalidate` finishes the same run
    finished = subprocess.run(
        [sys.executable, "-m", "agov.cli", "revalidate", "--home", str(home), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    done = run_row(home, new_hash)
    assert done is not None and done["id"] == stopped["id"] and done["finished_at"] is not None, done
    assert done["total"] == AGENTS and done["valid"] == AGENTS, done
    assert set(statuses(home).values()) == {"GOVERNED_VALID"}
