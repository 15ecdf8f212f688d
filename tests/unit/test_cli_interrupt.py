"""Ctrl-C is not a deny: exit 1 belongs to "denied by policy", so an interrupted command exits
130, as a process stopped by SIGINT does, and says how to finish what it cut short. Before,
click turned it into "Aborted!" and exit 1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from click.testing import CliRunner

from agov import cli


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
