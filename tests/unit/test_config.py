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
        ({"revalidation_timeout_s": 0}, r"limits\.revalidation_timeout_s must be positive"),
        ({"opa_timeout_s": -1}, r"limits\.opa_timeout_s must be positive"),
        ({"revalidation_timeout_s": float("nan")}, "must be positive, not nan"),
        ({"opa_timeout_s": float("inf")}, "must be positive, not inf"),
        ({"revalidation_timeout_s": True}, "must be a number, not True"),
        ({"opa_timeout_s": "30"}, "must be a number, not '30'"),
        ({"revalidation_chunk_size": 10.5}, "must be a whole number"),
        ({"max_spec_bytes": 0}, r"limits\.max_spec_bytes must be positive"),
        ({"revalidation_timeout_s": MAX_TIMEOUT_S + 1}, f"at most {MAX_TIMEOUT_S:g} s"),
        ({"opa_timeout_s": MAX_TIMEOUT_S + 1}, f"at most {MAX_TIMEOUT_S:g} s"),
    ],
)
def test_bad_limits_are_refused_when_the_config_is_loaded(
    tmp_path: Path, limits: dict[str, object], message: str
) -> None:
    with pytest.raises(WorkspaceError, match=message):
        load_config(_write(tmp_path, limits))
