"""Finding the ``opa`` binary, and asking it for its version."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from agov.errors import EngineUnavailableError

ENV_OPA_BIN = "AGOV_OPA_BIN"
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
