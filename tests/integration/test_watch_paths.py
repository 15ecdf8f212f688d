"""Which edits the policy watcher reacts to, wherever the workspace lives.

`serve --watch` once ignored every edit of a workspace under a hidden directory (the README's
own ``AGOV_HOME=/tmp/tour/.agov``, or ``~/.agov``): hidden names were looked for in the whole
absolute path instead of below the watched root.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from _reload_support import configmap_volume

from agov.watch import PolicyWatcher

SETTLE_S = 1.0  # well above the debounce, for a slow machine


def _reloads(policies: Path, act: Callable[[], None], config_file: Path | None = None) -> int:
    """Start a watcher on ``policies`` (and ``config_file``), run ``act``, count the reloads."""
    fired: list[float] = []
    seen = threading.Event()

    def on_change() -> None:
        fired.append(time.monotonic())
        seen.set()

    watcher = PolicyWatcher(policies, on_change, debounce_s=0.05, config_file=config_file)
    watcher.start()
    try:
        time.sleep(0.2)  # the observer's watches are in place
        act()
        seen.wait(SETTLE_S)
        time.sleep(0.2)
    finally:
        watcher.stop()
    return len(fired)


def _watch(policies: Path, edit: Path, content: str) -> int:
    """Start a watcher on ``policies``, write ``edit`` and count the reloads it triggers."""

    def write() -> None:
        edit.parent.mkdir(parents=True, exist_ok=True)
        edit.write_text(content)

    return _reloads(policies, write)


@pytest.mark.parametrize("home", ["ws", ".agov", "tour/.agov"])
def test_an_edit_reloads_wherever_the_workspace_lives(tmp_path: Path, home: str) -> None:
    policies = tmp_path / home / "policies"
    data = policies / "agov" / "config" / "data.json"
    data.parent.mkdir(parents=True)
    data.write_text("{}\n")

    assert _watch(policies, data, '{"edited": true}\n') >= 1  # an editor's steps may come apart


@pytest.mark.parametrize("hidden", [".git/config.json", "agov/.data.json", "agov/.swap/x.rego"])
def test_hidden_files_inside_the_tree_do_not_reload(tmp_path: Path, hidden: str) -> None:
    policies = tmp_path / ".agov" / "policies"
    (policies / "agov").mkdir(parents=True)

    assert _watch(policies, policies / hidden, "{}\n") == 0


def _watch_config(home: Path, act: Callable[[], None]) -> int:
    """Watch ``home/policies`` and ``home/agov.yaml``, run ``act``, count the reloads."""
    return _reloads(home / "policies", act, home / "agov.yaml")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / ".agov"
    (home / "policies" / "agov").mkdir(parents=True)
    (home / "agov.yaml").write_text("org:\n  max_monthly_budget_usd: 1000.0\n")
    return home


def test_a_saved_agov_yaml_reloads_whether_written_in_place_or_renamed_over(home: Path) -> None:
    config = home / "agov.yaml"
    assert _watch_config(home, lambda: config.write_text("org:\n  max_monthly_budget_usd: 250.0\n")) >= 1

    def rename_over() -> None:
        scratch = home / ".agov.yaml.tmp"
        scratch.write_text("org:\n  max_monthly_budget_usd: 500.0\n")
        os.replace(scratch, config)

    assert _watch_config(home, rename_over) >= 1


def test_the_store_and_other_files_beside_agov_yaml_do_not_reload(home: Path) -> None:
    def write_the_store_and_others() -> None:
        with sqlite3.connect(home / "agov.db") as conn:  # commits, then closes: as agov does
            conn.execute("CREATE TABLE t (x)")
            conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(100)])
        conn.close()
        (home / "opa-config.yaml").write_text("services: {}\n")

    assert _watch_config(home, write_the_store_and_others) == 0


def test_a_package_moved_out_of_the_tree_reloads(home: Path, tmp_path: Path) -> None:
    """Its files leave with it, and the kernel reports only the directory's move."""
    package = home / "policies" / "agov" / "blocked"
    package.mkdir()
    (package / "blocked.rego").write_text("package agov.blocked\n")  # before the watch starts

    assert _watch_config(home, lambda: package.rename(tmp_path / "elsewhere")) >= 1


def test_a_policy_tree_swapped_in_by_renames_reloads_and_stays_watched(home: Path, tmp_path: Path) -> None:
    replacement = tmp_path / "new-policies"
    (replacement / "agov").mkdir(parents=True)
    (replacement / "agov" / "x.rego").write_text("package agov.x\n")
    policies = home / "policies"
    fired: list[float] = []
    seen = threading.Event()

    def on_change() -> None:
        fired.append(time.monotonic())
        seen.set()

    watcher = PolicyWatcher(policies, on_change, debounce_s=0.05, config_file=home / "agov.yaml")
    watcher.start()
    try:
        time.sleep(0.2)
        policies.rename(tmp_path / "old-policies")
        replacement.rename(policies)
        assert seen.wait(SETTLE_S), "the swap itself reloads"
        time.sleep(0.3)
        edited = time.monotonic()
        (policies / "agov" / "x.rego").write_text("package agov.x\n\ny := 1\n")  # an edit in the new tree
        deadline = edited + SETTLE_S
        while not any(t > edited for t in fired) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert any(t > edited for t in fired), "edits in the swapped-in tree are watched"
    finally:
        watcher.stop()


def test_a_configmap_volume_update_reloads(tmp_path: Path) -> None:
    """Kubernetes swaps the whole volume with one rename of a hidden symlink: no event names a
    policy file, and hidden names are otherwise not changes."""
    policies = tmp_path / ".agov" / "policies"
    policies.mkdir(parents=True)
    configmap_volume(policies, {"agov/x/x.rego": "package agov.x\n"}, "2026_11_22_14_00_00.1")

    def update() -> None:
        configmap_volume(policies, {"agov/x/x.rego": "package agov.x\n\ny := 1\n"}, "2026_11_22_14_05_00.2")

    assert _reloads(policies, update) >= 1, "the swap of ..data reloads"


def test_configmap_volume_updates_print_no_watchdog_warning(tmp_path: Path) -> None:
    """watchdog may add a directory of the new hidden tree twice (its scan of the new directory
    and the directory's own event) and warn that it replaces the callback, with the same one:
    `serve --watch` printed that to stderr at ConfigMap updates. Several updates of a tree with
    nested directories, as the warning came at one update in two or three."""
    policies = tmp_path / "policies"
    policies.mkdir()
    files = {f"agov/{name}/rules/{name}.rego": f"package agov.{name}\n" for name in ("x", "y", "z")}
    configmap_volume(policies, files, "2026_11_22_14_00_00.0")

    def updates() -> None:
        for i in range(1, 21):
            edited = {path: text + f"\ny := {i}\n" for path, text in files.items()}
            configmap_volume(policies, edited, f"2026_11_22_14_{i:02d}_00.{i}")
            time.sleep(0.05)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the watcher's own filter goes in front of this one
        assert _reloads(policies, updates) >= 1
    assert [str(w.message) for w in caught if "already exists" in str(w.message)] == []


def test_a_volume_swap_inside_a_hidden_directory_does_not_reload(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    hidden = policies / ".cache"
    hidden.mkdir(parents=True)
    configmap_volume(hidden, {"x.json": "{}\n"}, "2026_11_22_14_00_00.1")

    def swap() -> None:
        configmap_volume(hidden, {"x.json": '{"edited": true}\n'}, "2026_11_22_14_05_00.2")

    assert _reloads(policies, swap) == 0
