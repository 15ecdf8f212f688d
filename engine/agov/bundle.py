"""Build signed OPA bundles from a policy tree (adapter over the ``opa`` binary).

The policy hash is computed from the files that go into the bundle, then handed to
``opa build`` as the ``.manifest`` revision, so OPA reports exactly that hash in provenance,
status and decision logs. Signing is OPA's own (ES256 JWT in ``.signatures.json``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agov import interrupts
from agov.errors import PolicyError
from agov.hashing import policy_hash
from agov.opa.binary import opa_version, pdeathsig_preexec
from agov.spec import ambiguous_keys
from agov.tempdirs import claimed_tempdir

BUNDLE_ROOT = "agov"
AGREEMENT_TESTS = "*_agreement_test.rego"
_TEST_STEP = "opa test"
_PASSED_TESTS = re.compile(r"^PASS: [1-9][0-9]*/", re.MULTILINE)  # opa test's summary line
_DATA_FILES = frozenset({"data.json", "data.yaml", "data.yml"})


@dataclass(frozen=True)
class Trial:
    """A query the candidate must answer, on input from the live system, before it may go live.

    ``opa test`` judges the policy on the author's cases; a trial runs it on real input, as the
    sidecar would (``opa eval --strict-builtin-errors``), so that a policy whose evaluation fails
    there (a builtin error, a conflict, an undefined result) is refused while the old one is
    still in force, instead of going live and failing every decision closed."""

    what: str  # for messages: "the first chunk of governed agents"
    query: str  # a rule path, "agov/revalidation/results": it must give an object
    input_for: Callable[[str], bytes | None]  # the input, given the candidate's hash; None: none to try
    # as long as the sidecar is given for the same query (the trial also evaluates failures_rule)
    timeout_s: float
    # a rule path whose value lists (as strings) what the policy finds wrong with its own answers on
    # this input: the candidate is refused unless it is empty; a policy without the rule has none
    failures_rule: str | None = None


@dataclass(frozen=True)
class BuiltBundle:
    policy_hash: str
    path: Path
    content: bytes


def bundle_files(policies_root: Path) -> list[tuple[str, bytes]]:
    """The files that make up the bundle: non-test Rego and data files under ``agov/``.

    Tests and schemas stay out: they do not change a decision, and schemas live outside the
    bundle's ``agov`` root. Hidden files and directories (editor swap files) are not read.

    Raises:
        PolicyError: there is no ``agov/`` package tree, it holds no Rego, or a file that
            ``opa test`` would load is one the sidecar would never see (see ``_unshipped``).
    """
    base = policies_root / BUNDLE_ROOT
    if not base.is_dir():
        raise PolicyError(f"{base} does not exist", hint="a policy tree has packages under agov/")
    files: list[tuple[str, bytes]] = []
    for rel in _files(policies_root):
        problem = _unshipped(rel)
        if problem:
            raise PolicyError(f"{policies_root / rel}: {problem}", hint=_UNSHIPPED_HINT)
        name = rel.rsplit("/", 1)[-1]
        if not rel.startswith(f"{BUNDLE_ROOT}/"):
            continue
        if name.endswith("_test.rego"):
            problem = _untested_rules(policies_root / rel)
            if problem:
                raise PolicyError(f"{policies_root / rel}: {problem}", hint=_UNSHIPPED_HINT)
            continue
        if name.endswith(".rego") or name in _DATA_FILES:
            content = (policies_root / rel).read_bytes()
            if name in _DATA_FILES:
                _refuse_ambiguous_data(policies_root / rel, content)
            files.append((rel, content))
    if not any(p.endswith(".rego") for p, _ in files):
        raise PolicyError(f"no Rego policies under {base}")
    return files


def _refuse_ambiguous_data(path: Path, content: bytes) -> None:
    """A data file its reviewer and OPA could read two ways: a key repeated in one mapping (the
    reviewer sees the first value, OPA uses the last), a merge key or alias, bytes that are not
    UTF-8 (OPA reads each as U+FFFD, so two keys can become one). Other faults are left to
    ``opa test``, which names them.

    Raises:
        PolicyError: one of those.
    """
    hint = "write each key once, as plain UTF-8; the active policy stays in force"
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path} is not UTF-8: {exc}", hint=hint) from None
    problem = ambiguous_keys(text)
    if problem:
        raise PolicyError(f"{path}: {problem}", hint=hint)


_LOADED_BY_OPA = (".rego", ".json", ".yaml", ".yml")
_UNSHIPPED_HINT = "the active policy stays in force; `opa test` must judge exactly what the sidecar runs"


def _unshipped(rel: str) -> str:
    """Why ``opa check`` and ``opa test`` on the tree would load this file while the bundle
    leaves it out, so that what was tested is not what runs; empty if it is shipped or inert."""
    name = rel.rsplit("/", 1)[-1]
    if not name.endswith(_LOADED_BY_OPA) or rel.startswith("schemas/"):
        return ""
    if not rel.startswith(f"{BUNDLE_ROOT}/"):
        return f"outside {BUNDLE_ROOT}/, the bundle's only root: the sidecar never loads it; move it under {BUNDLE_ROOT}/"
    if "schemas" in rel.split("/")[:-1]:
        return (
            "in a directory named schemas, which `opa test --ignore schemas` skips at any depth, so it"
            " would ship untested: rename the directory"
        )
    if name.endswith(".rego") or name in _DATA_FILES:
        return ""
    return (
        "a bundle takes data only from files named data.json or data.yaml, so the sidecar would never"
        " see this one (though `opa test` on the directory loads it): merge it into data.json in the"
        " same directory"
    )


_PACKAGE = re.compile(r"^\s*package\s+([^\s#]+)", re.MULTILINE)


def _untested_rules(path: Path) -> str:
    """Why a ``*_test.rego`` file, which the bundle leaves out, may hold rules a policy uses:
    its package is not a test package (``..._test``), so `opa test` would judge policies with
    rules the sidecar never gets. Empty if its package is a test package, or it has none (then
    ``opa check`` refuses it)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"cannot be read: {exc}"
    match = _PACKAGE.search(text)
    if match is None or match.group(1).endswith("_test"):
        return ""
    return (
        f"a *_test.rego file in package {match.group(1)}, which is not a test package: the bundle"
        " leaves test files out, so rules written here would be tested but never run; name the"
        f" package {match.group(1)}_test, or move the rules to a file without the _test suffix"
    )


def _files(root: Path) -> list[str]:
    """Every file under ``root`` as a relative POSIX path, sorted; symlinked directories are
    followed (as the snapshot's copy follows them), hidden entries and ``__pycache__`` skipped."""
    found: list[str] = []
    for directory, subdirs, names in os.walk(root, followlinks=True):
        subdirs[:] = [d for d in subdirs if not _skipped(d)]
        base = Path(directory).relative_to(root)
        for name in names:
            if not _skipped(name) and (Path(directory) / name).is_file():
                found.append((base / name).as_posix())
    return sorted(found)


def _skipped(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__"


def compute_policy_hash(policies_root: Path) -> str:
    """The policy hash of a tree: the same content gives the same hash, wherever it lives."""
    return policy_hash(bundle_files(policies_root))


_WAIT_SLICE_S = 0.25


def _start(cmd: Sequence[str], cwd: Path | None = None) -> subprocess.Popen[str]:
    """Start one build step.

    Raises:
        PolicyError: the command cannot be run.
        KeyboardInterrupt: Ctrl-C or SIGTERM (``interrupts.Terminated``) arrived meanwhile; the
            step it had started is stopped.
    """
    proc: subprocess.Popen[str] | None = None
    try:
        # Ctrl-C and SIGTERM wait until Popen returns: raised in the at-fork hooks it runs,
        # their exception would be dropped (with a traceback on stderr)
        with interrupts.deferred():
            # A group of its own: a Ctrl-C meant for `agov serve` (which stops at a safe point)
            # must not kill a build or test midway, which would read as a policy that failed
            # them. Out of the group, a step is killed by build() when it unwinds, and by the
            # kernel when the thread that waits for it dies (agov killed, or exiting with a
            # reload still running).
            proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=cwd,
                process_group=0,
                preexec_fn=pdeathsig_preexec(),
            )
    except OSError as exc:
        raise PolicyError(
            f"cannot run {cmd[0]}: {exc.strerror}", hint="run `make tools` or set AGOV_OPA_BIN"
        ) from exc
    except BaseException:
        if proc is not None:  # not handed to the caller: nobody else would stop it
            proc.kill()
            proc.communicate()
        raise
    return proc


def _trial_step(trial: Trial) -> str:
    return f"the trial run of the new policy on {trial.what} (the query a revalidation sends)"


def _rule_ref(path: str) -> str:
    return "data." + path.strip("/").replace("/", ".")


def _trial_command(opa: Path, trial: Trial, stage: Path, input_file: Path) -> list[str]:
    # A query of one expression reports its value, so a false is_object would pass; followed by
    # another, it must hold, else the query is undefined and --fail exits 1. The second is the
    # list of failures (a comprehension: [] when the policy has no such rule), which --format raw
    # prints after the first's `true`.
    failures = f"[f | some f in {_rule_ref(trial.failures_rule)}]" if trial.failures_rule else "[]"
    query = f"is_object({_rule_ref(trial.query)}); {failures}"
    return [
        str(opa),
        "eval",
        "--bundle",
        str(stage),  # not ".": an error then names the file, which the message maps to the user's
        "--strict-builtin-errors",  # as agov's queries to the sidecar ask
        "--timeout",
        f"{trial.timeout_s:g}s",
        "--fail",
        "--format",
        "raw",
        "--input",
        str(input_file),
        query,
    ]


_UNDEFINED = "the result is undefined, or not an object: every revalidation under it would stop"
_FAILURES_SHOWN = 5


def _sync_directory(directory: Path) -> None:
    """Sync a directory's entries (a new name in it), where the file system can."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # some file systems sync no directory
            raise
    finally:
        os.close(fd)


def _refuse_trial_failures(what: str, out: str, trial: Trial) -> None:
    """Refuse the candidate when the trial's output (``true`` and the failures, a JSON array of
    strings) lists any failure, or is not that.

    Raises:
        PolicyError: failures were found, or the output cannot be read.
    """
    head, _, listed = out.strip().partition(" ")
    try:
        failures = json.loads(listed) if head == "true" else None
    except ValueError:
        failures = None
    if not isinstance(failures, list):
        raise PolicyError(
            f"{what} gave output agov cannot read: {out.strip()[:200]!r}",
            hint="the active policy stays in force; report this with the opa version",
        )
    if not failures:
        return
    shown = "\n".join(
        f"- {failure if isinstance(failure, str) else json.dumps(failure)}"
        for failure in failures[:_FAILURES_SHOWN]
    )
    more = len(failures) - _FAILURES_SHOWN
    if more > 0:
        shown += f"\n(and {more} more)"
    raise PolicyError(
        f"{what} failed: the policy's own check ({trial.failures_rule}) found"
        f" {len(failures)} {'problem' if len(failures) == 1 else 'problems'}:\n{shown}",
        hint="fix the policy; the active one stays in force",
    )


def _finish(
    opa: Path,
    proc: subprocess.Popen[str],
    what: str,
    deadline: float,
    shown_as: dict[str, str],
    undefined: str = "",
) -> str:
    """Wait for one step and return its output; its failure is a refused policy, unless opa
    itself does not work.

    ``shown_as`` maps the snapshot's directories to the user's tree, so that an error names
    the file the user edits rather than a temporary copy of it. ``undefined`` says what exit
    status 1 without output means (``opa eval --fail``: no result).

    Raises:
        PolicyError: the step failed or timed out.
        EngineUnavailableError: the opa binary does not run at all.
    """
    try:
        out, err = _communicate(proc, deadline)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        raise PolicyError(f"{what} timed out") from exc
    if proc.returncode != 0:
        detail = (out + err).strip()
        if not detail:
            opa_version(opa)  # silent failure: check the binary runs at all
            detail = undefined if proc.returncode == 1 else f"opa exited with status {proc.returncode}"
        for copy, original in shown_as.items():
            detail = detail.replace(copy, original)
        # a data file opa cannot read (data.json that is not JSON) is no failed test or check
        unreadable = "during loading" in detail and "rego_" not in detail
        failure = "could not load the policy tree" if unreadable else "failed"
        raise PolicyError(
            f"{what} {failure}:\n{detail}", hint="fix the policy; the active one stays in force"
        )
    return out


def _communicate(proc: subprocess.Popen[str], deadline: float) -> tuple[str, str]:
    """``proc.communicate()`` until ``deadline``, waiting in slices of at most a quarter second.

    Between slices, a stop signal whose exception Python dropped (in an at-fork hook or a
    ``__del__``) is raised: the build then stops within a slice, not at the step's deadline (two
    minutes). Output is not lost between slices (``communicate`` resumes).

    Raises:
        subprocess.TimeoutExpired: the deadline passed.
        KeyboardInterrupt: (or ``interrupts.Terminated``) a stop signal arrived.
    """
    while True:
        interrupts.raise_if_lost()
        try:
            out, err = proc.communicate(timeout=max(0.01, min(_WAIT_SLICE_S, deadline - time.monotonic())))
            return out, err
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                raise


def _tree(root: Path) -> dict[str, bytes]:
    return {rel: (root / rel).read_bytes() for rel in _files(root)}


def _stable_copy(source: Path, target: Path, attempts: int = 5) -> None:
    """Copy a tree an editor may be writing to; retry until a copy matches the source.

    A file that vanishes while it is copied (an editor's delete-then-rename save) is one more
    reason to try again.

    Raises:
        PolicyError: the tree kept changing while it was copied.
    """
    if not source.is_dir():
        raise PolicyError(f"{source} does not exist", hint="a policy tree has packages under agov/")
    problem = ""
    for attempt in range(attempts):
        shutil.rmtree(target, ignore_errors=True)
        try:
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", ".*"))
            if _tree(target) == _tree(source):
                return
        except OSError as exc:  # shutil.Error included
            problem = f": {exc}"[:2000]
            if _denied(exc):  # no edit in progress: trying again changes nothing
                raise PolicyError(
                    f"cannot read the policy tree {source}{problem}",
                    hint="let the user agov runs as read every file and directory under it",
                ) from exc
        time.sleep(0.05 * (attempt + 1))
    raise PolicyError(
        f"{source} kept changing while it was read{problem}", hint="save the files, then reload"
    )


def _denied(exc: OSError) -> bool:
    """Whether a copy failed for want of permission (EACCES or EPERM; to a file, for shutil.Error)."""
    if isinstance(exc, PermissionError):
        return True
    failures = exc.args[0] if isinstance(exc, shutil.Error) and exc.args else None
    return (
        isinstance(failures, list)
        and bool(failures)
        and any(
            isinstance(f, tuple) and ("[Errno 13]" in str(f[-1]) or "[Errno 1]" in str(f[-1]))
            for f in failures
        )
    )


def check_and_build(
    opa: Path,
    policies_root: Path,
    out_dir: Path,
    *,
    signing_key: Path,
    entrypoints: Sequence[str] = (),
    trial: Trial | None = None,
    timeout_s: float = 120.0,
) -> BuiltBundle:
    """Check, test, build and sign one snapshot of the policy tree.

    ``opa check --strict``, ``opa test`` and ``opa build`` (revision = policy hash, ES256
    signature) run side by side on the same copy of the tree, so all three judge the same bytes
    even while an editor is still writing; the bundle lands in ``out_dir`` only when all pass.
    Each of ``entrypoints`` (``agov/admission/decision``…) must be a rule the bundle defines:
    ``opa build -t plan`` refuses one that is not, where a plain build would ship a policy that
    answers every such query with nothing. A ``trial`` runs beside them, on the same bundle.

    Raises:
        PolicyError: the tree is empty, does not compile, a test fails, or the build failed.
        EngineUnavailableError: the opa binary does not run.
    """
    # claimed while in use: a build killed outright (SIGKILL, OOM) leaves it for the next to remove
    with claimed_tempdir("agov-bundle-") as tmp:
        snapshot = Path(tmp) / "policies"
        _stable_copy(policies_root, snapshot)
        try:
            files = bundle_files(snapshot)
        except PolicyError as exc:  # name the user's tree, not the snapshot
            raise PolicyError(exc.message.replace(str(snapshot), str(policies_root)), hint=exc.hint) from exc
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
                _TEST_STEP,
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
        if entrypoints:
            plan = [str(opa), "build", "-t", "plan", "-b", ".", "-o", str(Path(tmp) / "plan.tar.gz")]
            for entrypoint in entrypoints:
                plan += ["-e", entrypoint]
            steps.append(("the entrypoint check (opa build -t plan)", plan, stage))
        trial_input = trial.input_for(digest) if trial is not None else None
        if trial is not None and trial_input is not None:
            trial_file = Path(tmp) / "trial-input.json"
            trial_file.write_bytes(trial_input)
            steps.append((_trial_step(trial), _trial_command(opa, trial, stage, trial_file), stage))
        running: list[tuple[str, subprocess.Popen[str]]] = []
        try:
            for what, cmd, cwd in steps:
                running.append((what, _start(cmd, cwd)))
            deadline = time.monotonic() + timeout_s
            for what, proc in running:  # report the first failing step in this order
                out = _finish(
                    opa,
                    proc,
                    what,
                    deadline,
                    {str(snapshot): str(policies_root), str(stage): str(policies_root)},
                    undefined=_UNDEFINED if trial is not None and what == _trial_step(trial) else "",
                )
                if trial is not None and what == _trial_step(trial):
                    _refuse_trial_failures(what, out, trial)
                if what == _TEST_STEP and not _PASSED_TESTS.search(out):
                    # `opa test` passes when there is nothing to run: no test would then judge
                    # the policy that is about to decide
                    raise PolicyError(
                        f"opa test ran no tests: {policies_root} has none that passed"
                        f" (*_test.rego, not counting {AGREEMENT_TESTS})",
                        hint="write tests beside the policies; the active policy stays in force",
                    )
        finally:
            for _what, proc in running:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        content = partial.read_bytes()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{digest}.tar.gz"
    # a name of its own: two processes building the same tree must not share one temporary file
    handle, tmp_name = tempfile.mkstemp(prefix=f".{digest}.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(handle, "wb") as tmp_file:
            tmp_file.write(content)
            tmp_file.flush()
            # on disk before its name is: the store, which commits durably, will name this version
            os.fsync(tmp_file.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _sync_directory(out_dir)
    return BuiltBundle(policy_hash=digest, path=target, content=content)
