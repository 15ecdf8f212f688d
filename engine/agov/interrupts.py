"""SIGTERM and Ctrl-C as stop requests that a command unwinds from.

The handlers raise :class:`Terminated` (SIGTERM) or ``KeyboardInterrupt`` (SIGINT) in the main
thread. Python drops an exception raised while it runs a callback that cannot propagate one (an
at-fork hook of ``subprocess.Popen``, a ``__del__``, a weakref callback), so:

- within :func:`deferred` (around ``Popen``) a handler only records the signal, which is raised
  when the block ends;
- a handler always records the signal, and a policy build's wait for its steps calls
  :func:`raise_if_lost` to raise one whose exception was dropped elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

# Plain values, not a threading.Event: a handler that takes a lock deadlocks when a second signal
# interrupts it while it holds that lock.
_arrived: int | None = None  # the last signal that came; its exception may have been dropped
_deferring = False  # within deferred(): record only
_installed_by: int | None = None  # the pid of the process that installed the handlers
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, a CI job's cancel, ``kill``) stopped a command."""


def _stop(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def on_signal(signum: int, _frame: object) -> None:
    """The ``signal.signal`` handler for SIGINT and SIGTERM."""
    global _arrived
    if os.getpid() != _installed_by:
        # a child of ``Popen`` between fork and exec, still in agov's process group: the step
        # it is about to become ends with agov (PR_SET_PDEATHSIG), so nothing to raise or print
        return
    _arrived = signum
    if not _deferring:
        raise _stop(signum)


@contextlib.contextmanager
def stop_signals_unwind() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` and Ctrl-C ``KeyboardInterrupt`` in
    this (the main) thread; the previous handlers are back after it. A signal that the parent
    process chose to ignore stays ignored."""
    global _arrived, _installed_by
    previous = {s: signal.getsignal(s) for s in _SIGNALS}
    taken = [s for s, handler in previous.items() if handler not in (signal.SIG_IGN, None)]
    _arrived = None
    _installed_by = os.getpid()
    for s in taken:
        signal.signal(s, on_signal)
    try:
        yield
    finally:
        for s in taken:
            signal.signal(s, previous[s])
        _arrived = None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block, a stop signal is recorded, not raised; it is raised when the block ends
    (even when the block raised: the stop wins). Outside the main thread it changes nothing.

    Raises:
        KeyboardInterrupt: (or :class:`Terminated`) a stop signal came during the block.
    """
    global _deferring
    if threading.current_thread() is not threading.main_thread() or _deferring:
        yield
        return
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
        raise_if_lost()


def raise_if_lost() -> None:
    """Raise the stop signal that arrived, in case its exception was dropped or deferred.

    Raises:
        KeyboardInterrupt: (or :class:`Terminated`) a stop signal arrived.
    """
    if _arrived is not None:
        raise _stop(_arrived)
