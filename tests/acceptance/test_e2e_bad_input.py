"""Bad input: exit 2, a message naming the problem, and nothing changed but one audit event.

After every rejection, every table but ``audit_events`` is compared row by row, and the audit
log may only have grown by a single ``REQUEST_REJECTED`` event.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_support import (
    Result,
    Snapshot,
    agov,
    assert_only_audit_changed,
    assert_rejected_unchanged,
    copy_ws,
    expect_error,
    make_spec,
    new_audit,
    ok,
    parallel,
    patched,
    snapshot,
    write_doc,
)

pytestmark = pytest.mark.acceptance

BASE = make_spec("base-agent")


@dataclass(frozen=True)
class Files:
    dir: Path

    def __call__(self, name: str) -> str:
        return str(self.dir / name)


@pytest.fixture(scope="module")
def ws(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Files]:
    root = tmp_path_factory.mktemp("bad-input")
    home = copy_ws(pristine, root / "ws")
    files = root / "files"
    write_doc(files / "base.yaml", BASE)
    ok("agent", "create", "--from-file", files / "base.yaml", home=home)

    write_doc(files / "good.yaml", make_spec("good-agent"))
    write_doc(files / "hot.yaml", patched(make_spec("hot-agent"), "spec.anatomy.reasoning.temperature", 5))
    write_doc(files / "role.yaml", patched(make_spec("role-agent"), "spec.role_class", "wizard"))
    (files / "broken.yaml").write_text("apiVersion: [agov/v1\nkind: : Agent\n")
    (files / "dir.yaml").mkdir()
    (files / "big.yaml").write_text("# padding\n" * 30_000 + "apiVersion: agov/v1\n")
    # one alias is enough to be refused (the unit test shows a real bomb never expands), and a
    # regression then costs nothing
    (files / "alias.yaml").write_text("apiVersion: &v agov/v1\nkind: *v\n")
    # a pipe has no size to check first; it is fed one byte over the limit, so that a regression
    # (reading to the end) reads no more than that
    stream = files / "stream.yaml"
    os.mkfifo(stream)

    def feed() -> None:
        with stream.open("wb") as pipe:
            pipe.write(b"#" * (262_144 + 1))

    threading.Thread(target=feed, daemon=True).start()
    write_doc(files / "leaky.yaml", make_spec("leaky-agent", external_calls=True))
    write_doc(
        files / "leaky-event.json",
        {
            "event": "agent.registered",
            "source": "reg",
            "delivery_id": "1",
            "agent": make_spec("ev-leaky", external_calls=True),
        },
        "json",
    )
    write_doc(files / "other-id.yaml", make_spec("other-agent"))
    write_doc(files / "base-hot.yaml", patched(BASE, "spec.anatomy.reasoning.temperature", 5))
    write_doc(
        files / "workflow.yaml",
        {"name": "Half Flow", "steps": [{"name": "a", "uses": "x.read"}, {"name": "b", "resource": "db"}]},
    )
    return home, Files(files)


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Files], list[str]]
    message: str  # a regex the error message must match
    error: str  # the error type named in the JSON answer


CASES = [
    Case(
        "schema-violation",
        lambda f: ["agent", "create", "--from-file", f("hot.yaml")],
        r"^spec/anatomy/reasoning/temperature: 5 is greater than the maximum of 2$",
        "SpecError",
    ),
    Case(
        "schema-enum",
        lambda f: ["agent", "create", "--from-file", f("role.yaml")],
        r"^spec/role_class: 'wizard' is not one of \['compliance', 'analysis', 'ideation'\]$",
        "SpecError",
    ),
    Case(
        "unparseable-yaml",
        lambda f: ["agent", "create", "--from-file", f("broken.yaml")],
        r"broken\.yaml is not valid YAML or JSON",
        "SpecError",
    ),
    Case(
        "missing-file",
        lambda f: ["agent", "create", "--from-file", f("missing.yaml")],
        r"^file not found: .*/missing\.yaml$",
        "UsageError",
    ),
    Case(
        "directory",
        lambda f: ["agent", "create", "--from-file", f("dir.yaml")],
        r"dir\.yaml is a directory, not a file$",
        "UsageError",
    ),
    Case(
        "oversized",
        lambda f: ["agent", "create", "--from-file", f("big.yaml")],
        r"big\.yaml is 300020 bytes, over the 262144-byte limit$",
        "SpecError",
    ),
    Case(
        "stream-over-the-limit",  # no size to check first: read no further than the limit
        lambda f: ["agent", "create", "--from-file", f("stream.yaml")],
        r"stream\.yaml holds more than the 262144-byte limit$",
        "SpecError",
    ),
    Case(
        "yaml-alias",
        lambda f: ["agent", "create", "--from-file", f("alias.yaml")],
        r"alias\.yaml uses a YAML alias \(\*v\), which agov does not accept$",
        "SpecError",
    ),
    Case(
        "unknown-show", lambda f: ["agent", "show", "ghost"], r"^no agent with id 'ghost'$", "NotFoundError"
    ),
    Case(
        "unknown-update",
        lambda f: ["agent", "update", "ghost", "--from-file", f("good.yaml")],
        r"^no agent with id 'ghost'$",
        "NotFoundError",
    ),
    Case(
        "unknown-promote",
        lambda f: ["promote", "ghost", "--role", "agent_admin"],
        r"^no agent with id 'ghost'$",
        "NotFoundError",
    ),
    Case("unknown-admit", lambda f: ["admit", "ghost"], r"^no agent with id 'ghost'$", "NotFoundError"),
    Case(
        "unknown-history",
        lambda f: ["agent", "history", "ghost"],
        r"^no agent with id 'ghost'$",
        "NotFoundError",
    ),
    Case(
        "unknown-clone",
        lambda f: ["agent", "create", "--clone", "ghost", "--id", "ghost-copy"],
        r"^no agent with id 'ghost'$",
        "NotFoundError",
    ),
    Case(
        "duplicate-id",
        lambda f: ["agent", "create", "--template", "research-analyst", "--id", "base-agent"],
        r"^an agent with id 'base-agent' already exists$",
        "UsageError",
    ),
    Case(
        "two-modes",
        lambda f: ["agent", "create", "--from-file", f("good.yaml"), "--template", "research-analyst"],
        r"^choose one creation mode, not --from-file and --template$",
        "UsageError",
    ),
    Case("no-mode", lambda f: ["agent", "create"], r"^say how to create the agent$", "UsageError"),
    Case(
        "not-contained",
        lambda f: ["agent", "create", "--from-file", f("leaky.yaml")],
        r"^spec/containment: a new agent starts in the sandbox and must be contained$",
        "SpecError",
    ),
    Case(
        "not-contained-event",
        lambda f: ["agent", "create", "--from-event", f("leaky-event.json")],
        r"^spec/containment: ",
        "SpecError",
    ),
    Case(
        "workflow-step-without-uses",
        lambda f: ["agent", "create", "--from-workflow", f("workflow.yaml")],
        r"^steps/1/uses: each step needs a 'uses' naming its action type$",
        "SpecError",
    ),
    Case(
        "update-other-id",
        lambda f: ["agent", "update", "base-agent", "--from-file", f("other-id.yaml")],
        r"^metadata/id: metadata\.id is 'other-agent', not 'base-agent'$",
        "SpecError",
    ),
    Case(
        "update-schema-violation",
        lambda f: ["agent", "update", "base-agent", "--from-file", f("base-hot.yaml")],
        r"^spec/anatomy/reasoning/temperature: ",
        "SpecError",
    ),
    Case(
        "unknown-status",
        lambda f: ["agent", "list", "--status", "BOGUS"],
        r"^unknown status 'BOGUS'$",
        "UsageError",
    ),
]


@dataclass(frozen=True)
class Outcome:
    before: Snapshot
    result: Result
    after: Snapshot


@pytest.fixture(scope="module")
def outcomes(ws: tuple[Path, Files], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every case on its own copy of the module's workspace, a few at a time."""
    home, files = ws
    root = tmp_path_factory.mktemp("bad-input-cases")

    def run(case: Case) -> Outcome:
        copy = copy_ws(home, root / case.id)
        before = snapshot(copy)
        result = agov(*case.argv(files), home=copy)
        return Outcome(before, result, snapshot(copy))

    return dict(zip([c.id for c in CASES], parallel(run, CASES), strict=True))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_and_changes_nothing(outcomes: dict[str, Outcome], case: Case) -> None:
    outcome = outcomes[case.id]

    error = expect_error(outcome.result, 2)

    assert re.search(case.message, error["message"]), error
    assert error["type"] == case.error
    assert_rejected_unchanged(outcome.before, outcome.after)


def test_rejection_is_audited_with_what_was_refused(ws: tuple[Path, Files]) -> None:
    home, files = ws
    before = snapshot(home)

    expect_error(agov("agent", "update", "base-agent", "--from-file", files("other-id.yaml"), home=home))

    (added,) = new_audit(before, snapshot(home))
    _seq, _time, kind, agent_id, actor, _policy, payload, _prev, _hash = added
    assert (kind, agent_id, actor) == ("REQUEST_REJECTED", "base-agent", "acceptance")
    assert '"operation":"update"' in payload
    assert '"error":"SpecError"' in payload

    # a create refused before the engine saw a document (it did not parse) is audited the same way
    before = snapshot(home)
    expect_error(agov("agent", "create", "--from-file", files("broken.yaml"), home=home))
    (added,) = new_audit(before, snapshot(home))
    _seq, _time, kind, agent_id, actor, _policy, payload, _prev, _hash = added
    assert (kind, agent_id, actor) == ("REQUEST_REJECTED", None, "acceptance")
    assert '"operation":"create"' in payload and '"error":"SpecError"' in payload
    assert "broken.yaml is not valid YAML or JSON" in payload


def test_text_mode_error_goes_to_stderr_with_a_hint(ws: tuple[Path, Files]) -> None:
    home, _files = ws
    result = agov("agent", "show", "ghost", home=home, as_json=False)
    assert result.code == 2
    assert result.out == ""
    assert result.err.splitlines() == [
        "error: no agent with id 'ghost'",
        "  hint: `agov agent list` shows the agents",
    ]


def test_click_usage_errors_exit_2(ws: tuple[Path, Files]) -> None:
    home, _files = ws
    before = snapshot(home)
    for argv in (["agent", "list", "--limit", "0"], ["promote", "base-agent"]):
        result = agov(*argv, home=home)
        assert result.code == 2, str(result)
    assert_rejected_unchanged(before, snapshot(home))


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["promote", "base-agent", "--json"], {}, r"Missing option '--role'"),
        (["admit", "--json"], {}, r"Missing argument 'AGENT_ID'"),
        (["no-such-command", "--json"], {}, r"No such command 'no-such-command'"),
        (["agent", "list", "--limit", "0"], {"AGOV_JSON": "1"}, r"0 is not in the range"),
        (["agent", "list", "--offset", str(10**20), "--json"], {}, r"is not in the range"),
        (["--json", "admit"], {}, r"Missing argument 'AGENT_ID'"),
    ],
    ids=[
        "missing-option",
        "missing-argument",
        "unknown-command",
        "via-AGOV_JSON",
        "offset-past-sqlite-integers",
        "json-before-command",
    ],
)
def test_click_usage_errors_answer_in_json_under_json(
    ws: tuple[Path, Files], argv: list[str], env: dict[str, str], message: str
) -> None:
    home, _files = ws
    before = snapshot(home)
    result = agov(*argv, home=home, as_json=False, env=env)
    assert result.code == 2, str(result)
    after = snapshot(home)
    assert (after.rows, after.audit) == (before.rows, before.audit)
    error = result.json
    assert error["exit_code"] == 2 and result.err == "", "no usage text beside the JSON answer"
    assert re.search(message, error["error"]["message"]), error
    assert "--help" in error["error"]["hint"]


def test_json_before_the_command_applies_to_it(ws: tuple[Path, Files]) -> None:
    home, _files = ws
    shown = agov("--json", "agent", "show", "base-agent", home=home, as_json=False)
    assert shown.code == 0 and shown.json["id"] == "base-agent", str(shown)
    text = agov("agent", "show", "no-such", home=home, as_json=False)
    assert text.code == 2 and text.err.startswith("error: no agent with id"), "text stays text"
    assert agov("--help", as_json=False).code == 0 and agov("--version", as_json=False).code == 0


@pytest.mark.parametrize(
    "argv",
    [["agent", "list"], ["admit", "x"]],
    ids=["list", "admit"],
)
def test_no_workspace_exits_2_with_an_init_hint(tmp_path: Path, argv: list[str]) -> None:
    home = tmp_path / "nowhere"
    error = expect_error(agov(*argv, home=home), 2)
    assert error["type"] == "WorkspaceError"
    assert error["message"] == f"no agov workspace at {home}"
    assert f"agov init {home}" in error["hint"]
    assert not home.exists()


def test_no_workspace_via_agov_home(tmp_path: Path) -> None:
    home = tmp_path / "env-home"
    result = agov("agent", "list", env={"AGOV_HOME": str(home)})
    error = expect_error(result, 2)
    assert "agov init" in error["hint"]
    assert str(home) in error["message"]


@pytest.mark.parametrize(("gone", "as_dir"), [("agov.yaml", False), ("agov.db", False), ("agov.db", True)])
def test_half_a_workspace_names_the_missing_file_instead_of_advising_init(
    pristine: Path, tmp_path: Path, gone: str, as_dir: bool
) -> None:
    """`agov init` refuses to overwrite the half that is left, so advising it led nowhere."""
    home = copy_ws(pristine, tmp_path / "ws")
    (home / gone).unlink()
    if as_dir:
        (home / gone).mkdir()
    error = expect_error(agov("agent", "list", home=home), 2)
    assert error["message"].startswith(f"the agov workspace at {home} has ") and error["message"].endswith(
        f"but its {gone} {'is not a file' if as_dir else 'is missing'}"
    )
    assert "restore" in error["hint"] and "agov init" in error["hint"]
    assert expect_error(agov("init", home), 2)["message"].startswith("refusing to overwrite")


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (b"\xff\xfe not UTF-8\n", "codec can't decode"),
        (b"org: [unclosed\n", "cannot read"),
        (b"org:\n  max_monthly_budget_usd: many\n", "max_monthly_budget_usd"),
    ],
    ids=["not-utf8", "not-yaml", "bad-value"],
)
def test_a_damaged_agov_yaml_is_a_deny_in_a_decision_and_bad_input_elsewhere(
    pristine: Path, tmp_path: Path, damage: bytes, named: str
) -> None:
    """A decision that cannot read its workspace's config denies (exit 1, the decision's own
    shape), as one that cannot read the store does; other commands say what is wrong (exit 2).
    Nothing changes either way."""
    home = copy_ws(pristine, tmp_path / "ws")
    ok("agent", "create", "--template", "research-analyst", home=home)
    (home / "agov.yaml").write_bytes(damage)
    before = snapshot(home)

    admitted = agov("admit", "research-analyst", home=home)
    assert admitted.code == 1, str(admitted)
    assert (admitted.json["allow"], admitted.json["code"]) == (False, "ADMISSION_DENY_ENGINE_UNAVAILABLE")
    assert "agov.yaml" in admitted.json["reasons"][0]["message"]
    assert named in admitted.json["reasons"][0]["message"]

    promoted = agov("promote", "research-analyst", "--role", "agent_admin", home=home)
    assert promoted.code == 1, str(promoted)
    assert promoted.json["allow"] is False
    assert "agov.yaml" in promoted.json["deny"][0]["message"]

    listed = expect_error(agov("agent", "list", home=home), 2)
    assert listed["type"] == "ConfigError" and "agov.yaml" in listed["message"] and named in listed["message"]
    assert_only_audit_changed(before, snapshot(home))


def test_empty_values_are_refused_not_taken_for_defaults(pristine: Path, tmp_path: Path) -> None:
    home = copy_ws(pristine, tmp_path / "ws")
    ok("agent", "create", "--template", "research-analyst", home=home)
    (keyid,) = [k["keyid"] for k in ok("keys", "list", home=home)]
    before = snapshot(home)

    # an empty --id made `--clone X` create "X-clone" without a word
    error = expect_error(agov("agent", "create", "--clone", "research-analyst", "--id", "", home=home), 2)
    assert error["message"] == "--id is empty"
    # a revocation without a reason leaves nothing for the audit log to say
    error = expect_error(agov("keys", "revoke", keyid, "--reason", " ", home=home), 2)
    assert error["message"] == "--reason is empty"
    after = snapshot(home)
    assert after.rows == before.rows
    assert [row[2] for row in new_audit(before, after)] == ["REQUEST_REJECTED"]  # the create

    # a key id prefix in capitals is the same key
    revoked = ok("keys", "revoke", keyid[:12].upper(), "--reason", "rotated", home=home)
    assert revoked["keyid"] == keyid and revoked["revoked_at"]


@pytest.mark.parametrize("actor", ["bob\nmallory", "bob\r", "bob\u2028x", "bob\u202e"])
def test_an_actor_that_is_not_one_printable_line_is_refused(
    pristine: Path, tmp_path: Path, actor: str
) -> None:
    """The actor is signed into proofs and printed in audit lines: a line break in it could fake
    a second line there."""
    home = copy_ws(pristine, tmp_path / "ws")
    before = snapshot(home)
    error = expect_error(
        agov("agent", "create", "--template", "research-analyst", "--actor", actor, home=home), 2
    )
    assert "control or line-breaking character" in error["message"]
    after = snapshot(home)
    assert (after.rows, after.audit) == (before.rows, before.audit)


@pytest.mark.parametrize("actor", ["", "  "])
def test_an_empty_actor_is_refused_not_replaced(pristine: Path, tmp_path: Path, actor: str) -> None:
    """`--actor ''` once recorded AGOV_ACTOR (or the user) instead, silently."""
    home = copy_ws(pristine, tmp_path / "ws")
    before = snapshot(home)
    result = agov("agent", "create", "--template", "research-analyst", "--actor", actor, home=home)
    assert expect_error(result, 2)["message"] == "the actor is empty"
    after = snapshot(home)
    assert (after.rows, after.audit) == (before.rows, before.audit)


def test_the_actor_is_checked_only_where_it_is_recorded(pristine: Path, tmp_path: Path) -> None:
    """A stray character in AGOV_ACTOR must not refuse commands that record no actor, such as
    every start of an agent; and a name that needs a zero-width joiner is a name."""
    home = copy_ws(pristine, tmp_path / "ws")
    stray = {"AGOV_ACTOR": "ci-runner\r"}
    assert agov("audit", "verify", home=home, env=stray).code == 0
    assert agov("agent", "list", home=home, env=stray).code == 0
    persian = "\u0645\u0647\u062f\u06cc\u200c\u0632\u0627\u062f\u0647"  # a name with a ZWNJ
    created = ok("agent", "create", "--template", "research-analyst", "--actor", persian, home=home)
    assert created["id"] == "research-analyst"
    assert agov("admit", "research-analyst", home=home, env=stray).code == 0
