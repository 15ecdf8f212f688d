"""Fixtures for the acceptance tests: the ``agov`` CLI end to end, with a real OPA.

One workspace is initialised per session (``pristine``); modules copy it and add agents, and a
test that mutates copies its module's workspace again (a workspace is a directory).

Tests skip when no ``opa`` binary is found, unless ``AGOV_REQUIRE_OPA`` is set (``make test``
sets it): then a missing binary fails, so CI cannot go green by skipping.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from e2e_support import OpaSpy, agov, copy_ws


@pytest.fixture(scope="session")
def pristine(tmp_path_factory: pytest.TempPathFactory, opa_bin: Path) -> Path:
    """A freshly initialised workspace. Never mutate it: copy it (``fresh_ws``)."""
    home = tmp_path_factory.mktemp("pristine") / "ws"
    result = agov("init", home)
    assert result.code == 0, str(result)
    return home


@pytest.fixture
def fresh_ws(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the pristine workspace."""
    return copy_ws(pristine, tmp_path / "ws")


@pytest.fixture
def opa_spy(tmp_path: Path, opa_bin: Path) -> OpaSpy:
    log = tmp_path / "opa-pids.log"
    script = tmp_path / "opa-spy" / "opa"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho $$ >> "{log}"\nexec "{opa_bin}" "$@"\n')
    script.chmod(0o755)
    return OpaSpy(script, log)
