"""A closed pipe is a quiet stop (exit 141) only when it is standard output's reader that went
away (``agov audit export | head -1``). Any other broken pipe or socket is an error to report:
before, every BrokenPipeError was taken for a closed stdout and the command exited 141, silent."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from click.testing import CliRunner

from agov import cli


class _PipeBreaking:
    def reload_policy(self, **_kwargs: Any) -> Any:
        raise BrokenPipeError(32, "Broken pipe")


@contextmanager
def _engine(_ctx: Any) -> Iterator[_PipeBreaking]:
    yield _PipeBreaking()


def test_a_broken_pipe_that_is_not_stdout_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_engine", _engine)

    result = CliRunner(env={"AGOV_JSON": None}).invoke(cli.main, ["policy", "reload"])

    assert result.exit_code == 3, result.output
    assert result.stderr.startswith("error: internal error: BrokenPipeError")


@pytest.mark.parametrize("reader_open", [True, False])
def test_stdout_counts_as_gone_only_when_its_reader_closed_the_pipe(
    monkeypatch: pytest.MonkeyPatch, reader_open: bool
) -> None:
    read_end, write_end = os.pipe()
    if not reader_open:
        os.close(read_end)
    with os.fdopen(write_end, "w") as stdout:
        monkeypatch.setattr("sys.stdout", stdout)
        assert cli._stdout_reader_gone() is (not reader_open)
    if reader_open:
        os.close(read_end)


def test_stdout_that_is_no_file_is_not_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert cli._stdout_reader_gone() is False
