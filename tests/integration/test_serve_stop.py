"""`agov serve --watch` asked to stop (SIGTERM or Ctrl-C) while it brings agents up to date, and
a reload it refuses.

A reload's revalidation stops after a committed chunk (resumable, as after any interruption); a
reload still building stops before it switches anything; the catch-up at start stops the same
way, and serve then never says it is serving. serve exits 0 each time, and nothing blames OPA:
serve stopped the sidecar itself. Before, the reload went on until serve had stopped OPA under
it, and printed "refused the connection / is the OPA sidecar running?". A refused reload says
what tries it again, since nothing else wakes the watch.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _reload_support import (
    ACTOR,
    connect,
    create_governed,
    edit_config,
    edit_data,
    set_analysis_limit,
    statuses,
)

from agov.config import Config, Limits
from agov.engine import Engine

AGENTS = 300  # one agent per chunk: a run of a few hundred chunk queries, long enough to stop midway


class Serve:
    """`agov serve --watch` as a process in a session of its own, with its stderr read as it comes."""

    def __init__(self, home: Path, *, ignored: tuple[signal.Signals, ...] = (), **env_overrides: str) -> None:
        tmpdir = home.with_name("tmp")
        tmpdir.mkdir(exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmpdir), **env_overrides}
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
        self.proc = subprocess.Popen(  # a session of its own, like a terminal's foreground job
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
            preexec_fn=self._ignoring(ignored) if ignored else None,
        )
        self.raw = b""
        self.text = ""

    @staticmethod
    def _ignoring(ignored: tuple[signal.Signals, ...]) -> Callable[[], None]:
        """Set in the child before exec, as a shell does for its script's background jobs."""

        def ignore() -> None:
            for s in ignored:
                signal.signal(s, signal.SIG_IGN)

        return ignore

    def read_until(self, marker: str, timeout_s: float) -> str:
        assert self.proc.stderr is not None
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        try:
            while marker not in self.text and time.monotonic() < deadline:
                if selector.select(timeout=0.2):
                    # the fd itself: a buffered readline would hold lines select no longer sees
                    chunk = os.read(self.proc.stderr.fileno(), 65536)
                    if not chunk:
                        break
                    self.raw += chunk
                    self.text = self.raw.decode(errors="replace")
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


def wait_for(condition: Callable[[], Any], what: str, serve: Serve, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.01)
    pytest.fail(f"{what} did not happen: {serve.text}")


def stop(serve: Serve, how: str) -> str:
    """Send the signal (``Ctrl-C``: SIGINT to serve's whole process group, as a terminal does),
    check serve exits 0, and return all it printed."""
    if how == "Ctrl-C":
        os.killpg(serve.proc.pid, signal.SIGINT)
    else:
        serve.proc.send_signal(getattr(signal, how))
    assert serve.proc.wait(timeout=30) == 0, serve.text
    return serve.read_until("\0", 5)  # the rest of stderr, up to EOF


def serve_once(home: Path, timeout_s: float = 120) -> str:
    """Start serve --watch, let it get to serving, stop it (SIGTERM): all it printed."""
    serve = Serve(home)
    try:
        serve.read_until("metrics on http://", timeout_s)
        return stop(serve, "SIGTERM")
    finally:
        serve.kill()


@pytest.fixture(scope="module")
def governed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with AGENTS governed agents, judged one per chunk."""
    home = tmp_path_factory.mktemp("serve-stop") / "ws"
    with Engine.init(home, Config(limits=Limits(revalidation_chunk_size=1)), actor=ACTOR) as engine:
        for i in range(AGENTS):
            create_governed(engine, f"agent-{i:04d}", temperature=0.3)
    return home


@pytest.fixture
def home(governed: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(governed, tmp_path / "ws"))


def finish_with_revalidate(home: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "agov.cli", "revalidate", "--home", str(home), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "Ctrl-C"])
def test_serve_stopped_during_a_reload_stops_its_run_after_a_chunk(home: Path, how: str) -> None:
    old_hash = active_hash(home)
    serve = Serve(home)
    try:
        assert "metrics on http://" in serve.read_until("metrics on http://", 60), serve.text
        edit_data(home, set_analysis_limit(0.35))  # a new policy every agent still passes

        def started() -> str | None:  # the reload's run has committed a chunk
            new_hash = active_hash(home)
            run = run_row(home, new_hash) if new_hash != old_hash else None
            return new_hash if run is not None and run["cursor"] else None

        new_hash = wait_for(started, "a revalidation run", serve)
        text = stop(serve, how)
    finally:
        serve.kill()

    assert "reload interrupted: serve is stopping" in text, text
    assert "refused the connection" not in text and "sidecar running" not in text, text
    assert text.rstrip().endswith("serve stopped"), text
    stopped = run_row(home, new_hash)
    assert stopped is not None and stopped["finished_at"] is None, stopped
    assert 0 < int(str(stopped["total"])) < AGENTS, stopped  # stopped midway, at a committed chunk

    finish_with_revalidate(home)  # the same run, to its end
    done = run_row(home, new_hash)
    assert done is not None and done["id"] == stopped["id"] and done["finished_at"] is not None, done
    assert done["total"] == AGENTS and done["valid"] == AGENTS, done
    assert set(statuses(home).values()) == {"GOVERNED_VALID"}


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_serve_stopped_while_a_reload_builds_switches_nothing(home: Path, tmp_path: Path, how: str) -> None:
    """A stop that comes while the new bundle is still being built or tested: serve waits for
    that, and then leaves the old policy active instead of switching and stopping after one chunk
    (which would deny every agent not yet re-signed until someone finished the run). A Ctrl-C in
    the terminal reaches the whole process group: it must not kill the build midway, which read
    as a policy that failed it (a refusal, audited and counted)."""
    building = tmp_path / "building"
    slow_opa = tmp_path / "slow-opa"
    real_opa = shutil.which("opa")
    assert real_opa is not None
    slow_opa.write_text(
        f'#!/bin/sh\nif [ "$1" = build ]; then touch "{building}"; sleep 1; fi\nexec "{real_opa}" "$@"\n'
    )
    slow_opa.chmod(0o755)
    old_hash = active_hash(home)
    versions = count_rows(home, "policy_versions")
    serve = Serve(home, AGOV_OPA_BIN=str(slow_opa))
    try:
        assert "metrics on http://" in serve.read_until("metrics on http://", 60), serve.text
        edit_data(home, set_analysis_limit(0.35))
        wait_for(building.exists, "a reload's build", serve)
        text = stop(serve, how)
    finally:
        serve.kill()

    assert "reload interrupted: serve is stopping; the new policy was not activated" in text, text
    assert text.rstrip().endswith("serve stopped"), text
    assert active_hash(home) == old_hash
    assert count_rows(home, "policy_versions") == versions
    assert count_rows(home, "revalidation_runs WHERE finished_at IS NULL") == 0
    assert count_rows(home, "audit_events WHERE type = 'POLICY_RELOAD_REFUSED'") == 0


def test_ctrl_c_during_the_catch_up_at_start_stops_serve_before_it_serves(home: Path) -> None:
    """At start serve judges every agent again when agov.yaml's org limits changed; Ctrl-C then
    stops that run after a chunk, exits 0 (serve's normal stop), and never says it is serving."""
    edit_config(home, lambda raw: raw["org"].update(max_monthly_budget_usd=2000.0))
    policy_hash = active_hash(home)
    before = run_row(home, policy_hash)
    serve = Serve(home)
    try:

        def started() -> bool:  # the catch-up's run has committed a chunk
            run = run_row(home, policy_hash)
            return run is not None and run != before and bool(run["cursor"])

        wait_for(started, "the catch-up's run", serve)
        text = stop(serve, "Ctrl-C")
    finally:
        serve.kill()

    assert "bringing the agents up to date interrupted: serve is stopping" in text, text
    assert "serving:" not in text, text
    assert text.rstrip().endswith("serve stopped"), text
    run = run_row(home, policy_hash)
    assert run is not None and run["finished_at"] is None and 0 < int(str(run["total"])) < AGENTS, run
    finish_with_revalidate(home)
    assert run_row(home, policy_hash)["total"] == AGENTS  # type: ignore[index]


def count_rows(home: Path, table_and_filter: str) -> int:
    conn = connect(home / "agov.db")
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table_and_filter}").fetchone()[0])
    finally:
        conn.close()


def test_a_refused_reload_says_what_tries_again_and_the_next_save_does(home: Path) -> None:
    """A refused change is not retried by itself (a new key, say, is not a file the watch sees):
    serve says what tries again, and the next save does."""
    old_hash = active_hash(home)
    broken = home / "policies" / "agov" / "broken.rego"
    serve = Serve(home)
    try:
        assert "metrics on http://" in serve.read_until("metrics on http://", 60), serve.text
        broken.write_text("package agov.broken\n\nthis is not rego\n")
        text = serve.read_until("tries again", 60)
        assert "reload refused: " in text and "the next save, or `agov policy reload`, tries again" in text, (
            text
        )
        assert active_hash(home) == old_hash
        broken.unlink()
        edit_data(home, set_analysis_limit(0.35))
        wait_for(lambda: active_hash(home) != old_hash, "the next save's reload", serve)
        text = serve.read_until(f"governed agents under {active_hash(home)[:12]}", 60)
        assert f"activated policy {active_hash(home)[:12]}\nrevalidated {AGENTS} governed agents" in text, (
            text
        )
        stop(serve, "SIGTERM")
    finally:
        serve.kill()


def test_serve_watch_applies_an_edit_saved_while_it_was_down(home: Path) -> None:
    """Before, serve reconciled only the org limits and an unfinished run at start: an edit saved
    while it was down (or one it was stopped under) stayed unenforced until the next save."""
    from agov.bundle import compute_policy_hash

    old_hash = active_hash(home)
    edit_data(home, set_analysis_limit(0.25))  # every agent (0.3) now fails it
    new_hash = compute_policy_hash(home / "policies")
    assert new_hash != old_hash
    text = serve_once(home)
    assert f"serving: policy {new_hash[:12]}" in text, text
    assert f"revalidated {AGENTS} governed agents under {new_hash[:12]}" in text, text
    assert active_hash(home) == new_hash
    assert set(statuses(home).values()) == {"GOVERNED_INVALIDATED"}


def test_serve_says_when_agov_yaml_limits_wait_for_a_restart(home: Path) -> None:
    """Org limits judge at once; `limits:` (chunk size, deadlines) are read when serve starts.
    Before, a change to them was silently ignored until a restart."""
    serve = Serve(home)
    try:
        assert "metrics on http://" in serve.read_until("metrics on http://", 60), serve.text
        edit_config(home, lambda raw: raw["limits"].update(revalidation_chunk_size=7))
        text = serve.read_until("take effect when serve restarts", 30)
        assert "agov.yaml's limits changed: they take effect when serve restarts" in text, text
        text = stop(serve, "SIGTERM")
    finally:
        serve.kill()
    assert text.count("agov.yaml's limits changed") == 1, text


def test_a_restarted_serve_watch_does_not_undo_a_rollback(home: Path) -> None:
    """The files still hold the version a rollback replaced: activating them at start would bring
    back, at a pod restart, the policy an operator rolled back from."""
    old_hash = active_hash(home)
    with Engine.open(home) as engine:
        edit_data(home, set_analysis_limit(0.35))
        rolled_back_from = engine.reload_policy(actor=ACTOR, reason="P2")["policy_hash"]
        engine.rollback_policy(old_hash, actor=ACTOR, reason="incident: back to P1")
    text = serve_once(home)
    assert f"policies/ holds policy {rolled_back_from[:12]}, which the latest `agov policy rollback`" in text
    assert f"serving: policy {old_hash[:12]}" in text, text
    assert active_hash(home) == old_hash


def test_serve_watch_with_an_unchanged_tree_brings_the_agents_up_to_date_once(home: Path) -> None:
    """No reload at start when the tree is the active policy: before, a start that could not
    read the org limits said so twice, and audited a refused reload nobody had asked for."""
    edit_config(home, lambda raw: raw.pop("org"))
    refused_before = count_rows(home, "audit_events WHERE type = 'POLICY_RELOAD_REFUSED'")
    text = serve_once(home, 60)
    assert text.count("could not bring the agents up to date") == 1, text
    assert "reload refused" not in text, text
    assert count_rows(home, "audit_events WHERE type = 'POLICY_RELOAD_REFUSED'") == refused_before


def test_a_start_reload_refused_still_brings_the_agents_up_to_date(home: Path) -> None:
    """The catch-up is left to the start reload only when that reload switches: a refused one
    leaves the active policy's agents to the catch-up, here new org limits to judge with."""
    edit_config(home, lambda raw: raw["org"].update(max_monthly_budget_usd=2000.0))
    broken = home / "policies" / "agov" / "broken.rego"
    broken.write_text("package agov.broken\n\nallow if {\n")
    text = serve_once(home)
    assert "reload refused: opa check --strict failed" in text, text
    assert f"org limits in agov.yaml changed: revalidated {AGENTS} governed agents" in text, text


def test_serve_started_with_ctrl_c_ignored_keeps_ignoring_it(home: Path) -> None:
    """As a shell script's background job (`agov serve --watch &`) is: a Ctrl-C meant for the
    script's foreground reached it too, and stopped it, because serve set its own handler."""
    serve = Serve(home, ignored=(signal.SIGINT,))
    try:
        serve.read_until("metrics on http://", 120)
        os.killpg(serve.proc.pid, signal.SIGINT)
        time.sleep(1.5)
        assert serve.proc.poll() is None, serve.text
        stop(serve, "SIGTERM")  # the normal stop still works: exit 0
    finally:
        serve.kill()
