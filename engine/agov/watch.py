"""Watch a workspace's policies (and its config file) and reload on change (watchdog, debounced)."""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch

_WATCHED_SUFFIXES = (".rego", ".json", ".yaml", ".yml")
_CHANGES = frozenset({"created", "modified", "moved", "deleted", "closed"})
# A directory moved out of the tree takes its files with it without an event of theirs; a
# directory's "modified" only echoes the file events inside it.
_DIRECTORY_CHANGES = frozenset({"created", "moved", "deleted"})
# A Kubernetes ConfigMap or Secret volume changes its files all at once: the kubelet writes them to
# a new hidden directory and renames a symlink to ``..data`` over the old one, so the files' own
# names (symlinks through ``..data``) see no event at all.
_VOLUME_SWAP_NAME = "..data"
# watchdog's recursive inotify watch can add a directory that appears inside a new one twice (from
# its scan of the new directory and from the directory's own event), and warns on the second add
# that it replaces the callback, with the same callback. A ConfigMap update makes such trees.
_SAME_CALLBACK_AGAIN = r"Callback with id '[^']*' already exists for watch"


class _Debounced(FileSystemEventHandler):
    def __init__(
        self, root: Path, callback: Callable[[], None], delay_s: float, files: tuple[Path, ...] = ()
    ) -> None:
        self._root = Path(os.path.abspath(root))
        self._files = frozenset(os.path.abspath(f) for f in files)
        self._callback = callback
        self._delay_s = delay_s
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Reads (opened, closed_no_write) are not changes: reacting to them would make every
        # reload, which reads the policy files, schedule the next one.
        if event.event_type not in _CHANGES:
            return
        # An atomic save (write a temp file, rename it over the target) names the policy file
        # only as the rename's destination.
        paths = [p for p in (str(event.src_path), str(getattr(event, "dest_path", "") or "")) if p]
        if not self._is_change(event, paths):
            return
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            # Editors write in several steps (temp file, rename); one reload after they settle.
            self._timer = threading.Timer(self._delay_s, self._callback)
            self._timer.daemon = True
            self._timer.start()

    def _is_policy_file(self, path: str) -> bool:
        """A policy or data file in the tree: hidden names count only *below* the watched root
        (an editor's ``.x.rego.swp``, a ``.git`` directory), so a workspace that itself lives
        under a hidden directory (``~/.agov``) is still watched."""
        return path.endswith(_WATCHED_SUFFIXES) and self._in_tree(path)

    def _is_change(self, event: FileSystemEvent, paths: list[str]) -> bool:
        if any(self._is_volume_swap(p) for p in paths):
            return True
        if event.is_directory:
            return event.event_type in _DIRECTORY_CHANGES and any(self._in_tree(p) for p in paths)
        return any(self._is_policy_file(p) or os.path.abspath(p) in self._files for p in paths)

    def _is_volume_swap(self, path: str) -> bool:
        """``..data`` at the root of the tree or in a directory below it that is not hidden."""
        path = os.path.abspath(path)
        return os.path.basename(path) == _VOLUME_SWAP_NAME and self._in_tree(os.path.dirname(path))

    def _in_tree(self, path: str) -> bool:
        """The root itself (replaced by a rename), or a path below it with no hidden name."""
        try:
            inside = Path(os.path.abspath(path)).relative_to(self._root)
        except ValueError:
            return False
        return not any(part.startswith(".") for part in inside.parts)

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()


class PolicyWatcher:
    """Calls ``on_change`` once per burst of edits under ``policies``; serialised, never concurrent."""

    def __init__(
        self,
        policies: Path,
        on_change: Callable[[], None],
        *,
        debounce_s: float = 0.1,
        config_file: Path | None = None,
    ) -> None:
        """``config_file`` (``agov.yaml``) is watched too: its org limits judge agents."""
        warnings.filterwarnings(
            "ignore", message=_SAME_CALLBACK_AGAIN, category=RuntimeWarning, module=r"watchdog\.observers\."
        )
        self._run_lock = threading.Lock()
        self._stopped = threading.Event()
        self._on_change = on_change
        self._policies = policies
        files = (config_file,) if config_file is not None else ()
        self._handler = _Debounced(policies, self._fire, debounce_s, files)
        self._observer = Observer()
        self._tree_inode = _inode(policies)
        self._tree_watch: ObservedWatch | None = self._observer.schedule(
            self._handler, str(policies), recursive=True
        )
        if config_file is not None:
            # Its directory also holds agov.db, written at every commit: only completed saves
            # (a write closed, or a temp file renamed over it) are asked of the kernel there,
            # and directories made or renamed there (the policies directory replaced by another).
            self._observer.schedule(
                self._handler,
                str(config_file.parent),
                recursive=False,
                event_filter=[FileClosedEvent, FileMovedEvent, DirCreatedEvent, DirMovedEvent],
            )

    def _fire(self) -> None:
        with self._run_lock:
            if self._stopped.is_set():  # a timer that went off as the watch stopped
                return
            self._follow_tree()
            self._on_change()

    def _follow_tree(self) -> None:
        """The kernel watches a directory, not its name: once another directory has been renamed
        to ``policies`` (a whole tree swapped in), watch that one from now on."""
        inode = _inode(self._policies)
        if inode is None or inode == self._tree_inode:
            return
        if self._tree_watch is not None:
            with contextlib.suppress(KeyError):  # its directory may be gone, and its watch with it
                self._observer.unschedule(self._tree_watch)
            self._tree_watch = None
        try:
            self._tree_watch = self._observer.schedule(self._handler, str(self._policies), recursive=True)
        except OSError:
            return  # renamed again meanwhile: the event of that rename brings us back here
        self._tree_inode = inode

    def start(self) -> None:
        self._observer.start()

    def stop(self, wait_s: float = 0.0) -> bool:
        """Stop watching, and wait up to ``wait_s`` for a reload in progress to return.

        Returns:
            Whether no reload is running any more.
        """
        self._stopped.set()
        self._observer.stop()  # first: no new events may schedule a reload
        self._observer.join(timeout=5)
        self._handler.cancel()
        if not self._run_lock.acquire(timeout=max(wait_s, 0.0)):
            return False
        self._run_lock.release()
        return True


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino
