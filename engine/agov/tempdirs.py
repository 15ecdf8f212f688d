"""Temporary working directories that are removed even when their process was killed outright.

A process holds an ``flock`` on its directory's ``owner.lock`` for as long as it uses the
directory; the kernel drops the lock when the process dies, however it dies (SIGKILL, the OOM
killer). The next agov process that makes a directory of the same kind removes those whose lock
it can take. A lock works across pid namespaces (containers that share a temp dir), where a pid
would not.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

OWNER_LOCK = "owner.lock"


def sweep_orphaned(tmp_root: Path, prefix: str) -> list[Path]:
    """Remove the directories named ``prefix*`` under ``tmp_root`` whose owner is gone.

    A directory is removed only when its ``owner.lock`` can be locked now. Directories of other
    users, links, and anything without a lock file or that cannot be read are left alone. Never
    raises.

    Returns:
        The directories removed.
    """
    removed: list[Path] = []
    try:
        candidates = sorted(tmp_root.glob(f"{prefix}*"))
    except Exception:
        return removed
    for path in candidates:
        try:
            if path.is_symlink() or not path.is_dir() or path.stat().st_uid != os.geteuid():
                continue
            fd = os.open(path / OWNER_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except Exception:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except Exception:
            os.close(fd)
            continue  # held: its process lives
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def claim_dir(directory: Path) -> int:
    """Lock ``directory/owner.lock`` for this process; the open descriptor holds the lock.

    The file is locked under another name and then renamed, so a sweep never finds it unlocked.

    Raises:
        OSError: the file cannot be created or locked.
    """
    staging = directory / f".{OWNER_LOCK}"
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())  # for a person looking: who held it
        os.rename(staging, directory / OWNER_LOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def claimed_tempdir(prefix: str) -> Iterator[Path]:
    """A new directory (mode 0700) in the system's temp dir, claimed while in use and removed
    after; the orphans of killed processes with the same ``prefix`` are removed first. On a file
    system without locks the directory is used unclaimed: removed after, but not by a sweep
    should its process be killed.

    Raises:
        OSError: the directory cannot be made.
    """
    sweep_orphaned(Path(tempfile.gettempdir()), prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix))
    fd: int | None = None
    try:
        # no flock here (ENOLCK, EOPNOTSUPP): a build must not fail for want of a sweep
        with contextlib.suppress(OSError):
            fd = claim_dir(path)
        yield path
    finally:
        try:
            shutil.rmtree(path, ignore_errors=True)  # still claimed: no sweep takes it meanwhile
        finally:
            if fd is not None:
                os.close(fd)
