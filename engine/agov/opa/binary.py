"""Finding the ``opa`` binary, asking it for its version, and tying its processes to agov's."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from agov.errors import EngineUnavailableError

ENV_OPA_BIN = "AGOV_OPA_BIN"
_PR_SET_PDEATHSIG = 1
_TOOLS_HINT = "run `make tools` (it installs the pinned OPA under .tools/bin), or set AGOV_OPA_BIN"


def find_opa() -> Path:
    """Locate the ``opa`` binary.

    Order: ``$AGOV_OPA_BIN``; ``<repo>/.tools/bin/opa`` when running from a source checkout
    (the nearest ancestor of this file holding a ``pyproject.toml``); ``opa`` on ``PATH``.

    Returns:
        The absolute path of an executable file.

    Raises:
        EngineUnavailableError: None found, or ``AGOV_OPA_BIN`` names something that is not
            an executable file (an explicit setting is never silently skipped).
    """
    explicit = os.environ.get(ENV_OPA_BIN)
    if explicit:
        path = Path(explicit).expanduser()
        if not _is_executable(path):
            raise EngineUnavailableError(
                f"{ENV_OPA_BIN}={explicit} is not an executable file", hint=_TOOLS_HINT
            )
        return path.resolve()
    repo = _source_checkout()
    if repo is not None:
        candidate = repo / ".tools" / "bin" / "opa"
        if _is_executable(candidate):
            return candidate.resolve()
    found = shutil.which("opa")
    if found:
        return Path(found).resolve()
    raise EngineUnavailableError("no opa binary found", hint=_TOOLS_HINT)


def opa_version(path: Path) -> str:
    """The version ``opa version`` reports (e.g. ``"1.22.2"``).

    Args:
        path: The binary.

    Returns:
        The version string.

    Raises:
        EngineUnavailableError: The binary does not run, or prints no version.
    """
    try:
        proc = subprocess.run([str(path), "version"], capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineUnavailableError(f"cannot run {path} version: {exc}", hint=_TOOLS_HINT) from exc
    if proc.returncode == 0:
        for line in proc.stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Version" and value.strip():
                return value.strip()
    raise EngineUnavailableError(
        f"{path} version exited {proc.returncode} without a version: {proc.stderr.strip()[-300:]}",
        hint=_TOOLS_HINT,
    )


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _source_checkout() -> Path | None:
    """The repository root when this package runs from a checkout, else None."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    return None


def pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn that makes the kernel SIGKILL the child when the thread that started it dies
    (on Linux; None elsewhere). The thread must live as long as the child: it waits for it, or
    keeps it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork, not in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return preexec
