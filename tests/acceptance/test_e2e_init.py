"""`agov init DIR`: the workspace layout, and no-clobber."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from e2e_support import HEX64, agov, expect_error, listing, ok, query

pytestmark = pytest.mark.acceptance

ENTRIES = {"agov.yaml", "policies", "keys", "bundles", "opa-config.yaml", ".regal", "agov.db"}


def test_init_creates_the_workspace_layout(tmp_path: Path, opa_bin: Path) -> None:
    home = tmp_path / "nested" / "ws"
    out = ok("init", home)

    assert set(out) == {"home", "policy_hash", "keyid"}
    assert out["home"] == str(home)
    assert re.fullmatch(HEX64, out["policy_hash"])
    assert re.fullmatch(HEX64, out["keyid"])
    assert {p.name for p in home.iterdir()} >= ENTRIES
    assert (home / "agov.yaml").is_file()
    assert (home / "opa-config.yaml").is_file()
    assert (home / "agov.db").is_file()
    assert (home / "bundles").is_dir()
    # the default policies are copied for the user to edit
    assert (home / "policies" / "agov" / "promotion" / "promotion.rego").is_file()
    assert (home / "policies" / "agov" / "config" / "data.json").is_file()
    # the first policy is built, signed and stored under bundles/
    assert (home / "bundles" / f"{out['policy_hash']}.tar.gz").is_file()

    keys = home / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    private = [p for p in keys.iterdir() if p.suffix == ".key"]
    assert {p.name for p in private} >= {f"{out['keyid']}.ed25519.key"}
    for key in private:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key

    # the store is SQLite in WAL mode, with the proof key and the initial policy recorded
    assert query(home, "PRAGMA journal_mode") == [("wal",)]
    assert query(home, "SELECT hash, active FROM policy_versions") == [(out["policy_hash"], 1)]
    assert query(home, "SELECT keyid, active FROM signing_keys") == [(out["keyid"], 1)]

    # the workspace is usable at once
    assert ok("agent", "list", home=home) == []
    history = ok("policy", "history", home=home)
    assert [v["hash"] for v in history if v["active"]] == [out["policy_hash"]]


def test_a_new_workspace_passes_regal_lint_as_ci_runs_it(pristine: Path, tmp_path: Path) -> None:
    """Before: `regal lint $AGOV_HOME/policies` found 47 violations in the shipped policies (no
    Regal config came with them: agov's own is in its repository)."""
    repo_regal = Path(__file__).resolve().parents[2] / ".tools" / "bin" / "regal"
    regal = shutil.which("regal") or (str(repo_regal) if repo_regal.is_file() else None)
    if regal is None:
        if os.environ.get("AGOV_REQUIRE_OPA"):
            pytest.fail("no regal binary (make test installs it into .tools/bin)")
        pytest.skip("no regal binary")
    assert (pristine / ".regal" / "config.yaml").is_file()
    linted = subprocess.run(
        [regal, "lint", str(pristine / "policies")], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_second_init_exits_2_lists_collisions_and_writes_nothing(pristine: Path) -> None:
    before = listing(pristine)

    error = expect_error(agov("init", pristine), 2)

    assert error["type"] == "WorkspaceError"
    for name in ENTRIES:
        assert str(pristine / name) in error["message"], name
    assert listing(pristine) == before


def test_init_refuses_a_single_existing_entry_and_writes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "ws"
    home.mkdir()
    (home / "opa-config.yaml").write_text("mine: true\n")
    before = listing(home)

    error = expect_error(agov("init", home), 2)

    assert str(home / "opa-config.yaml") in error["message"]
    assert str(home / "agov.yaml") not in error["message"]
    assert error["hint"] == "choose an empty directory, or move these away first"
    assert listing(home) == before
    assert (home / "opa-config.yaml").read_text() == "mine: true\n"


def test_init_text_mode_reports_collisions_on_stderr(pristine: Path) -> None:
    result = agov("init", pristine, as_json=False)
    assert result.code == 2
    assert result.out == ""
    assert result.err.startswith("error: refusing to overwrite existing files:")
    # a workspace: the hint never advises removing its store, keys and audit log
    assert f"hint: {pristine} holds an agov workspace: use it (--home / AGOV_HOME)" in result.err
    assert "remove these" not in result.err


def test_init_on_a_regular_file_is_bad_input(tmp_path: Path) -> None:
    target = tmp_path / "not-a-dir"
    target.write_text("x")
    error = expect_error(agov("init", target), 2)
    assert "not-a-dir" in error["message"]


def test_init_refuses_a_stale_audit_anchor(tmp_path: Path) -> None:
    home = tmp_path / "ws"
    home.mkdir()
    (home / "agov.db.audit-anchor").write_text(json.dumps({"seq": 500, "hash": "0" * 64}))
    result = agov("init", home)
    if result.code == 0:
        # if init goes ahead, the workspace it made must at least be consistent
        verify = agov("audit", "verify", home=home)
        assert verify.code == 0, str(verify)
    else:
        error = expect_error(result, 2)
        assert "audit-anchor" in error["message"]


def test_failed_init_leaves_nothing_behind(tmp_path: Path) -> None:
    home = tmp_path / "ws"
    result = agov("init", home, env={"AGOV_OPA_BIN": "/bin/false"})
    assert result.code != 0, str(result)
    leftovers = {p.name for p in home.iterdir()} & ENTRIES if home.exists() else set()
    assert leftovers == set()


def test_init_under_a_file_is_bad_input_not_an_internal_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    error = expect_error(agov("init", tmp_path / "a-file" / "ws"), 2)
    assert (
        error["message"]
        == f"cannot create the workspace directory {tmp_path / 'a-file' / 'ws'}: Not a directory"
    )
    assert "parent is a directory" in error["hint"]


def test_init_that_fails_while_writing_the_layout_removes_what_it_wrote(tmp_path: Path) -> None:
    """Before, policies/, keys/, bundles/ and opa-config.yaml stayed, and a retry was refused."""
    home = tmp_path / "ws"
    (home / "agov.yaml.tmp").mkdir(parents=True)  # where init writes agov.yaml before renaming it
    error = expect_error(agov("init", home), 2)
    assert error["message"].startswith(f"cannot write the workspace in {home}: [Errno 21] Is a directory")
    assert {p.name for p in home.iterdir()} == {"agov.yaml.tmp"}, "only what was there before"
    (home / "agov.yaml.tmp").rmdir()
    assert agov("init", home).code == 0, "and a retry succeeds"


def test_init_refuses_a_directory_other_than_the_home_the_next_commands_use(tmp_path: Path) -> None:
    elsewhere, home = tmp_path / "dir-arg", tmp_path / "env-home"
    error = expect_error(agov("init", elsewhere, env={"AGOV_HOME": str(home)}), 2)
    assert "names another workspace than --home/AGOV_HOME" in error["message"], error
    assert not elsewhere.exists() and not home.exists(), "nothing is created"
    assert ok("init", home, env={"AGOV_HOME": str(home)})["home"] == str(home)  # the same one: fine
    # --home before the command, or after it, is the same --home
    for argv in (
        ["--home", str(home), "init", str(elsewhere)],
        ["init", str(elsewhere), "--home", str(home)],
    ):
        error = expect_error(agov(*argv), 2)
        assert "names another workspace than --home/AGOV_HOME" in error["message"], (argv, error)
        assert not elsewhere.exists()


def test_init_into_a_symlink_loop_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    expect_error(agov("init", tmp_path / "a", env={"AGOV_HOME": str(tmp_path / "a")}), 2)
