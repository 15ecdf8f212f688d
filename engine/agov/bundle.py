"""Build signed OPA bundles from a policy tree (adapter over the ``opa`` binary).

The policy hash is computed from the files that go into the bundle, then handed to
``opa build`` as the ``.manifest`` revision, so OPA reports exactly that hash in provenance,
status and decision logs. Signing is OPA's own (ES256 JWT in ``.signatures.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agov.errors import PolicyError
from agov.hashing import policy_hash
from agov.opa.binary import opa_version

BUNDLE_ROOT = "agov"
AGREEMENT_TESTS = "*_agreement_test.rego"
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


def _start(cmd: Sequence[str], cwd: Path | None = None) -> subprocess.Popen[str]:
    try:
        return subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    except OSError as exc:
        raise PolicyError(
            f"cannot run {cmd[0]}: {exc.strerror}", hint="run `make tools` or set AGOV_OPA_BIN"
        ) from exc


def _finish(
    opa: Path, proc: subprocess.Popen[str], what: str, deadline: float, shown_as: dict[str, str]
) -> None:
    """Wait for one step; its failure is a refused policy, unless opa itself does not work.

    ``shown_as`` maps the snapshot's directories to the user's tree, so that an error names
    the file the user edits rather than a temporary copy of it.

    Raises:
        PolicyError: the step failed or timed out.
        EngineUnavailableError: the opa binary does not run at all.
    """
    try:
        out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        raise PolicyError(f"{what} timed out") from exc
    if proc.returncode != 0:
        detail = (out + err).strip()
        if not detail:
            opa_version(opa)  # silent failure: check the binary runs at all
        for copy, original in shown_as.items():
            detail = detail.replace(copy, original)
        raise PolicyError(f"{what} failed:\n{detail}", hint="fix the policy; the active one stays in force")


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(root).parts)
    }


def _stable_copy(source: Path, target: Path, attempts: int = 5) -> None:
    """Copy a tree an editor may be writing to; retry until a copy matches the source.

    Raises:
        PolicyError: the tree kept changing while it was copied.
    """
    for attempt in range(attempts):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", ".*"))
        if _tree(target) == _tree(source):
            return
        time.sleep(0.05 * (attempt + 1))
    raise PolicyError(f"{source} kept changing while it was read", hint="save the files, then reload")


def check_and_build(
    opa: Path,
    policies_root: Path,
    out_dir: Path,
    *,
    signing_key: Path,
    timeout_s: float = 120.0,
) -> BuiltBundle:
    """Check, test, build and sign one snapshot of the policy tree.

    ``opa check --strict``, ``opa test`` and ``opa build`` (revision = policy hash, ES256
    signature) run side by side on the same copy of the tree, so all three judge the same bytes
    even while an editor is still writing; the bundle lands in ``out_dir`` only when all pass.

    Raises:
        PolicyError: the tree is empty, does not compile, a test fails, or the build failed.
        EngineUnavailableError: the opa binary does not run.
    """
    with tempfile.TemporaryDirectory(prefix="agov-bundle-") as tmp:
        snapshot = Path(tmp) / "policies"
        _stable_copy(policies_root, snapshot)
        files = bundle_files(snapshot)
        digest = policy_hash(files)
        stage = Path(tmp) / "stage"
        for rel, content in files:
            dest = stage / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(content)
        (stage / ".manifest").write_text(json.dumps({"roots": [BUNDLE_ROOT], "rego_version": 1}))
        partial = Path(tmp) / "bundle.tar.gz"
        schemas = snapshot / "schemas"
        schema_args = ["-s", str(schemas)] if schemas.is_dir() else []
        opa = opa.resolve()  # the build runs in the stage directory
        steps: list[tuple[str, list[str], Path | None]] = [
            ("opa check --strict", [str(opa), "check", "--strict", *schema_args, str(snapshot)], None),
            # --ignore schemas: the schema files are JSON and would otherwise load as data.
            # *_agreement_test.rego: exhaustive cross-checks that `make test` runs; skipped here so
            # that a saved policy reaches the sidecar in well under a second.
            (
                "opa test",
                [
                    str(opa),
                    "test",
                    "--timeout",
                    f"{int(timeout_s)}s",
                    "--ignore",
                    "schemas",
                    "--ignore",
                    AGREEMENT_TESTS,
                    *schema_args,
                    str(snapshot),
                ],
                None,
            ),
            (
                "opa build",
                [
                    str(opa),
                    "build",
                    "-b",
                    ".",  # from the stage, so the bundle's files are agov/..., not a temporary path
                    "-r",
                    digest,
                    "-o",
                    str(partial),
                    "--signing-key",
                    str(signing_key.resolve()),
                    "--signing-alg",
                    "ES256",
                ],
                stage,
            ),
        ]
        running: list[tuple[str, subprocess.Popen[str]]] = []
        try:
            for what, cmd, cwd in steps:
                running.append((what, _start(cmd, cwd)))
            deadline = time.monotonic() + timeout_s
            for what, proc in running:  # report the first failing step in this order
                _finish(
                    opa,
                    proc,
                    what,
                    deadline,
                    {str(snapshot): str(policies_root), str(stage): str(policies_root)},
                )
        finally:
            for _what, proc in running:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        content = partial.read_bytes()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{digest}.tar.gz"
    tmp_target = out_dir / f".{digest}.tar.gz.tmp"
    tmp_target.write_bytes(content)
    os.replace(tmp_target, target)
    return BuiltBundle(policy_hash=digest, path=target, content=content)
