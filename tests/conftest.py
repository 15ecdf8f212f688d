"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from agov.errors import EngineUnavailableError
from agov.opa import find_opa


def require_opa() -> Path:
    """The opa binary; skip without one, or fail when AGOV_REQUIRE_OPA is set (as ``make test``
    does), so that CI cannot go green by skipping."""
    try:
        return find_opa()
    except EngineUnavailableError as exc:
        if os.environ.get("AGOV_REQUIRE_OPA"):
            pytest.fail(f"AGOV_REQUIRE_OPA is set but {exc.diagnostics()}")
        pytest.skip(f"no opa binary ({exc.message}); set AGOV_REQUIRE_OPA=1 to make this a failure")


@pytest.fixture(scope="session")
def opa_bin() -> Path:
    return require_opa()


@pytest.fixture
def file_syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    """Every ``os.fsync`` and ``os.replace`` from here on, in order: ("fsync", the path synced, "")
    and ("replace", source, destination). Both still happen."""
    steps: list[tuple[str, str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        steps.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        steps.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return steps
