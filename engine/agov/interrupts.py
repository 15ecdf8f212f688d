"""SIGTERM as a stop request that a command unwinds from, as it does from Ctrl-C.

The handler raises :class:`Terminated` in the main thread. Python drops an exception raised
while it runs a callback that cannot propagate one (an at-fork hook, a ``__del__``, a weakref
callback), so the handler also records the signal, and a policy build's wait for its steps calls
:func:`raise_if_lost` to raise it after all.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

# Plain values, not a threading.Event: a handler that takes a lock deadlocks when a second signal
# interrupts it while it holds that lock.
_arrived = False  # a SIGTERM came; the raise from the handler may have been dropped
_installed_by: int | None = None  # the pid of the process that installed the handler


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, a CI job's cancel, ``kill``) stopped a command."""


def on_sigterm(_signum: int, _frame: object) -> None:
    """A ``signal.signal`` handler for SIGTERM."""
    global _arrived
    if os.getpid() != _installed_by:
        # a child of ``Popen`` between fork and exec, still in agov's process group: the step
        # it is about to become ends with agov (PR_SET_PDEATHSIG), so nothing to raise or print
        return
    _arrived = True
    raise Terminated


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in this (the main) thread; the
    previous handler is back after it. A SIGTERM that the parent process chose to ignore stays
    ignored."""
    global _arrived, _installed_by
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:
        yield
        return
    _arrived = False
    _installed_by = os.getpid()
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _arrived = False


def raise_if_lost() -> None:
    """Raise :class:`Terminated` if a SIGTERM arrived, in case the handler's raise was dropped.

    Raises:
        Terminated: a SIGTERM arrived.
    """
    if _arrived:
        raise Terminated
