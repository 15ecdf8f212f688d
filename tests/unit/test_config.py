"""``agov.yaml`` limits: each OPA deadline is checked when the workspace config is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agov.config import MAX_TIMEOUT_S, Config, Limits, load_config
from agov.errors import WorkspaceError


def _write(tmp_path: Path, limits: dict[str, object]) -> Path:
    path = tmp_path / "agov.yaml"
    path.write_text(yaml.safe_dump({"limits": limits}))
    return path


def test_revalidation_chunks_have_their_own_deadline(tmp_path: Path) -> None:
    assert Limits().revalidation_timeout_s > Limits().opa_timeout_s
    config = load_config(_write(tmp_path, {"opa_timeout_s": 0.5, "revalidation_timeout_s": 120}))
    assert (config.limits.opa_timeout_s, config.limits.revalidation_timeout_s) == (0.5, 120)
    assert load_config(tmp_path / "missing.yaml") == Config()


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"revalidation_timeout_s": 0}, "limits must be positive"),
        ({"opa_timeout_s": -1}, "limits must be positive"),
        ({"revalidation_timeout_s": MAX_TIMEOUT_S + 1}, f"at most {MAX_TIMEOUT_S:g} s"),
        ({"opa_timeout_s": MAX_TIMEOUT_S + 1}, f"at most {MAX_TIMEOUT_S:g} s"),
    ],
)
def test_out_of_range_deadlines_are_refused(tmp_path: Path, limits: dict[str, object], message: str) -> None:
    with pytest.raises(WorkspaceError, match=message):
        load_config(_write(tmp_path, limits))
