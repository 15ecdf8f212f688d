"""Which leftover ``agov-opa-*`` working directories a managed sidecar's start removes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from agov.opa.managed import _process_identity, sweep_orphaned_dirs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftover(root: Path, name: str, owner: str | None) -> Path:
    path = root / f"agov-opa-{name}"
    path.mkdir()
    (path / "opa-config.yaml").write_text("services: {}\n")
    if owner is not None:
        (path / "owner").write_text(owner)
    return path


def test_only_directories_of_gone_processes_are_removed(tmp_path: Path) -> None:
    me = _process_identity(os.getpid())
    assert me is not None and me.startswith(f"{os.getpid()} ")
    dead = _dead_pid()
    gone = _leftover(tmp_path, "gone", f"{dead} 12345")
    reused = _leftover(tmp_path, "reused", f"{os.getpid()} 1")  # same pid, another start time
    gone_pid_only = _leftover(tmp_path, "gone-pid-only", str(dead))
    live = _leftover(tmp_path, "live", me)
    live_pid_only = _leftover(tmp_path, "live-pid-only", str(os.getpid()))
    no_owner = _leftover(tmp_path, "no-owner", None)
    garbage = _leftover(tmp_path, "garbage", "not a pid")
    other = tmp_path / "opa-other"  # not agov's prefix, whatever its owner file says
    other.mkdir()
    (other / "owner").write_text(f"{dead} 12345")

    removed = sweep_orphaned_dirs(tmp_path)

    assert sorted(removed) == sorted([gone, reused, gone_pid_only])
    for path in (gone, reused, gone_pid_only):
        assert not path.exists()
    for path in (live, live_pid_only, no_owner, garbage, other):
        assert path.is_dir()


def test_links_and_files_are_never_followed_or_removed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "owner").write_text(f"{_dead_pid()} 1")
    link = tmp_path / "agov-opa-link"
    link.symlink_to(target, target_is_directory=True)
    plain = tmp_path / "agov-opa-file"
    plain.write_text("x")

    assert sweep_orphaned_dirs(tmp_path) == []
    assert link.is_symlink() and (target / "owner").is_file() and plain.is_file()


def test_a_missing_root_removes_nothing(tmp_path: Path) -> None:
    assert sweep_orphaned_dirs(tmp_path / "absent") == []
