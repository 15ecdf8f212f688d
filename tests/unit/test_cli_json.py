"""`agov --json COMMAND` answers in JSON for that call only, and Ctrl-C at a prompt exits 130.

Before, the global flag was kept in the process environment (AGOV_JSON=1), so every later
command run in the same process answered in JSON too; and click turned Ctrl-C at a prompt into
"aborted: no answer to a prompt" (exit 2)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import pytest
from click.testing import CliRunner

from agov import cli


def test_json_before_the_command_applies_to_that_call_only(tmp_path: Path) -> None:
    runner = CliRunner(env={"AGOV_JSON": None})
    nowhere = str(tmp_path / "nowhere")

    first = runner.invoke(cli.main, ["--json", "keys", "list", "--home", nowhere])
    second = runner.invoke(cli.main, ["keys", "list", "--home", nowhere])
    between = runner.invoke(cli.main, ["keys", "--json", "list", "--home", nowhere])

    assert first.exit_code == second.exit_code == between.exit_code == 2
    assert json.loads(first.stdout)["error"]["type"] == "WorkspaceError"
    assert second.stdout == "" and second.stderr.startswith("error: no agov workspace at")
    assert json.loads(between.stdout)["error"]["type"] == "WorkspaceError", (
        "after the group, before the command"
    )


@contextmanager
def _engine(_ctx: Any) -> Iterator[Any]:
    yield SimpleNamespace(config=SimpleNamespace(limits=SimpleNamespace(max_spec_bytes=1024)))


def test_ctrl_c_at_a_prompt_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    def answers() -> dict[str, Any]:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:  # what click.prompt does with it
            raise click.exceptions.Abort() from exc

    monkeypatch.setattr(cli, "_engine", _engine)
    monkeypatch.setattr(cli, "_interactive_answers", answers)

    result = CliRunner(env={"AGOV_JSON": None}).invoke(cli.main, ["agent", "create", "--interactive"])

    assert result.exit_code == 130, result.output
    assert result.stderr.startswith("error: interrupted")


def test_a_resumed_run_says_its_changes_before_the_interruption_are_not_listed() -> None:
    from agov.cli import _revalidation_text

    report = {
        "dry_run": False,
        "resumed": True,
        "total": 2,
        "policy_hash": "ab" * 32,
        "valid": 1,
        "restricted": 0,
        "invalidated": 1,
        "newly_invalidated": 1,
        "restored": 0,
        "changes": [],
        "changes_omitted": 2,
    }
    text = _revalidation_text(report)
    assert "... and 2 more changes" in text
    assert "changes made before the interruption are not listed" in text
    assert "not listed" not in _revalidation_text({**report, "resumed": False})


def _ctx_of(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str | None] | None = None
) -> Any:
    """The Ctx a command runs with for ``argv`` (the command itself not run)."""
    seen: list[Any] = []
    monkeypatch.setattr(cli, "_run", lambda _func, ctx, _as_json, _kwargs: seen.append(ctx))
    base: dict[str, str | None] = {"AGOV_HOME": None, "AGOV_ACTOR": None, "AGOV_JSON": None}
    result = CliRunner(env={**base, **(env or {})}).invoke(cli.main, argv)
    assert result.exit_code == 0, result.output
    (ctx,) = seen
    return ctx


def test_home_actor_and_opa_url_may_come_before_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """`agov --home W admit X` failed with "No such option '--home'", though the hint for a
    missing workspace says "pass --home" and --json works there."""
    ctx = _ctx_of(monkeypatch, ["--home", "w1", "--actor", "bob", "--opa-url", "unix:///s", "admit", "x"])
    assert (ctx.home, ctx.actor, ctx.opa_url) == (Path("w1"), "bob", "unix:///s")
    # after a group, before its command
    ctx = _ctx_of(monkeypatch, ["policy", "--home", "w2", "--actor", "carol", "history"])
    assert (ctx.home, ctx.actor, ctx.opa_url) == (Path("w2"), "carol", None)


def test_an_option_given_to_the_command_itself_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _ctx_of(
        monkeypatch, ["--home", "outer", "--actor", "bob", "agent", "--home", "mid", "list", "--home", "own"]
    )
    assert (ctx.home, ctx.actor) == (Path("own"), "bob")
    ctx = _ctx_of(monkeypatch, ["--home", "outer", "agent", "--home", "mid", "list"])
    assert ctx.home == Path("mid"), "the nearest group's"


def test_a_group_option_wins_over_the_environment_and_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"AGOV_HOME": "from-env", "AGOV_ACTOR": "env-actor"}
    ctx = _ctx_of(monkeypatch, ["--home", "typed", "admit", "x"], env)
    assert (ctx.home, ctx.actor) == (Path("typed"), "env-actor")
    ctx = _ctx_of(monkeypatch, ["admit", "x"], env)
    assert (ctx.home, ctx.actor) == (Path("from-env"), "env-actor")
    ctx = _ctx_of(monkeypatch, ["admit", "x"])
    assert ctx.home == Path(".agov")


def test_each_option_reads_its_agov_variable_as_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    """CONVENTIONS: every option can also be set from the environment. A command's own option
    reads AGOV_<COMMAND>_<OPTION> (the README says so); AGOV_OPA_URL alone is agov.yaml's
    external runtime, never the override --opa-url is."""
    ctx = _ctx_of(monkeypatch, ["admit", "x"], {"AGOV_ADMIT_OPA_URL": "unix:///own.sock"})
    assert ctx.opa_url == "unix:///own.sock"
    ctx = _ctx_of(monkeypatch, ["admit", "x"], {"AGOV_OPA_URL": "unix:///s"})
    assert ctx.opa_url is None
    ctx = _ctx_of(
        monkeypatch, ["admit", "x", "--opa-url", "unix:///typed"], {"AGOV_ADMIT_OPA_URL": "unix:///e"}
    )
    assert ctx.opa_url == "unix:///typed", "the command line wins"
