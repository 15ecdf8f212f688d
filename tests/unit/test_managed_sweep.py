"""Which leftover working directories (a managed sidecar's ``agov-opa-*``, a policy build's
``agov-bundle-*``) the next one of their kind removes."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from agov import tempdirs
from agov.opa.managed import sweep_orphaned_dirs
from agov.tempdirs import claim_dir, claimed_tempdir, sweep_orphaned

_HOLD = """
import sys
from pathlib import Path
from agov.tempdirs import claim_dir
fd = claim_dir(Path(sys.argv[1]))
print("held", flush=True)
sys.stdin.read()
"""


def _workdir(root: Path, name: str) -> Path:
    path = root / f"agov-opa-{name}"
    path.mkdir()
    (path / "opa-config.yaml").write_text("services: {}\n")
    return path


def _unlocked(root: Path, name: str) -> Path:
    path = _workdir(root, name)
    os.close(claim_dir(path))  # the owner is gone: its lock went with it
    return path


def test_only_directories_whose_lock_is_free_are_removed(tmp_path: Path) -> None:
    gone = _unlocked(tmp_path, "gone")
    held_here = _workdir(tmp_path, "held-here")
    fd = claim_dir(held_here)
    held_elsewhere = _workdir(tmp_path, "held-elsewhere")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(held_elsewhere)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    no_lock = _workdir(tmp_path, "no-lock")
    other_prefix = tmp_path / "opa-other"
    other_prefix.mkdir()
    os.close(claim_dir(other_prefix))
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"

        assert sweep_orphaned_dirs(tmp_path) == [gone]

        assert not gone.exists()
        for path in (held_here, held_elsewhere, no_lock, other_prefix):
            assert path.is_dir()
        holder.kill()  # as a SIGKILLed agov: the kernel drops the lock
        holder.wait(10)
        assert sweep_orphaned_dirs(tmp_path) == [held_elsewhere]
    finally:
        os.close(fd)
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    assert sweep_orphaned_dirs(tmp_path) == [held_here]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agov-opa-no-lock", "opa-other"]


def test_a_lock_is_never_seen_unlocked_under_its_name(tmp_path: Path) -> None:
    fd = claim_dir(tmp_path)
    try:
        probe = os.open(tmp_path / "owner.lock", os.O_RDONLY)
        try:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                taken = True
            except BlockingIOError:
                taken = False
            assert not taken
        finally:
            os.close(probe)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["owner.lock"]
    finally:
        os.close(fd)


def test_links_and_files_are_never_followed_or_removed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.close(claim_dir(target))
    link = tmp_path / "agov-opa-link"
    link.symlink_to(target, target_is_directory=True)
    plain = tmp_path / "agov-opa-file"
    plain.write_text("x")
    lock_link = _workdir(tmp_path, "lock-link")
    (lock_link / "owner.lock").symlink_to(target / "owner.lock")

    assert sweep_orphaned_dirs(tmp_path) == []
    assert link.is_symlink() and (target / "owner.lock").is_file() and plain.is_file() and lock_link.is_dir()


def test_a_missing_root_removes_nothing(tmp_path: Path) -> None:
    assert sweep_orphaned_dirs(tmp_path / "absent") == []


def test_a_claimed_tempdir_sweeps_the_orphans_of_its_kind_and_removes_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Policy builds use it for their snapshot: a build killed outright left its copy of the
    policy tree in the temp dir for good."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    orphan = tmp_path / "agov-bundle-orphan"
    orphan.mkdir()
    os.close(claim_dir(orphan))
    held = tmp_path / "agov-bundle-held"
    held.mkdir()
    fd = claim_dir(held)
    sidecar_orphan = _unlocked(tmp_path, "orphan")  # another kind: its own sweep removes it
    try:
        with claimed_tempdir("agov-bundle-") as work:
            assert work.parent == tmp_path and work.name.startswith("agov-bundle-")
            assert stat.S_IMODE(work.stat().st_mode) == 0o700
            assert not orphan.exists() and held.is_dir() and sidecar_orphan.is_dir()
            assert sweep_orphaned(tmp_path, "agov-bundle-") == []  # its own is claimed while in use
            (work / "snapshot").mkdir()
        assert not work.exists()
        with pytest.raises(RuntimeError), claimed_tempdir("agov-bundle-") as failed:
            raise RuntimeError("a build step failed")
        assert not failed.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["agov-bundle-held", "agov-opa-orphan"]
    finally:
        os.close(fd)


def test_a_temp_dir_without_locks_is_used_unclaimed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system without flock (ENOLCK) must not fail every policy build."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def no_locks(_directory: Path) -> int:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(tempdirs, "claim_dir", no_locks)
    with claimed_tempdir("agov-bundle-") as work:
        (work / "snapshot").mkdir()
    assert not work.exists()
