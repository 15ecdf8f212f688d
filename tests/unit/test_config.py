"""Workspace limits: each one is checked however the config is made, from ``agov.yaml`` or in
Python, so that no limit can quietly disable its own check (a chunk size of 0 revalidates nobody)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from agov.config import MAX_TIMEOUT_S, Config, Limits, load_config
from agov.engine import Engine
from agov.errors import ConfigError, WorkspaceError


def _write(tmp_path: Path, limits: dict[str, object]) -> Path:
    path = tmp_path / "agov.yaml"
    path.write_text(yaml.safe_dump({"limits": limits}))
    return path


def test_revalidation_chunks_have_their_own_deadline(tmp_path: Path) -> None:
    assert Limits().revalidation_timeout_s > Limits().opa_timeout_s
    config = load_config(_write(tmp_path, {"opa_timeout_s": 0.5, "revalidation_timeout_s": 120}))
    assert (config.limits.opa_timeout_s, config.limits.revalidation_timeout_s) == (0.5, 120)
    assert load_config(tmp_path / "missing.yaml") == Config()


BAD_LIMITS = [
    ({"revalidation_chunk_size": 0}, "revalidation_chunk_size must be positive, not 0"),
    ({"revalidation_timeout_s": 0}, "revalidation_timeout_s must be positive, not 0"),
    ({"opa_timeout_s": -1}, "opa_timeout_s must be positive, not -1"),
    ({"revalidation_timeout_s": float("nan")}, "must be positive, not nan"),
    ({"opa_timeout_s": float("inf")}, "must be positive, not inf"),
    ({"revalidation_timeout_s": True}, "must be a number, not True"),
    ({"opa_timeout_s": "30"}, "must be a number, not '30'"),
    ({"revalidation_chunk_size": 10.5}, "must be a whole number"),
    ({"max_spec_bytes": 10**400}, "max_spec_bytes must be at most 2147483647"),
    ({"max_spec_bytes": 4 * 1024 * 1024 + 1}, "max_spec_bytes must be at most 4194304"),
    ({"revalidation_timeout_s": MAX_TIMEOUT_S + 1}, f"at most {MAX_TIMEOUT_S:g} s"),
    ({"opa_timeout_s": 10**400}, f"at most {MAX_TIMEOUT_S:g} s"),
]


@pytest.mark.parametrize(("limits", "message"), BAD_LIMITS)
def test_bad_limits_in_agov_yaml_are_refused(tmp_path: Path, limits: dict[str, object], message: str) -> None:
    with pytest.raises(WorkspaceError, match=rf"^agov\.yaml\.limits: .*{message}"):
        load_config(_write(tmp_path, limits))


@pytest.mark.parametrize(("limits", "message"), BAD_LIMITS)
def test_bad_limits_made_in_python_are_refused(limits: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Limits(**limits)  # type: ignore[arg-type]


def test_an_engine_cannot_be_created_with_a_chunk_size_of_zero(tmp_path: Path) -> None:
    home = tmp_path / "ws"
    with pytest.raises(ValueError, match="revalidation_chunk_size must be positive"):
        Engine.init(home, Config(limits=Limits(revalidation_chunk_size=0)))
    assert not home.exists()


BAD_SETTINGS = [
    ({"proof_ttl_days": 0}, "agov.yaml", "proof_ttl_days must be a whole number of days in 1..36500"),
    ({"proof_ttl_days": False}, "agov.yaml", "or null: proofs never expire"),
    ({"proof_ttl_days": True}, "agov.yaml", "proof_ttl_days must be a whole number"),
    ({"proof_ttl_days": -1}, "agov.yaml", "not -1"),
    ({"proof_ttl_days": 1.5}, "agov.yaml", "not 1.5"),
    ({"sandbox_ttl_days": 10**9}, "agov.yaml", "sandbox_ttl_days must be a whole number of days in 1..36500"),
    ({"sandbox_ttl_days": None}, "agov.yaml", "sandbox_ttl_days must be a whole number"),
    (
        {"org": {"max_monthly_budget_usd": -5}},
        "agov.yaml.org",
        "max_monthly_budget_usd must be a number >= 0",
    ),
    ({"org": {"max_monthly_budget_usd": "1000"}}, "agov.yaml.org", "not '1000'"),
    ({"org": {"max_monthly_budget_usd": True}}, "agov.yaml.org", "not True"),
    ({"org": {"max_monthly_budget_usd": float("nan")}}, "agov.yaml.org", "not nan"),
]


@pytest.mark.parametrize(("raw", "where", "message"), BAD_SETTINGS)
def test_bad_lifetimes_and_org_limits_are_refused(
    tmp_path: Path, raw: dict[str, object], where: str, message: str
) -> None:
    """Before, proof_ttl_days: 0 (or false) gave proofs that never expire, -1 failed a promotion
    with no audit event, and a budget typo denied every agent instead of the config."""
    path = tmp_path / "agov.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(WorkspaceError, match=rf"^{re.escape(where)}: .*{re.escape(message)}"):
        load_config(path)


def test_proofs_may_be_configured_never_to_expire_and_budgets_to_be_whole(tmp_path: Path) -> None:
    path = tmp_path / "agov.yaml"
    path.write_text(yaml.safe_dump({"proof_ttl_days": None, "org": {"max_monthly_budget_usd": 0}}))
    config = load_config(path)
    assert (config.proof_ttl_days, config.org.max_monthly_budget_usd) == (None, 0)


def test_each_read_gives_what_the_file_says_now(tmp_path: Path) -> None:
    """Parsed configs are kept by their text: an edit of the same size, within the same clock
    tick, is read as written; a broken edit is refused each time; the original is read again."""
    path = tmp_path / "agov.yaml"
    path.write_text("org:\n  max_monthly_budget_usd: 1000\n")
    assert load_config(path, require_org=True).org.max_monthly_budget_usd == 1000
    path.write_text("org:\n  max_monthly_budget_usd: 2000\n")
    assert load_config(path, require_org=True).org.max_monthly_budget_usd == 2000
    path.write_text("org:\n  max_monthly_budget_usd: [2000\n")
    for _ in range(2):
        with pytest.raises(ConfigError, match="cannot read"):
            load_config(path, require_org=True)
    path.write_text("org:\n  max_monthly_budget_usd: 1000\n")
    assert load_config(path, require_org=True).org.max_monthly_budget_usd == 1000
    path.write_text("")
    with pytest.raises(ConfigError, match="states no org limits"):
        load_config(path, require_org=True)
    assert load_config(path) == Config(), "without require_org, an empty file is the defaults"
