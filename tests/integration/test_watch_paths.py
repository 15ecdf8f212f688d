"""Which edits the policy watcher reacts to, wherever the workspace lives.

`serve --watch` once ignored every edit of a workspace under a hidden directory (the README's
own ``AGOV_HOME=/tmp/tour/.agov``, or ``~/.agov``): hidden names were looked for in the whole
absolute path instead of below the watched root.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agov.watch import PolicyWatcher

SETTLE_S = 1.0  # well above the debounce, for a slow machine


def _watch(policies: Path, edit: Path, content: str) -> int:
    """Start a watcher on ``policies``, write ``edit`` and count the reloads it triggers."""
    fired: list[float] = []
    seen = threading.Event()

    def on_change() -> None:
        fired.append(time.monotonic())
        seen.set()

    watcher = PolicyWatcher(policies, on_change, debounce_s=0.05)
    watcher.start()
    try:
        time.sleep(0.2)  # the observer's watches are in place
        edit.parent.mkdir(parents=True, exist_ok=True)
        edit.write_text(content)
        seen.wait(SETTLE_S)
        time.sleep(0.2)
    finally:
        watcher.stop()
    return len(fired)


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
