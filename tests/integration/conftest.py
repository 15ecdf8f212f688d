"""Shared fixtures for tests against a real OPA: the binary, ES256 keys, signed bundles, a sidecar.

Tests that need OPA skip when no binary is found, unless ``AGOV_REQUIRE_OPA`` is set (as
``make test`` does): then a missing binary is a failure, so CI cannot go green by skipping.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agov.opa import EvaluatorConfig, ManagedConfig, ManagedSidecar

TEST_KEYID = "agov-test-bundle-key"

# A tiny policy under the agov root. `rev` names the bundle that answered, so a test can
# check that the revision OPA reports is the one that produced the result.
POLICY_TEMPLATE = """package agov.test

default allow := false

allow if input.x == {allowed_x}

decision := {{"allow": allow, "rev": "{revision}"}}

not_a_bool := {{"allow": "true"}}

_deny contains "expired" if time.parse_rfc3339_ns(input.expires) < 0

checked := {{"allow": count(_deny) == 0}}
"""


@dataclass(frozen=True)
class SigningKey:
    """An ES256 key pair on disk, as ``opa build --signing-key`` wants it."""

    private_pem_path: Path
    public_pem: str
    keyid: str


@dataclass(frozen=True)
class BuiltBundle:
    """A bundle tarball and the revision written into its manifest."""

    data: bytes
    revision: str


BundleFactory = Callable[..., BuiltBundle]


def _make_key(directory: Path, name: str, keyid: str) -> SigningKey:
    private = ec.generate_private_key(ec.SECP256R1())
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.pem"
    # PKCS#8 PEM: what `opa build --signing-key --signing-alg ES256` reads (SEC1 works too)
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return SigningKey(path, public.decode("ascii"), keyid)


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    """The key the sidecars trust."""
    return _make_key(tmp_path_factory.mktemp("keys"), "trusted", TEST_KEYID)


@pytest.fixture(scope="session")
def foreign_key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    """A key nobody trusts, even though it claims the trusted key id."""
    return _make_key(tmp_path_factory.mktemp("keys"), "foreign", TEST_KEYID)


@pytest.fixture(scope="session")
def build_bundle(
    opa_bin: Path, signing_key: SigningKey, tmp_path_factory: pytest.TempPathFactory
) -> BundleFactory:
    """``build_bundle(revision, allowed_x=1, key=signing_key, signed=True) -> BuiltBundle``.

    Runs the real ``opa build`` (``-r`` sets the revision, ``--signing-key`` signs with ES256;
    ``--verification-key-id`` only names the key in the JWT, OPA verifies with the configured
    ``signing.keyid`` whatever the JWT says). Note: ``--verification-key`` at build time
    means "verify the *input* bundle", so it must not be passed when building from source.
    """

    def build(
        revision: str, allowed_x: int = 1, *, key: SigningKey | None = None, signed: bool = True
    ) -> BuiltBundle:
        root = tmp_path_factory.mktemp("bundle-src")
        src = root / "src"
        (src / "agov" / "test").mkdir(parents=True)
        (src / "agov" / "test" / "policy.rego").write_text(
            POLICY_TEMPLATE.format(allowed_x=allowed_x, revision=revision)
        )
        (src / ".manifest").write_text(json.dumps({"roots": ["agov"], "rego_version": 1}))
        out = root / "bundle.tar.gz"
        argv = [str(opa_bin), "build", "-b", "src", "-r", revision, "-o", str(out)]
        if signed:
            k = key or signing_key
            argv += [
                "--signing-key",
                str(k.private_pem_path),
                "--signing-alg",
                "ES256",
                "--verification-key-id",
                k.keyid,
            ]
        proc = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, f"opa build failed: {proc.stderr}"
        return BuiltBundle(out.read_bytes(), revision)

    return build


def tamper_bundle(data: bytes, member_suffix: str, old: bytes, new: bytes) -> bytes:
    """Rewrite one file inside a built (signed) bundle, keeping its signature as it was."""
    out = io.BytesIO()
    hit = False
    with (
        tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as src,
        tarfile.open(fileobj=out, mode="w:gz") as dst,
    ):
        for member in src.getmembers():
            f = src.extractfile(member)
            content = f.read() if f is not None else b""
            if member.name.endswith(member_suffix):
                assert old in content, f"{old!r} not in {member.name}"
                content = content.replace(old, new)
                hit = True
            member.size = len(content)
            dst.addfile(member, io.BytesIO(content))
    assert hit, f"no member ending in {member_suffix}"
    return out.getvalue()


@pytest.fixture(scope="session")
def tamper() -> Callable[[bytes, str, bytes, bytes], bytes]:
    """:func:`tamper_bundle`, as a fixture (test modules do not import conftest)."""
    return tamper_bundle


@pytest.fixture(scope="session")
def first_bundle(build_bundle: BundleFactory) -> BuiltBundle:
    return build_bundle("rev-1", allowed_x=1)


@pytest.fixture
def sidecar(first_bundle: BuiltBundle, signing_key: SigningKey, opa_bin: Path) -> Iterator[ManagedSidecar]:
    """A started managed sidecar serving ``first_bundle``; stopped after the test."""
    with ManagedSidecar(
        first_bundle.data,
        first_bundle.revision,
        signing_key.public_pem,
        signing_key.keyid,
        EvaluatorConfig(timeout_s=2.0),
        managed=ManagedConfig(decision_log_min_delay_s=1, decision_log_max_delay_s=1),
        opa_bin=opa_bin,
    ) as running:
        yield running
