"""Ctrl-C while the `agov` command still imports its CLI: exit 130 and a message, no traceback.

Before, SIGINT in that first quarter second printed a traceback from deep in an import."""

from __future__ import annotations

import builtins
import json
from typing import Any

import pytest

from agov import entry


@pytest.fixture
def interrupted_import(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def importing(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "agov.cli":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", importing)
    monkeypatch.delenv("AGOV_JSON", raising=False)


@pytest.mark.usefixtures("interrupted_import")
def test_ctrl_c_during_the_import_exits_130_with_a_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.argv", ["agov", "revalidate", "--dry-run"])
    with pytest.raises(SystemExit) as stopped:
        entry.main()
    assert stopped.value.code == 130
    out, err = capsys.readouterr()
    assert (out, err.splitlines()[0]) == ("", "error: interrupted")
    assert "Traceback" not in err

    monkeypatch.setattr("sys.argv", ["agov", "--json", "admit", "x"])
    with pytest.raises(SystemExit):
        entry.main()
    answer = json.loads(capsys.readouterr().out)
    assert answer["exit_code"] == 130 and answer["error"]["type"] == "Interrupted"


def test_without_an_interruption_the_cli_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.argv", ["agov", "--version"])
    with pytest.raises(SystemExit) as stopped:
        entry.main()
    assert stopped.value.code == 0
    assert "agov" in capsys.readouterr().out
