"""Build signed OPA bundles from a policy tree (adapter over the ``opa`` binary).

The policy hash is computed from the files that go into the bundle, then handed to
``opa build`` as the ``.manifest`` revision, so OPA reports exactly that hash in provenance,
status and decision logs. Signing is OPA's own (ES256 JWT in ``.signatures.json``).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agov.errors import PolicyError
from agov.hashing import policy_hash
from agov.opa.binary import opa_version

BUNDLE_ROOT = "agov"
_DATA_FILES = frozenset({"data.json", "data.yaml", "data.yml"})


@dataclass(frozen=True)
class BuiltBundle:
    policy_hash: str
    path: Path
    content: bytes


def bundle_files(policies_root: Path) -> list[tuple[str, bytes]]:
    """The files that make up the bundle: non-test Rego and data files under ``agov/``.

    Tests and schemas stay out: they do not change a decision, and schemas live outside the
    bundle's ``agov`` root.

    Raises:
        PolicyError: there is no ``agov/`` package tree, or it holds no Rego.
    """
    base = policies_root / BUNDLE_ROOT
    if not base.is_dir():
        raise PolicyError(f"{base} does not exist", hint="a policy tree has packages under agov/")
    files: list[tuple[str, bytes]] = []
    for path in sorted(base.rglob("*")):
        if not path.is_file():
            continue
        name = path.name
        if (name.endswith(".rego") and not name.endswith("_test.rego")) or name in _DATA_FILES:
            files.append((path.relative_to(policies_root).as_posix(), path.read_bytes()))
    if not any(p.endswith(".rego") for p, _ in files):
        raise PolicyError(f"no Rego policies under {base}")
    return files


def compute_policy_hash(policies_root: Path) -> str:
    """The policy hash of a tree: the same content gives the same hash, wherever it lives."""
    return policy_hash(bundle_files(policies_root))


def _run(cmd: Sequence[str], what: str, *, timeout: float = 120.0) -> str:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise PolicyError(f"cannot run {cmd[0]}", hint="run `make tools` or set AGOV_OPA_BIN") from exc
    except subprocess.TimeoutExpired as exc:
        raise PolicyError(f"{what} timed out after {timeout:.0f}s") from exc
    if proc.returncode != 0:
        detail = (proc.stdout + proc.stderr).strip()
        if not detail:
            opa_version(Path(cmd[0]))  # says nothing? then check the binary works at all (raises if not)
        raise PolicyError(f"{what} failed:\n{detail}", hint="fix the policy; the active one stays in force")
    return proc.stdout


def check_policies(opa: Path, policies_root: Path) -> None:
    """Refuse a policy tree that does not compile strictly or whose tests fail.

    Raises:
        PolicyError: ``opa check --strict`` or ``opa test`` failed; the message has OPA's output.
    """
    schemas = policies_root / "schemas"
    schema_args = ["-s", str(schemas)] if schemas.is_dir() else []
    _run([str(opa), "check", "--strict", *schema_args, str(policies_root)], "opa check --strict")
    # --ignore schemas: the schema files are JSON and would otherwise load as data.
    _run([str(opa), "test", "--ignore", "schemas", *schema_args, str(policies_root)], "opa test")


def build_bundle(
    opa: Path,
    policies_root: Path,
    out_dir: Path,
    *,
    signing_key: Path,
) -> BuiltBundle:
    """Stage the bundle files, run ``opa build`` with revision = policy hash, and sign it.

    Raises:
        PolicyError: the tree is empty, or ``opa build`` failed.
    """
    files = bundle_files(policies_root)
    digest = policy_hash(files)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{digest}.tar.gz"
    with tempfile.TemporaryDirectory(prefix="agov-bundle-") as tmp:
        stage = Path(tmp) / "stage"
        for rel, content in files:
            dest = stage / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(content)
        (stage / ".manifest").write_text(json.dumps({"roots": [BUNDLE_ROOT], "rego_version": 1}))
        partial = Path(tmp) / "bundle.tar.gz"
        _run(
            [
                str(opa),
                "build",
                "-b",
                str(stage),
                "-r",
                digest,
                "-o",
                str(partial),
                "--signing-key",
                str(signing_key),
                "--signing-alg",
                "ES256",
            ],
            "opa build",
        )
        content = partial.read_bytes()
        tmp_target = out_dir / f".{digest}.tar.gz.tmp"
        tmp_target.write_bytes(content)
        os.replace(tmp_target, target)
    return BuiltBundle(policy_hash=digest, path=target, content=content)
