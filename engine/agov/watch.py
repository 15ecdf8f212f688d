"""Watch a workspace's policies (and its config file) and reload on change (watchdog, debounced)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileClosedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

_WATCHED_SUFFIXES = (".rego", ".json", ".yaml", ".yml")
_CHANGES = frozenset({"created", "modified", "moved", "deleted", "closed"})


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
        if event.is_directory or event.event_type not in _CHANGES:
            return
        # An atomic save (write a temp file, rename it over the target) names the policy file
        # only as the rename's destination.
        paths = (str(event.src_path), str(getattr(event, "dest_path", "") or ""))
        if not any(self._is_policy_file(p) or os.path.abspath(p) in self._files for p in paths if p):
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
        if not path.endswith(_WATCHED_SUFFIXES):
            return False
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
        self._run_lock = threading.Lock()
        self._on_change = on_change
        files = (config_file,) if config_file is not None else ()
        self._handler = _Debounced(policies, self._fire, debounce_s, files)
        self._observer = Observer()
        self._observer.schedule(self._handler, str(policies), recursive=True)
        if config_file is not None:
            # Its directory also holds agov.db, written at every commit: only completed saves
            # (a write closed, or a temp file renamed over it) are asked of the kernel there.
            self._observer.schedule(
                self._handler,
                str(config_file.parent),
                recursive=False,
                event_filter=[FileClosedEvent, FileMovedEvent],
            )

    def _fire(self) -> None:
        with self._run_lock:
            self._on_change()

    def start(self) -> None:
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()  # first: no new events may schedule a reload
        self._observer.join(timeout=5)
        self._handler.cancel()
