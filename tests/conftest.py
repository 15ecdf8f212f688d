"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
from pathlib import Path

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
