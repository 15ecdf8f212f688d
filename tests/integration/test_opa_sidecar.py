"""The managed sidecar against a real OPA: decisions, provenance, hot reload, R15, no orphans."""

from __future__ import annotations

import os
import secrets
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agov.errors import DecisionError, EngineUnavailableError, PolicyError
from agov.opa import ConnectionConfig, EvaluatorConfig, ExternalSidecar, ManagedSidecar, require_bool
from agov.opa.http import WrongListenerError
from agov.opa.managed import ManagedConfig, sweep_orphaned_dirs

pytestmark = pytest.mark.integration

PATH = "agov/test/decision"


def _alive(pid: int) -> bool:
    """Running (a zombie awaiting its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _opa_children() -> list[int]:
    """Live ``opa`` processes whose parent is this test process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        mine = fields.get("PPid", "").strip() == str(os.getpid())
        if fields.get("Name", "").strip() == "opa" and mine and _alive(int(entry)):
            found.append(int(entry))
    return found


def _wait_gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


# --- decisions ------------------------------------------------------------------------------------


def test_evaluate_returns_result_revision_and_decision_id(sidecar: ManagedSidecar) -> None:
    allowed = sidecar.evaluate(PATH, {"x": 1})
    denied = sidecar.evaluate(PATH, {"x": 2}, expected_revision="rev-1")

    assert allowed.result == {"allow": True, "rev": "rev-1"}
    assert denied.result == {"allow": False, "rev": "rev-1"}
    assert allowed.revision == denied.revision == "rev-1"
    assert allowed.decision_id and denied.decision_id and allowed.decision_id != denied.decision_id
    assert require_bool(allowed.result["allow"], "allow") is True
    assert sidecar.revision() == "rev-1"
    sidecar.health()


def test_the_same_opa_answers_as_an_external_sidecar(sidecar: ManagedSidecar) -> None:
    with ExternalSidecar(sidecar.connection, EvaluatorConfig()) as external:
        external.health()
        assert external.revision() == "rev-1"
        assert external.evaluate(PATH, {"x": 1}).result["allow"] is True


def _opa_argv(pid: int | None) -> list[str]:
    assert pid is not None
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_opa_listens_only_on_a_socket_only_its_owner_may_open(sidecar: ManagedSidecar) -> None:
    """No loopback port: another local user can neither ask nor write to the managed OPA, nor
    answer in its place on a port it left."""
    connection = sidecar.connection
    assert connection.unix_socket is not None and sidecar.url == f"unix:{connection.unix_socket}"
    assert sidecar.tcp_url == ""
    argv = _opa_argv(sidecar.pid)
    addresses = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--addr"]
    assert addresses == ["unix://opa.sock"], argv  # named relative to OPA's working directory
    assert Path(os.readlink(f"/proc/{sidecar.pid}/cwd")) == connection.unix_socket.parent
    assert stat.S_IMODE(connection.unix_socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(connection.unix_socket.parent.stat().st_mode) == 0o700
    assert sidecar.evaluate(PATH, {"x": 1}).result["allow"] is True


def test_a_gone_socket_is_engine_unavailable_naming_it(sidecar: ManagedSidecar) -> None:
    connection = sidecar.connection
    assert connection.unix_socket is not None
    connection.unix_socket.unlink()  # OPA still runs, but no new connection can reach it
    gone = r"OPA at unix:/.*opa\.sock is not listening: there is no socket there"
    with (
        ExternalSidecar(connection, EvaluatorConfig()) as fresh,
        pytest.raises(EngineUnavailableError, match=gone),
    ):
        fresh.evaluate(PATH, {"x": 1})


# Listens on argv[1] and answers every request with an allow under revision argv[3], as the
# real OPA would, counting the requests in argv[2]. The socket is bound under another name and
# renamed once it listens: a connect between bind and listen was refused (a flaky setup).
_IMPOSTOR = r"""
import json, os, socket, sys
provenance = {"bundles": {"agov": {"revision": sys.argv[3]}}}
body = json.dumps({"result": {"allow": True}, "provenance": provenance}).encode()
head = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1] + ".tmp")
listener.listen(8)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])  # the path appears listening: no refused connect
while True:
    conn, _ = listener.accept()
    with conn:
        if not conn.recv(65536):  # closed without a request (one small POST)
            continue
        with open(sys.argv[2], "a") as log:
            log.write("request\n")
        conn.sendall(head + body)
"""


def test_another_process_on_the_sidecars_socket_path_is_never_asked(
    sidecar: ManagedSidecar, tmp_path: Path
) -> None:
    """Whoever binds the socket's path in OPA's place (after it removed its socket, say) answers
    no decision: each connection checks that the listener is the OPA process agov started."""
    connection = sidecar.connection
    assert connection.unix_socket is not None and connection.socket_owner_pid == sidecar.pid
    connection.unix_socket.unlink()
    requests = tmp_path / "requests.log"
    impostor = subprocess.Popen(
        [sys.executable, "-c", _IMPOSTOR, str(connection.unix_socket), str(requests), "rev-1"]
    )
    try:
        deadline = time.monotonic() + 10
        while not connection.unix_socket.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        unchecked = ConnectionConfig(url=connection.url, unix_socket=connection.unix_socket)
        with ExternalSidecar(unchecked, EvaluatorConfig()) as fooled:  # setup: it would answer
            assert fooled.evaluate(PATH, {"x": 2}, expected_revision="rev-1").result["allow"] is True
        assert requests.read_text() == "request\n"
        refused = (
            rf"OPA at unix:/.*opa\.sock is not the OPA agov started: process {impostor.pid} "
            rf"listens there, not process {sidecar.pid}"
        )
        with (
            ExternalSidecar(connection, EvaluatorConfig()) as checked,
            pytest.raises(EngineUnavailableError, match=refused),
        ):
            checked.evaluate(PATH, {"x": 2}, expected_revision="rev-1")
        assert requests.read_text() == "request\n"  # nothing was sent to it
    finally:
        impostor.kill()
        impostor.wait()


def test_also_tcp_listens_on_loopback_too(first_bundle: Any, signing_key: Any, opa_bin: Path) -> None:
    with ManagedSidecar(
        first_bundle.data,
        first_bundle.revision,
        signing_key.public_pem,
        signing_key.keyid,
        managed=ManagedConfig(also_tcp=True),
        opa_bin=opa_bin,
    ) as running:
        assert running.url.startswith("unix:/") and running.tcp_url.startswith("http://127.0.0.1:")
        with ExternalSidecar(ConnectionConfig(url=running.tcp_url), EvaluatorConfig()) as over_tcp:
            assert over_tcp.evaluate(PATH, {"x": 1}).result["allow"] is True
        assert running.evaluate(PATH, {"x": 1}).result["allow"] is True


def test_a_working_directory_too_long_for_a_socket_path_is_reached_through_its_descriptor(
    first_bundle: Any, signing_key: Any, opa_bin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never a loopback port instead: that would undo what the socket is for."""
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    with ManagedSidecar(
        first_bundle.data, first_bundle.revision, signing_key.public_pem, signing_key.keyid, opa_bin=opa_bin
    ) as running:
        assert running.url.startswith(f"unix:{deep}/") and running.tcp_url == ""
        address = running.connection.unix_socket
        assert address is not None and str(address).startswith("/proc/self/fd/"), address
        assert running.connection.where == running.url  # messages name the real path
        assert running.evaluate(PATH, {"x": 1}).result["allow"] is True


def test_a_temp_directory_whose_name_reads_as_a_url_changes_nothing_outside_it(
    first_bundle: Any, signing_key: Any, opa_bin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OPA reads --addr as a URL: a socket path with '#' or '?' in it once made OPA bind (and
    first remove) a file outside its working directory."""
    odd = tmp_path / "t#x?y=%41"
    odd.mkdir()
    bystander = tmp_path / "t"
    bystander.write_text("precious\n")
    monkeypatch.setattr(tempfile, "tempdir", str(odd))
    with ManagedSidecar(
        first_bundle.data, first_bundle.revision, signing_key.public_pem, signing_key.keyid, opa_bin=opa_bin
    ) as running:
        assert running.evaluate(PATH, {"x": 1}).result["allow"] is True
    assert bystander.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t", "t#x?y=%41"]


def test_undefined_decision_fails_closed(sidecar: ManagedSidecar) -> None:
    with pytest.raises(DecisionError, match=r"undefined decision at data\.agov\.test\.nope.*fails closed"):
        sidecar.evaluate("agov/test/nope", {"x": 1})


def test_wrong_expected_revision_fails_closed(sidecar: ManagedSidecar) -> None:
    with pytest.raises(DecisionError, match=r"answered by revision 'rev-1', expected 'rev-0'"):
        sidecar.evaluate(PATH, {"x": 1}, expected_revision="rev-0")


def test_non_boolean_allow_from_real_opa_is_refused(sidecar: ManagedSidecar) -> None:
    evaluation = sidecar.evaluate("agov/test/not_a_bool", {})
    with pytest.raises(DecisionError, match="must be a boolean, got str"):
        require_bool(evaluation.result["allow"], "allow")


def test_builtin_error_is_an_error_not_a_silent_allow(sidecar: ManagedSidecar) -> None:
    # Without strict-builtin-errors OPA would drop the failing deny rule and answer allow: true.
    assert sidecar.evaluate("agov/test/checked", {"expires": "2030-01-01T00:00:00Z"}).result == {
        "allow": True
    }
    with pytest.raises(DecisionError, match=r"policy evaluation failed.*time\.parse_rfc3339_ns"):
        sidecar.evaluate("agov/test/checked", {"expires": "not a time"})


def test_bad_path_and_unserializable_input_are_refused(sidecar: ManagedSidecar) -> None:
    with pytest.raises(DecisionError, match="bad policy path"):
        sidecar.evaluate("agov/../system", {})
    with pytest.raises(DecisionError, match="does not serialize to JSON"):
        sidecar.evaluate(PATH, {"x": float("nan")})


def test_decision_ids_reach_the_decision_log(sidecar: ManagedSidecar) -> None:
    evaluation = sidecar.evaluate(PATH, {"x": 1})
    server = sidecar.bundle_server
    assert server is not None
    deadline = time.monotonic() + 10
    events: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline and evaluation.decision_id not in events:
        time.sleep(0.1)
        events = {e.get("decision_id", ""): e for e in server.decision_logs()}
    event = events.get(evaluation.decision_id or "")
    assert event is not None, "decision never reached /logs"
    assert event["bundles"]["agov"]["revision"] == "rev-1"
    assert event["path"] == PATH


def test_opa_uploads_decision_logs_in_chunks_over_its_default_32_kib(sidecar: ManagedSidecar) -> None:
    """At OPA's default upload limit of 32 KiB, starting each new gzip chunk (and often
    re-encoding the last one to fit) took about a sixth of OPA's CPU per admission decision."""
    server = sidecar.bundle_server
    assert server is not None
    decisions = {
        sidecar.evaluate(PATH, {"x": 1, "noise": secrets.token_hex(128)}).decision_id for _ in range(400)
    }
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not decisions <= {
        e.get("decision_id") for e in server.decision_logs()
    }:
        time.sleep(0.2)
    assert decisions <= {e.get("decision_id") for e in server.decision_logs()}, (
        "the decisions never reached /logs"
    )
    sizes = server.log_upload_sizes()
    assert 32 * 1024 < max(sizes) <= 256 * 1024, sizes


@pytest.mark.parametrize("upload_bytes", [0, 256 * 1024 + 1])
def test_an_upload_limit_outside_what_the_bundle_server_accepts_is_refused(upload_bytes: int) -> None:
    with pytest.raises(ValueError, match="decision_log_upload_bytes"):
        ManagedConfig(decision_log_upload_bytes=upload_bytes)


def test_revalidation_specs_are_masked_out_of_the_decision_log(sidecar: ManagedSidecar) -> None:
    kept = sidecar.evaluate(PATH, {"x": 1, "agents": ["kept"]})
    # undefined in this test bundle, so a DecisionError; OPA logs the decision all the same
    with pytest.raises(DecisionError, match="undefined decision"):
        sidecar.evaluate("agov/revalidation/results", {"agents": [{"id": "a", "agent": {}}], "org": {}})
    server = sidecar.bundle_server
    assert server is not None

    def arrived() -> list[dict[str, Any]]:
        return [e for e in server.decision_logs() if e.get("path") == "agov/revalidation/results"]

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not arrived():
        time.sleep(0.1)
    events = arrived()
    assert events, "the revalidation decision never reached /logs"
    assert events[-1]["erased"] == ["/input/agents"]
    assert events[-1]["input"] == {"org": {}}
    others = {e.get("decision_id"): e for e in server.decision_logs()}
    assert others[kept.decision_id]["input"] == {"x": 1, "agents": ["kept"]}
    assert "erased" not in others[kept.decision_id]


# --- hot reload and R15 ---------------------------------------------------------------------------


def test_activate_a_second_bundle(sidecar: ManagedSidecar, build_bundle: Any) -> None:
    second = build_bundle("rev-2", allowed_x=2)
    started = time.monotonic()
    sidecar.activate(second.data, second.revision)
    elapsed = time.monotonic() - started

    assert sidecar.revision() == "rev-2"
    assert sidecar.active_revision == "rev-2"
    evaluation = sidecar.evaluate(PATH, {"x": 2}, expected_revision="rev-2")
    assert evaluation.result == {"allow": True, "rev": "rev-2"}
    with pytest.raises(DecisionError, match="expected 'rev-1'"):
        sidecar.evaluate(PATH, {"x": 2}, expected_revision="rev-1")
    # long polling: the publish reaches OPA without waiting for a polling interval
    assert elapsed < 1.0, f"activation took {elapsed:.2f} s"


@pytest.mark.parametrize("case", ["unsigned", "file_altered_after_signing", "signed_by_unknown_key"])
def test_unverifiable_bundle_is_not_activated(
    case: str, sidecar: ManagedSidecar, build_bundle: Any, foreign_key: Any, tamper: Any
) -> None:
    if case == "unsigned":
        bad = build_bundle("rev-bad", signed=False).data
        reason = "missing .signatures.json"
    elif case == "file_altered_after_signing":
        good = build_bundle("rev-bad", allowed_x=1).data
        bad = tamper(good, "policy.rego", b"input.x == 1", b"input.x == 7")
        reason = "digest mismatch|hash"
    else:
        bad = build_bundle("rev-bad", key=foreign_key).data
        reason = "verification|signature"

    with pytest.raises(PolicyError, match=rf"refused bundle revision 'rev-bad'.*({reason})"):
        sidecar.activate(bad, "rev-bad", timeout_s=10)

    # (R15) nothing changed: OPA keeps rev-1, and the bundle service offers rev-1 again
    assert sidecar.revision() == "rev-1"
    assert sidecar.active_revision == "rev-1"
    assert sidecar.evaluate(PATH, {"x": 1}).result == {"allow": True, "rev": "rev-1"}
    assert sidecar.evaluate(PATH, {"x": 7}).result["allow"] is False
    server = sidecar.bundle_server
    assert server is not None
    current = server.current()
    assert current is not None and current.revision == "rev-1"
    label = {"unsigned": "unsigned bundle", "file_altered_after_signing": "bundle altered after signing"}
    print(f"R15 {label.get(case, 'bundle signed by an unknown key')}: activated 0/1")


def test_good_bundle_activates_after_a_refused_one(sidecar: ManagedSidecar, build_bundle: Any) -> None:
    with pytest.raises(PolicyError):
        sidecar.activate(build_bundle("rev-unsigned", signed=False).data, "rev-unsigned", timeout_s=10)
    good = build_bundle("rev-3", allowed_x=3)
    sidecar.activate(good.data, good.revision, timeout_s=10)
    assert sidecar.evaluate(PATH, {"x": 3}, expected_revision="rev-3").result["allow"] is True


def test_every_decision_names_the_revision_that_made_it(sidecar: ManagedSidecar, build_bundle: Any) -> None:
    """R10 in small: evaluations racing three hot reloads; result["rev"] comes from the policy."""
    bundles = [build_bundle(f"rev-race-{i}", allowed_x=i) for i in range(3)]
    stop = threading.Event()
    mismatches: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    counts = [0]

    def hammer() -> None:
        while not stop.is_set():
            try:
                evaluation = sidecar.evaluate(PATH, {"x": 0})
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)
                return
            counts[0] += 1
            if evaluation.result["rev"] != evaluation.revision:
                mismatches.append((evaluation.result["rev"], evaluation.revision))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for bundle in bundles:
            sidecar.activate(bundle.data, bundle.revision)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors
    assert counts[0] > 0
    assert mismatches == []
    assert sidecar.revision() == "rev-race-2"


# --- lifecycle: nothing is left running -----------------------------------------------------------


def test_stop_leaves_no_opa_process(first_bundle: Any, signing_key: Any, opa_bin: Path) -> None:
    sc = ManagedSidecar(
        first_bundle.data, first_bundle.revision, signing_key.public_pem, signing_key.keyid, opa_bin=opa_bin
    ).start()
    pid = sc.pid
    assert pid is not None and _alive(pid)
    sc.stop()
    assert not _alive(pid)
    assert _opa_children() == []
    sc.stop()  # idempotent
    with pytest.raises(EngineUnavailableError, match="not running"):
        sc.evaluate(PATH, {"x": 1})


@pytest.mark.parametrize(("operator_gogc", "expected"), [(None, b"GOGC=200"), ("50", b"GOGC=50")])
def test_the_managed_opa_runs_with_a_lower_gc_cost_unless_the_operator_chose_one(
    first_bundle: Any,
    signing_key: Any,
    opa_bin: Path,
    monkeypatch: pytest.MonkeyPatch,
    operator_gogc: str | None,
    expected: bytes,
) -> None:
    if operator_gogc is None:
        monkeypatch.delenv("GOGC", raising=False)
    else:
        monkeypatch.setenv("GOGC", operator_gogc)
    with ManagedSidecar(
        first_bundle.data, first_bundle.revision, signing_key.public_pem, signing_key.keyid, opa_bin=opa_bin
    ) as sc:
        environ = Path(f"/proc/{sc.pid}/environ").read_bytes().split(b"\0")
        assert [e for e in environ if e.startswith(b"GOGC=")] == [expected]
        assert sc.evaluate(PATH, {"x": 1}).result["allow"] is True


def test_failed_start_leaves_no_opa_process(build_bundle: Any, signing_key: Any, opa_bin: Path) -> None:
    unsigned = build_bundle("rev-unsigned-start", signed=False)
    sc = ManagedSidecar(
        unsigned.data, unsigned.revision, signing_key.public_pem, signing_key.keyid, opa_bin=opa_bin
    )
    with pytest.raises(PolicyError, match="refused bundle revision 'rev-unsigned-start'"):
        sc.start()
    assert sc.pid is None
    assert _opa_children() == []


def _wrapped(bundle: Any, signing_key: Any, tmp_path: Path, script: str) -> ManagedSidecar:
    """A sidecar whose AGOV_OPA_BIN is a shell script running ``script``."""
    wrapper = tmp_path / "opa-wrapper"
    wrapper.write_text("#!/bin/sh\n" + script)
    wrapper.chmod(0o755)
    return ManagedSidecar(
        bundle.data,
        bundle.revision,
        signing_key.public_pem,
        signing_key.keyid,
        managed=ManagedConfig(startup_timeout_s=60),
        opa_bin=wrapper,
    )


def test_an_opa_binary_that_forks_opa_fails_at_once_saying_why(
    first_bundle: Any, signing_key: Any, opa_bin: Path, tmp_path: Path
) -> None:
    """A wrapper script that runs opa without `exec`: the process listening is not the one agov
    started, so no answer can be trusted. Start fails at once, not at the start deadline."""
    sc = _wrapped(
        first_bundle,
        signing_key,
        tmp_path,
        f'"{opa_bin}" "$@" &\nchild=$!\ntrap \'kill $child\' TERM INT\nwait $child\n',
    )
    started = time.monotonic()
    with pytest.raises(WrongListenerError, match=r"is not the OPA agov started") as refused:
        sc.start()
    assert "must `exec` opa" in refused.value.hint
    assert time.monotonic() - started < 30, "not the 60 s start deadline"
    sc.stop()
    assert sc.pid is None


def test_an_opa_forked_by_a_wrapper_is_stopped_with_it(
    first_bundle: Any, signing_key: Any, opa_bin: Path, tmp_path: Path
) -> None:
    """A wrapper that neither `exec`s opa nor passes a signal on: its opa would outlive it, as an
    orphan holding the socket, if only the wrapper were signalled. The sidecar's whole process
    group is."""
    forked = tmp_path / "forked.pid"
    sc = _wrapped(first_bundle, signing_key, tmp_path, f'"{opa_bin}" "$@" &\necho $! > "{forked}"\nwait\n')
    with pytest.raises(WrongListenerError):
        sc.start()
    sc.stop()
    pid = int(forked.read_text())
    assert _wait_gone(pid, 10), f"opa {pid}, forked by the wrapper, still runs"


def test_opa_death_is_reported_with_exit_code(sidecar: ManagedSidecar) -> None:
    pid = sidecar.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert _wait_gone(pid, 5)
    with pytest.raises(EngineUnavailableError, match="the OPA process died"):
        sidecar.evaluate(PATH, {"x": 1})
    with pytest.raises(EngineUnavailableError):
        sidecar.health()


def test_sidecar_outlives_the_thread_that_started_it(
    first_bundle: Any, signing_key: Any, opa_bin: Path
) -> None:
    # PR_SET_PDEATHSIG follows the forking *thread*: OPA must not die when a worker thread ends
    started: list[ManagedSidecar] = []
    sc = ManagedSidecar(
        first_bundle.data, first_bundle.revision, signing_key.public_pem, signing_key.keyid, opa_bin=opa_bin
    )
    worker = threading.Thread(target=lambda: started.append(sc.start()))
    worker.start()
    worker.join(30)
    try:
        assert started, "start() did not finish"
        time.sleep(0.5)
        assert sc.evaluate(PATH, {"x": 1}).result["allow"] is True
    finally:
        sc.stop()


_CHILD = """
import sys
from pathlib import Path
from agov.opa import ManagedSidecar
bundle, pub, revision, keyid, opa = sys.argv[1:6]
sc = ManagedSidecar(Path(bundle).read_bytes(), revision, Path(pub).read_text(), keyid, opa_bin=Path(opa))
sc.start()
print(sc.pid, flush=True)
sys.stdin.read()  # block until killed
"""


def test_opa_dies_with_a_sigkilled_parent(
    first_bundle: Any, signing_key: Any, opa_bin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    bundle = tmp_path / "bundle.tar.gz"
    bundle.write_bytes(first_bundle.data)
    pub = tmp_path / "pub.pem"
    pub.write_text(signing_key.public_pem)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CHILD,
            str(bundle),
            str(pub),
            first_bundle.revision,
            signing_key.keyid,
            str(opa_bin),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # the killed child cannot clean its temp dir
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip().isdigit(), (
            f"child did not start OPA: {line!r} {child.stderr.read() if child.stderr else ''}"
        )
        opa_pid = int(line)
        assert _alive(opa_pid)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        assert _wait_gone(opa_pid, 5), f"opa {opa_pid} outlived its SIGKILLed parent"
        # the killed child could not remove its working directory: the next start sweeps it
        left = sorted(tmp_path.glob("agov-opa-*"))
        assert len(left) == 1 and (left[0] / "opa-config.yaml").is_file()
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        with ManagedSidecar(
            first_bundle.data,
            first_bundle.revision,
            signing_key.public_pem,
            signing_key.keyid,
            opa_bin=opa_bin,
        ):
            now = sorted(tmp_path.glob("agov-opa-*"))
            assert not left[0].exists() and len(now) == 1, now
            assert sweep_orphaned_dirs(tmp_path) == []  # its own directory is locked while it runs
        assert not now[0].exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)


# --- external sidecar over mTLS -------------------------------------------------------------------


def _pki(directory: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("agov test CA"))
        .issuer_name(name("agov test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": directory / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, usage in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(f"agov {role}"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if role == "server":
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        out[f"{role}_cert"] = directory / f"{role}.pem"
        out[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{role}_key"] = write_key(key, directory / f"{role}.key")
    return out


def test_external_sidecar_over_mtls(
    first_bundle: Any, signing_key: Any, opa_bin: Path, tmp_path: Path
) -> None:
    import socket

    pki = _pki(tmp_path)
    (tmp_path / "agov.tar.gz").write_bytes(first_bundle.data)
    (tmp_path / "pub.pem").write_text(signing_key.public_pem)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            str(opa_bin),
            "run",
            "--server",
            "--addr",
            f"127.0.0.1:{port}",
            "--log-level",
            "error",
            "--skip-version-check",
            "--authentication",
            "tls",
            "--tls-cert-file",
            str(pki["server_cert"]),
            "--tls-private-key-file",
            str(pki["server_key"]),
            "--tls-ca-cert-file",
            str(pki["ca"]),
            "--verification-key",
            "pub.pem",
            "--verification-key-id",
            signing_key.keyid,
            "--signing-alg",
            "ES256",
            "-b",
            "agov.tar.gz",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"https://127.0.0.1:{port}"
    # `opa run -b FILE` names the bundle after the path it was given
    config = EvaluatorConfig(timeout_s=2.0, bundle_name="agov.tar.gz")
    mtls = ConnectionConfig(
        url=url, ca_file=pki["ca"], client_cert=pki["client_cert"], client_key=pki["client_key"]
    )
    try:
        with ExternalSidecar(mtls, config) as external:
            deadline = time.monotonic() + 15
            while True:
                try:
                    external.health()
                    break
                except EngineUnavailableError:
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                    assert time.monotonic() < deadline, "OPA over TLS never became healthy"
                    time.sleep(0.05)
            evaluation = external.evaluate(PATH, {"x": 1}, expected_revision="rev-1")
            assert evaluation.result == {"allow": True, "rev": "rev-1"}
            assert external.revision() == "rev-1"

        no_client_cert = ConnectionConfig(url=url, ca_file=pki["ca"])
        with (
            ExternalSidecar(no_client_cert, config) as anonymous,
            pytest.raises(EngineUnavailableError, match=r"TLS with OPA .* failed"),
        ):
            anonymous.evaluate(PATH, {"x": 1})

        untrusted_server = ConnectionConfig(
            url=url, client_cert=pki["client_cert"], client_key=pki["client_key"]
        )
        with (
            ExternalSidecar(untrusted_server, config) as wrong_ca,
            pytest.raises(EngineUnavailableError, match=r"TLS with OPA .* failed"),
        ):
            wrong_ca.evaluate(PATH, {"x": 1})
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_ctrl_c_while_opa_is_stopped_still_removes_its_directory(
    first_bundle: Any, signing_key: Any, opa_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: an interruption while waiting for OPA to exit skipped the removal of its temp
    directory (config, stderr), which only the next agov command swept."""
    sidecar = ManagedSidecar(
        first_bundle.data, first_bundle.revision, signing_key.public_pem, signing_key.keyid, opa_bin=opa_bin
    )
    sidecar.start()
    pid, directory = sidecar.pid, sidecar._tmp
    assert directory is not None and directory.is_dir()
    kill = sidecar._kill_process

    def interrupted_after_the_signal() -> None:
        kill()
        raise KeyboardInterrupt

    monkeypatch.setattr(sidecar, "_kill_process", interrupted_after_the_signal)
    with pytest.raises(KeyboardInterrupt):
        sidecar.stop()
    assert not directory.exists()
    assert pid is not None and _wait_gone(pid, within_s=5)
