"""Ctrl-C is not a deny: exit 1 belongs to "denied by policy", so an interrupted command exits
130, as a process stopped by SIGINT does, and says how to finish what it cut short. Before,
click turned it into "Aborted!" and exit 1."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from click.testing import CliRunner

from agov import cli, interrupts


class _Interrupting:
    def reload_policy(self, **_kwargs: Any) -> Any:
        raise KeyboardInterrupt


@contextmanager
def _engine(_ctx: Any) -> Iterator[_Interrupting]:
    yield _Interrupting()


@pytest.mark.parametrize("as_json", [False, True])
def test_an_interrupted_command_exits_130_with_a_way_to_finish(
    monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    monkeypatch.setattr(cli, "_engine", _engine)

    result = CliRunner(env={"AGOV_JSON": None}).invoke(
        cli.main, ["policy", "reload", *(["--json"] if as_json else [])]
    )

    assert result.exit_code == 130, result.output
    if as_json:
        answer = json.loads(result.stdout)
        assert answer["exit_code"] == 130 and answer["error"]["type"] == "Interrupted"
        assert "agov revalidate" in answer["error"]["hint"]
    else:
        assert result.stderr.startswith("error: interrupted\n  hint: what was committed stays committed")
        assert "Aborted!" not in result.output


class _Terminating:
    def reload_policy(self, **_kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` or a CI runner's cancel sends it
        raise AssertionError("SIGTERM did not stop the command")


@contextmanager
def _terminating_engine(_ctx: Any) -> Iterator[_Terminating]:
    yield _Terminating()


@pytest.mark.parametrize("as_json", [False, True])
def test_a_command_stopped_by_sigterm_unwinds_and_exits_143(
    monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    """Before, SIGTERM ended the process where it stood: a build's temporary copy of the policy
    tree stayed in the temp dir, and no message said how to finish."""
    monkeypatch.setattr(cli, "_engine", _terminating_engine)
    previous = signal.getsignal(signal.SIGTERM)

    result = CliRunner(env={"AGOV_JSON": None}).invoke(
        cli.main, ["policy", "reload", *(["--json"] if as_json else [])]
    )

    assert signal.getsignal(signal.SIGTERM) is previous, "the handler lasts as long as the command"
    assert result.exit_code == 143, result.output
    if as_json:
        answer = json.loads(result.stdout)
        assert answer["exit_code"] == 143 and answer["error"]["type"] == "Terminated"
        assert "agov revalidate" in answer["error"]["hint"]
    else:
        assert result.stderr.startswith(
            "error: terminated (SIGTERM)\n  hint: what was committed stays committed"
        )


def test_a_sigterm_whose_exception_python_dropped_is_raised_at_the_next_wait() -> None:
    """Python drops an exception raised in an at-fork hook or a ``__del__``: a SIGTERM that came
    then left a policy build waiting out its steps (two minutes) before."""
    with interrupts.stop_signals_unwind():
        interrupts.raise_if_lost()  # nothing arrived
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here
        except interrupts.Terminated:
            pass  # as Python does with it in an at-fork hook
        with pytest.raises(interrupts.Terminated):
            interrupts.raise_if_lost()
    interrupts.raise_if_lost()  # the next command starts afresh


def test_a_forked_child_before_exec_ignores_the_sigterm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``Popen`` child, between fork and exec, is still in agov's process group; the step it
    becomes ends with agov, so it neither raises nor prints a dropped exception."""
    with interrupts.stop_signals_unwind():
        real_getpid = os.getpid()
        monkeypatch.setattr(os, "getpid", lambda: real_getpid + 1)  # as seen in the child
        assert interrupts.on_signal(signal.SIGTERM, None) is None
        monkeypatch.undo()
        interrupts.raise_if_lost()


def test_a_sigterm_the_parent_ignores_stays_ignored() -> None:
    """As under ``nohup`` or a supervisor that ignores it on purpose."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with interrupts.stop_signals_unwind():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
