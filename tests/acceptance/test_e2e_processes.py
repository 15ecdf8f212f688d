"""No orphan `opa`: whatever way `agov` ends, the OPA it started ends too.

Each `agov` call runs with ``AGOV_OPA_BIN`` set to a spy that records the pid of every opa it
starts (then execs the real one), and with ``TMPDIR`` inside the test's directory, so the
managed OPA's command line (its ``--config-file``) names the test's directory as well.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from e2e_support import AGOV, OpaSpy, agov, alive, base_env, copy_ws, ok, opa_processes, parent, wait_gone

pytestmark = pytest.mark.acceptance

METRICS = [
    "agent_starts_allowed_total",
    "agent_starts_denied_total",
    "agent_invalidation_events_total",
    "policy_reload_success_total",
    "policy_reload_failure_total",
    "promotion_attempts_total",
    "promotion_denies_total",
]


@pytest.fixture(scope="module")
def ws(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = copy_ws(pristine, tmp_path_factory.mktemp("processes") / "ws")
    ok("agent", "create", "--template", "research-analyst", "--id", "runner", home=home)
    ok("agent", "create", "--template", "ideation-partner", "--id", "waiting", home=home)
    assert ok("promote", "runner", "--role", "agent_admin", home=home)["status"] == "GOVERNED_VALID"
    return home


def spy_env(spy: OpaSpy, tmp_path: Path) -> dict[str, str | None]:
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    return {**spy.env(), "TMPDIR": str(tmpdir)}


def assert_no_opa_left(spy: OpaSpy, tmp_path: Path, *, started: bool) -> None:
    pids = spy.pids()
    assert bool(pids) == started, pids
    assert wait_gone(pids) == [], f"opa still running: {pids}"
    assert opa_processes(str(tmp_path)) == []


def test_normal_admit(ws: Path, tmp_path: Path, opa_spy: OpaSpy) -> None:
    result = agov("admit", "runner", home=ws, env=spy_env(opa_spy, tmp_path))
    assert (result.code, result.json["code"]) == (0, "ADMISSION_ALLOW")
    assert_no_opa_left(opa_spy, tmp_path, started=True)
    # and the sidecar's private temp dir (config with a bearer token) is gone too
    assert list((tmp_path / "tmpdir").iterdir()) == []


def test_denied_promote(ws: Path, tmp_path: Path, opa_spy: OpaSpy) -> None:
    result = agov("promote", "waiting", "--role", "viewer", home=ws, env=spy_env(opa_spy, tmp_path))
    assert result.code == 1, str(result)
    assert [r["code"] for r in result.json["deny"]] == ["PROMOTION_DENY_ROLE_NOT_ALLOWED"]
    assert_no_opa_left(opa_spy, tmp_path, started=True)
    assert list((tmp_path / "tmpdir").iterdir()) == []


def test_bad_workspace_config(ws: Path, tmp_path: Path, opa_spy: OpaSpy) -> None:
    home = copy_ws(ws, tmp_path / "ws")
    (home / "agov.yaml").write_text(
        (home / "agov.yaml").read_text().replace("runtime: managed", "runtime: warp")
    )
    # a decision that cannot read its config denies (exit 1); other commands: bad input (exit 2)
    result = agov("admit", "runner", home=home, env=spy_env(opa_spy, tmp_path))
    assert result.code == 1, str(result)
    assert result.json["code"] == "ADMISSION_DENY_ENGINE_UNAVAILABLE"
    assert "runtime must be 'managed' or 'external'" in result.json["reasons"][0]["message"]
    result = agov("revalidate", home=home, env=spy_env(opa_spy, tmp_path))
    assert result.code == 2, str(result)
    assert "runtime must be 'managed' or 'external'" in result.json["error"]["message"]
    assert_no_opa_left(opa_spy, tmp_path, started=False)


def test_error_after_opa_started(ws: Path, tmp_path: Path, opa_spy: OpaSpy) -> None:
    home = copy_ws(ws, tmp_path / "ws")
    (key,) = [k["keyid"] for k in ok("keys", "list", home=home) if k["active"]]
    ok("keys", "revoke", key, "--reason", "no signer left", home=home)
    # revalidation starts OPA, then finds no key to sign with
    result = agov("revalidate", home=home, env=spy_env(opa_spy, tmp_path))
    assert result.code == 2, str(result)
    assert result.json["error"]["type"] == "KeyMaterialError"
    assert_no_opa_left(opa_spy, tmp_path, started=True)


def start_serve(home: Path, env: dict[str, str | None]) -> tuple[subprocess.Popen[bytes], str]:
    """Start `agov serve --metrics-port 0` and return it with its metrics URL (from stderr)."""
    proc = subprocess.Popen(
        [*AGOV, "serve", "--metrics-port", "0", "--home", str(home)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=base_env(**env),
    )
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    selector = selectors.DefaultSelector()
    selector.register(proc.stderr, selectors.EVENT_READ)
    seen = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            selector.select(timeout=0.2)
            chunk = proc.stderr.read() or b""
            seen += chunk
            found = re.search(rb"metrics on (http://\S+/metrics)", seen)
            if found:
                return proc, found.group(1).decode()
            if proc.poll() is not None:
                break
    finally:
        selector.close()
    proc.kill()
    proc.wait()
    raise AssertionError(f"agov serve printed no metrics URL: {seen!r}")


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return str(response.read().decode())


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_serve_serves_metrics_and_leaves_no_opa(ws: Path, tmp_path: Path, opa_spy: OpaSpy, how: str) -> None:
    proc, url = start_serve(ws, spy_env(opa_spy, tmp_path))
    try:
        body = fetch(url)
        for name in METRICS:
            assert re.search(rf"^# TYPE {name} counter$", body, re.MULTILINE), name
        assert re.search(r"^agent_starts_allowed_total 0\.0$", body, re.MULTILINE)
        assert re.search(r"^# TYPE \w*decision_latency\w* histogram$", body, re.MULTILINE)

        # the managed OPA runs as agov's child, and our /proc scan sees it
        (opa,) = opa_spy.pids()
        assert alive(opa)
        assert parent(opa) == proc.pid
        assert opa_processes(str(tmp_path)) == [opa]

        proc.send_signal(getattr(signal, how))
        code = proc.wait(timeout=15)
        # SIGTERM and Ctrl-C are serve's normal stop (README): 0, not 130
        assert code == (-signal.SIGKILL if how == "SIGKILL" else 0)
        assert wait_gone([opa]) == [], "opa outlived agov serve"
        assert opa_processes(str(tmp_path)) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in opa_spy.pids():
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_serve_starts_even_when_it_cannot_bring_the_agents_up_to_date(
    ws: Path, tmp_path: Path, opa_spy: OpaSpy
) -> None:
    """At start `serve` judges the agents again when agov.yaml's org limits changed; when it
    cannot (here no key may sign), it says why and serves anyway: nothing was changed."""
    home = copy_ws(ws, tmp_path / "ws")
    (keyid,) = [k["keyid"] for k in ok("keys", "list", home=home)]
    ok("keys", "revoke", keyid, "--reason", "compromised", home=home)
    config = home / "agov.yaml"
    config.write_text(
        config.read_text().replace("max_monthly_budget_usd: 1000.0", "max_monthly_budget_usd: 250.0")
    )

    proc = subprocess.Popen(
        [*AGOV, "serve", "--metrics-port", "0", "--home", str(home)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=base_env(**spy_env(opa_spy, tmp_path)),
    )
    try:
        assert proc.stderr is not None
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline().decode()
            lines.append(line)
            if "metrics on http://" in line or not line:
                break
        text = "".join(lines)
        assert (
            f"could not bring the agents up to date: the proof signing key {keyid} was revoked at" in text
        ), text
        url = re.search(r"metrics on (http://\S+/metrics)", text)
        assert url is not None, text
        assert "promotion_attempts_total" in fetch(url.group(1))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert wait_gone(opa_spy.pids()) == []


def test_serve_on_a_port_in_use_is_bad_usage_said_before_anything_starts(
    ws: Path, tmp_path: Path, opa_spy: OpaSpy
) -> None:
    with contextlib.closing(socket.socket()) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = agov(
            "serve",
            "--metrics-port",
            port,
            "--metrics-addr",
            "127.0.0.1",
            home=ws,
            env=spy_env(opa_spy, tmp_path),
        )
    assert result.code == 2, str(result)
    error = result.json["error"]
    assert error["message"].startswith(f"cannot serve metrics on 127.0.0.1:{port}: Address already in use")
    assert "--metrics-port" in error["hint"]
    assert_no_opa_left(opa_spy, tmp_path, started=False)  # said before the sidecar or the catch-up


@pytest.mark.parametrize("how", ["SIGKILL", "the group's SIGTERM"])
def test_a_policy_reload_killed_midway_leaves_no_opa_step_running(ws: Path, tmp_path: Path, how: str) -> None:
    """`opa test` and the other build steps run in a process group of their own (so that a
    terminal's Ctrl-C meant for `agov serve` does not kill a build midway): the kernel still ends
    them with agov, however agov ends (a CI runner or `timeout` signals agov's group only)."""
    home = copy_ws(ws, tmp_path / "ws")
    data = home / "policies" / "agov" / "config" / "data.json"
    data.write_text(data.read_text().replace('"analysis": 0.7', '"analysis": 0.65'))
    assert '"analysis": 0.65' in data.read_text(), "setup: a changed policy, so that the reload builds"
    real_opa = os.environ.get("AGOV_OPA_BIN") or shutil.which("opa")
    assert real_opa is not None
    pid_file = tmp_path / "opa-test.pid"
    slow_opa = tmp_path / "slow-opa"
    slow_opa.write_text(
        f'#!/bin/sh\nif [ "$1" = test ]; then echo $$ > "{pid_file}"; exec sleep 60; fi\nexec "{real_opa}" "$@"\n'
    )
    slow_opa.chmod(0o755)
    tmp = tmp_path / "tmp"  # the temp dir of both agov processes: the build's snapshot goes there
    tmp.mkdir()
    proc = subprocess.Popen(
        [*AGOV, "policy", "reload", "--home", str(home)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=base_env(AGOV_OPA_BIN=str(slow_opa), TMPDIR=str(tmp)),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.02)
        step = int(pid_file.read_text())
        assert alive(step)
        snapshots = sorted(p.name for p in tmp.glob("agov-bundle-*"))
        assert len(snapshots) == 1, f"setup: the build works in one snapshot: {snapshots}"
        if how == "SIGKILL":
            proc.kill()
        else:
            os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
        assert wait_gone([step]) == [], "the opa test step outlived agov"
        left = sorted(p.name for p in tmp.glob("agov-bundle-*"))
        if how == "SIGKILL":
            assert proc.returncode == -signal.SIGKILL and left == snapshots
            # the next build removes what the killed one left (its copy of the policy tree)
            ok("policy", "build", home=home, env={"TMPDIR": str(tmp)})
            assert sorted(p.name for p in tmp.glob("agov-bundle-*")) == []
        else:
            # unwound as Ctrl-C is: the step stopped, the snapshot removed, a way to finish said
            assert proc.returncode == 128 + signal.SIGTERM, stderr
            assert left == []
            assert stderr.startswith(
                b"error: terminated (SIGTERM)\n  hint: what was committed stays committed"
            )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if pid_file.exists() and alive(step := int(pid_file.read_text())):
            os.kill(step, signal.SIGKILL)
