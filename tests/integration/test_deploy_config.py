"""The shipped ``opa-config.yaml`` on a real ``opa run --server``: it activates the bundle that
``agov policy build`` signed, reports the policy hash as the revision, and refuses a bundle that
is unsigned or altered after signing (reliability row R15); and `agov --opa-url` decides with
such a sidecar."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agov.bundle import compute_policy_hash
from agov.opa import BundleServer, find_opa
from agov.opa.bundle_server import BundleServerConfig

REPO = Path(__file__).resolve().parents[2]
TOKEN = "deploy-config-test-token"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _agov(home: Path, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "agov.cli", *args, "--home", str(home), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return dict(json.loads(out.stdout))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, opa_bin: Path) -> Path:
    home = tmp_path_factory.mktemp("deploy") / "ws"
    _agov(home, "init")
    return home


class Sidecar:
    """A plain ``opa run --server`` on the repository's opa-config.yaml, as a deployment runs it."""

    def __init__(self, home: Path, server: BundleServer, unix_socket: Path | None = None) -> None:
        self.port = _free_port()
        env = {**os.environ, "AGOV_BUNDLE_SERVICE_URL": server.url, "AGOV_BUNDLE_TOKEN": TOKEN}
        # the loopback port for the test's own probes; agov may use the socket
        also = ["--addr", f"unix://{unix_socket}"] if unix_socket is not None else []
        self.proc = subprocess.Popen(
            [
                str(find_opa()),
                "run",
                "--server",
                "--addr",
                f"127.0.0.1:{self.port}",
                *also,
                "--skip-version-check",
                "--config-file",
                str(REPO / "opa-config.yaml"),
                "--set-file",
                f"keys.agov-bundle.key={home / 'keys' / 'bundle-signing.es256.pub'}",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as reply:
                return reply.status, json.loads(reply.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, {}

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=2) as reply:
            return dict(json.loads(reply.read()))

    def wait_ready(self, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.get("/health?bundles")[0] == 200:
                    return True
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.05)
        return False

    def revision(self) -> str | None:
        reply = self.post("/v1/data/agov/promotion?provenance=true", {"input": {}})
        bundles = reply.get("provenance", {}).get("bundles", {})
        return bundles.get("agov", {}).get("revision")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def serve(workspace: Path) -> Iterator[Any]:
    started: list[tuple[BundleServer, Sidecar]] = []

    def start(bundle: bytes, revision: str, unix_socket: Path | None = None) -> tuple[BundleServer, Sidecar]:
        server = BundleServer(BundleServerConfig(token=TOKEN))
        server.publish(bundle, revision)
        sidecar = Sidecar(workspace, server, unix_socket)
        started.append((server, sidecar))
        return server, sidecar

    yield start
    for server, sidecar in started:
        sidecar.stop()
        server.close()


def _built(workspace: Path) -> tuple[str, bytes]:
    result = _agov(workspace, "policy", "build")
    return result["hash"], Path(result["bundle_path"]).read_bytes()


def test_revision_reported_by_opa_is_the_policy_hash_agov_printed(workspace: Path, serve: Any) -> None:
    policy_hash, bundle = _built(workspace)
    assert policy_hash == compute_policy_hash(workspace / "policies")
    _server, sidecar = serve(bundle, policy_hash)
    assert sidecar.wait_ready(), sidecar.proc.stderr
    assert sidecar.revision() == policy_hash
    decision = sidecar.post("/v1/data/agov/promotion/decision", {"input": {}})["result"]
    assert decision["allow"] is False and decision["deny"], "an empty input must be denied"


def _rewrite(bundle: bytes, edit: Any) -> bytes:
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(bundle), mode="r:gz") as src,
        tarfile.open(fileobj=out, mode="w:gz") as dst,
    ):
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else b""  # type: ignore[union-attr]
            replaced = edit(member.name, data)
            if replaced is None:
                continue
            member.size = len(replaced)
            dst.addfile(member, io.BytesIO(replaced))
    return out.getvalue()


def test_r15_bundle_altered_after_signing_is_not_activated(workspace: Path, serve: Any) -> None:
    policy_hash, bundle = _built(workspace)

    def loosen(name: str, data: bytes) -> bytes:
        return (
            data.replace(b"default allow := false", b"default allow := true")
            if name.endswith("promotion/promotion.rego")
            else data
        )

    altered = _rewrite(bundle, loosen)
    assert altered != bundle
    _server, sidecar = serve(altered, policy_hash)
    assert not sidecar.wait_ready(timeout=4), "OPA activated a bundle altered after signing"
    reply = sidecar.post("/v1/data/agov/promotion/decision", {"input": {}})
    assert "result" not in reply, "no bundle may answer"
    print("R15 altered bundle: activated 0/1")


def test_r15_unsigned_bundle_is_not_activated(workspace: Path, serve: Any) -> None:
    policy_hash, bundle = _built(workspace)
    unsigned = _rewrite(bundle, lambda name, data: None if name.endswith(".signatures.json") else data)
    _server, sidecar = serve(unsigned, policy_hash)
    assert not sidecar.wait_ready(timeout=4), "OPA activated an unsigned bundle"
    assert "result" not in sidecar.post("/v1/data/agov/promotion/decision", {"input": {}})
    print("R15 unsigned bundle: activated 0/1")


def test_policy_hash_is_deterministic_and_any_rego_byte_changes_it(workspace: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(workspace / "policies", copy)
    original = compute_policy_hash(workspace / "policies")
    assert compute_policy_hash(copy) == original, "same content, other place: same hash"
    target = copy / "agov" / "admission" / "admission.rego"
    content = target.read_bytes()
    for index in range(0, len(content), max(1, len(content) // 64)):
        changed = bytearray(content)
        changed[index] ^= 0x20
        target.write_bytes(bytes(changed))
        assert compute_policy_hash(copy) != original, f"byte {index} changed without changing the hash"
    target.write_bytes(content)
    assert compute_policy_hash(copy) == original
    (copy / "agov" / "admission" / "extra_test.rego").write_text("package agov.admission_test\n")
    assert compute_policy_hash(copy) == original, "tests are not part of the bundle"


def _cli_process(home: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agov.cli", *args, "--home", str(home), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _cli(home: Path, *args: str, env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    out = _cli_process(home, *args, env=env)
    return out.returncode, json.loads(out.stdout or out.stderr)


def test_the_cli_decides_with_the_deployed_sidecar_named_by_opa_url(workspace: Path, serve: Any) -> None:
    policy_hash, bundle = _built(workspace)
    _server, sidecar = serve(bundle, policy_hash)
    assert sidecar.wait_ready(), sidecar.proc.stderr
    url = f"http://127.0.0.1:{sidecar.port}"
    _agov(workspace, "agent", "create", "--template", "research-analyst", "--id", "deployed-runner")
    # No opa binary agov could start: every decision below is the deployed sidecar's. The
    # variable naming another (dead) sidecar loses to the command line.
    env = {**os.environ, "AGOV_OPA_BIN": str(workspace / "no-such-opa"), "AGOV_OPA_URL": "http://127.0.0.1:1"}

    code, promoted = _cli(
        workspace, "promote", "deployed-runner", "--role", "agent_admin", "--opa-url", url, env=env
    )
    assert (code, promoted["allow"], promoted["status"]) == (0, True, "GOVERNED_VALID"), promoted
    assert promoted["policy_hash"] == policy_hash
    code, admitted = _cli(workspace, "admit", "deployed-runner", "--opa-url", url, env=env)
    assert (code, admitted["code"], admitted["policy_hash"]) == (0, "ADMISSION_ALLOW", policy_hash), admitted
    assert admitted["decision_id"], "the sidecar logs decisions (opa-config.yaml), so each one has an id"

    # without the option, the workspace's managed runtime is used: here it cannot start
    code, managed = _cli(workspace, "admit", "deployed-runner", env=env)
    assert (code, managed["code"]) == (1, "ADMISSION_DENY_ENGINE_UNAVAILABLE"), managed

    sidecar.stop()
    code, gone = _cli(workspace, "admit", "deployed-runner", "--opa-url", url, env=env)
    assert (code, gone["code"]) == (1, "ADMISSION_DENY_ENGINE_UNAVAILABLE"), gone
    assert url in gone["reasons"][0]["message"], gone


def test_agov_opa_url_alone_leaves_the_managed_runtime_in_charge_and_says_so(workspace: Path) -> None:
    """AGOV_OPA_URL is read under `runtime: external` only; under managed, a start is decided by
    agov's own OPA, with a warning on stderr naming the ignored URL."""
    _agov(workspace, "agent", "create", "--template", "research-analyst", "--id", "managed-runner")
    env = {**os.environ, "AGOV_OPA_URL": "http://127.0.0.1:1"}  # nothing listens there
    out = _cli_process(workspace, "admit", "managed-runner", env=env)
    admitted = json.loads(out.stdout)
    assert (out.returncode, admitted["code"], admitted["status"]) == (0, "ADMISSION_ALLOW", "SANDBOX"), out
    assert "AGOV_OPA_URL is set (http://127.0.0.1:1)" in out.stderr, out.stderr
    assert "runtime: external" in out.stderr, out.stderr

    env.pop("AGOV_OPA_URL")
    quiet = _cli_process(workspace, "admit", "managed-runner", env=env)
    assert quiet.returncode == 0 and "AGOV_OPA_URL" not in quiet.stderr, quiet


def test_a_reload_under_managed_says_agov_opa_url_goes_unused(tmp_path: Path, opa_bin: Path) -> None:
    """A reload starts agov's own OPA as well (to switch it to the new policy): it warns too."""
    home = tmp_path / "ws"
    _agov(home, "init")
    limits = home / "policies" / "agov" / "config" / "data.json"
    config = json.loads(limits.read_text())
    config["temperature_limits"]["analysis"] = 0.6
    limits.write_text(json.dumps(config))
    out = _cli_process(
        home, "policy", "reload", "--reason", "x", env={**os.environ, "AGOV_OPA_URL": "http://127.0.0.1:1"}
    )
    assert out.returncode == 0 and json.loads(out.stdout)["changed"] is True, out
    assert out.stderr.count("AGOV_OPA_URL is set (http://127.0.0.1:1)") == 1, out.stderr


def test_the_cli_decides_with_a_deployed_sidecar_on_a_unix_socket(
    workspace: Path, serve: Any, tmp_path: Path
) -> None:
    """`--opa-url unix:///path` (or AGOV_OPA_URL): OPA's own notation for `--addr`."""
    policy_hash, bundle = _built(workspace)
    socket_path = tmp_path / "opa.sock"
    _server, sidecar = serve(bundle, policy_hash, socket_path)
    assert sidecar.wait_ready(), sidecar.proc.stderr
    assert socket_path.is_socket()
    _agov(workspace, "agent", "create", "--template", "research-analyst", "--id", "socket-runner")
    # no opa binary agov could start, and no port: every decision is the socket's sidecar's
    env = {**os.environ, "AGOV_OPA_BIN": str(workspace / "no-such-opa")}
    url = f"unix://{socket_path}"

    code, promoted = _cli(
        workspace, "promote", "socket-runner", "--role", "agent_admin", "--opa-url", url, env=env
    )
    assert (code, promoted["allow"], promoted["policy_hash"]) == (0, True, policy_hash), promoted
    code, admitted = _cli(workspace, "admit", "socket-runner", "--opa-url", url, env=env)
    assert (code, admitted["code"], admitted["policy_hash"]) == (0, "ADMISSION_ALLOW", policy_hash), admitted
    assert admitted["decision_id"]

    sidecar.stop()  # OPA removes its socket as it exits
    code, gone = _cli(workspace, "admit", "socket-runner", "--opa-url", url, env=env)
    assert (code, gone["code"]) == (1, "ADMISSION_DENY_ENGINE_UNAVAILABLE"), gone
    assert f"unix:{socket_path}" in gone["reasons"][0]["message"], gone

    for bad in ("unix://relative/opa.sock", "unix:opa.sock", "unix:///"):
        code, refused = _cli(workspace, "admit", "socket-runner", "--opa-url", bad, env=env)
        assert code == 1 and refused["code"] == "ADMISSION_DENY_ENGINE_UNAVAILABLE", (bad, refused)
        assert "is not unix:// and an absolute socket path" in refused["reasons"][0]["message"], (
            bad,
            refused,
        )


def test_opa_url_is_refused_by_commands_that_run_their_own_opa(tmp_path: Path) -> None:
    for args in (("init", str(tmp_path / "ws")), ("demo",)):
        code, error = _cli(tmp_path, *args, "--opa-url", "http://127.0.0.1:8181", env=dict(os.environ))
        assert code == 2, error
        assert "--opa-url does not apply" in error["error"]["message"], error
    assert not (tmp_path / "ws").exists(), "nothing is created"


def test_opa_url_takes_no_credentials_from_agov_yaml(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """agov.yaml's token and TLS files belong to its own opa_url: a URL given on the command
    line never receives them, only what the AGOV_OPA_* variables say."""
    from agov.engine import Engine

    home = tmp_path / "ws"
    shutil.copytree(workspace, home)
    config = (home / "agov.yaml").read_text()
    for key, value in (
        ("runtime", "external"),
        ("opa_url", "https://configured-sidecar:8181"),
        ("opa_token", "token-for-the-configured-sidecar"),
        ("opa_ca_file", str(tmp_path / "ca.pem")),
    ):
        config, found = re.subn(rf"^{key}: .*$", f"{key}: {value}", config, flags=re.M)
        assert found == 1, key
    (home / "agov.yaml").write_text(config)
    (tmp_path / "ca.pem").write_bytes(_self_signed_pem())
    for name in (
        "AGOV_OPA_URL",
        "AGOV_OPA_TOKEN",
        "AGOV_OPA_CA_FILE",
        "AGOV_OPA_CLIENT_CERT",
        "AGOV_OPA_CLIENT_KEY",
    ):
        monkeypatch.delenv(name, raising=False)

    def connection(**kwargs: Any) -> Any:
        with Engine.open(home, **kwargs) as engine:
            return engine.evaluator().connection  # built, not connected

    configured = connection()
    assert (configured.url, configured.token) == (
        "https://configured-sidecar:8181",
        "token-for-the-configured-sidecar",
    )
    assert configured.ca_file == tmp_path / "ca.pem"
    named = connection(opa_url="http://127.0.0.1:9")
    assert (named.url, named.token, named.ca_file) == ("http://127.0.0.1:9", None, None)
    monkeypatch.setenv("AGOV_OPA_TOKEN", "token-from-the-environment")
    assert connection(opa_url="http://127.0.0.1:9").token == "token-from-the-environment"


def _self_signed_pem() -> bytes:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)
