"""A policy build's steps and the signals that stop agov: a SIGTERM or Ctrl-C that arrives while a
step is being started is raised once ``Popen`` has returned (raised from its at-fork hooks, the
exception was dropped and the build waited out its steps), and the step it started is killed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agov import bundle, interrupts


def _mask_of(status: str) -> int:
    return next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigBlk:"))


@pytest.mark.parametrize("other_thread", [False, True])
def test_a_sigterm_during_popen_is_raised_after_it_and_the_started_step_is_killed(
    monkeypatch: pytest.MonkeyPatch, other_thread: bool
) -> None:
    """With another thread alive the kernel may hand the signal to that thread, and Python runs
    the handler in the main thread at its next bytecode: inside Popen."""
    started: list[subprocess.Popen[str]] = []
    real_popen = subprocess.Popen

    def popen_then_sigterm(*args: Any, **kwargs: Any) -> subprocess.Popen[str]:
        proc: subprocess.Popen[str] = real_popen(*args, **kwargs)
        started.append(proc)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the step is being started
        return proc

    monkeypatch.setattr(bundle.subprocess, "Popen", popen_then_sigterm)
    idle = threading.Event()
    bystander = threading.Thread(target=idle.wait, daemon=True)
    if other_thread:
        bystander.start()
    try:
        with interrupts.stop_signals_unwind(), pytest.raises(interrupts.Terminated):
            bundle._start(["sleep", "30"])
    finally:
        idle.set()
    assert len(started) == 1
    assert started[0].poll() is not None, "the step started as SIGTERM came was left running"


def test_a_step_starts_with_the_callers_signal_mask() -> None:
    with interrupts.stop_signals_unwind():
        proc = bundle._start(["grep", "SigBlk", "/proc/self/status"])
        out, _err = proc.communicate(timeout=10)
    assert _mask_of(out) == _mask_of(Path("/proc/thread-self/status").read_text())
    assert _mask_of(out) & (1 << (signal.SIGTERM - 1)) == 0


def test_a_ctrl_c_during_popen_is_raised_after_it_too(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[subprocess.Popen[str]] = []
    real_popen = subprocess.Popen

    def popen_then_ctrl_c(*args: Any, **kwargs: Any) -> subprocess.Popen[str]:
        proc: subprocess.Popen[str] = real_popen(*args, **kwargs)
        started.append(proc)
        os.kill(os.getpid(), signal.SIGINT)
        return proc

    monkeypatch.setattr(bundle.subprocess, "Popen", popen_then_ctrl_c)
    with interrupts.stop_signals_unwind(), pytest.raises(KeyboardInterrupt) as stopped:
        bundle._start(["sleep", "30"])
    assert not isinstance(stopped.value, interrupts.Terminated)
    assert started[0].poll() is not None


def test_a_sigterm_whose_raise_was_dropped_stops_the_wait_for_a_step() -> None:
    with interrupts.stop_signals_unwind():
        proc = bundle._start(["sleep", "30"])
        try:
            with contextlib.suppress(interrupts.Terminated):  # as Python does in an at-fork hook
                interrupts.on_signal(signal.SIGTERM, None)
            began = time.monotonic()
            with pytest.raises(interrupts.Terminated):
                bundle._communicate(proc, time.monotonic() + 60)
            assert time.monotonic() - began < 2, "the build waited for the step instead"
        finally:
            proc.kill()
            proc.wait()
