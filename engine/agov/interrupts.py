"""SIGTERM as a stop request that a command unwinds from, as it does from Ctrl-C.

The handler raises :class:`Terminated` in the main thread. Python drops an exception raised
while it runs a callback that cannot propagate one: an at-fork hook (a signal during
``subprocess.Popen``), a ``__del__``, a weakref callback. The handler therefore also records the
signal, and the long waits of a command (a policy build's steps, a revalidation's chunks) call
:func:`raise_if_lost` to raise it after all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

_lost = threading.Event()  # set by the handler; a raise from it may have been dropped
_installed_by: int | None = None  # the pid of the process that installed the handler


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, a CI job's cancel, ``kill``) stopped a command."""


def on_sigterm(_signum: int, _frame: object) -> None:
    """A ``signal.signal`` handler for SIGTERM."""
    if os.getpid() != _installed_by:
        # a child of ``Popen`` between fork and exec, still in agov's process group: the step
        # it is about to become ends with agov (PR_SET_PDEATHSIG), so nothing to raise or print
        return
    _lost.set()
    raise Terminated


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in this (the main) thread; the
    previous handler is back after it."""
    global _installed_by
    previous = signal.getsignal(signal.SIGTERM)
    _lost.clear()
    _installed_by = os.getpid()
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _lost.clear()


def raise_if_lost() -> None:
    """Raise :class:`Terminated` if a SIGTERM arrived, in case the handler's raise was dropped.

    Raises:
        Terminated: a SIGTERM arrived.
    """
    if _lost.is_set():
        raise Terminated
