"""The seven creation modes: provenance (`creation_mode`, `source`), SANDBOX with an expiry."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    agov,
    assert_rejected_unchanged,
    copy_ws,
    expect_error,
    make_spec,
    ok,
    parse_time,
    query,
    snapshot,
    write_doc,
)

pytestmark = pytest.mark.acceptance

SANDBOX_TTL = timedelta(days=30)  # agov.yaml default: sandbox_ttl_days: 30


@pytest.fixture(scope="module")
def ws(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = copy_ws(pristine, tmp_path_factory.mktemp("create") / "ws")
    write_doc(home.parent / "origin.yaml", make_spec("origin-agent", temperature=0.3, budget=42))
    ok("agent", "create", "--from-file", home.parent / "origin.yaml", home=home)
    return home


def check_created(
    home: Path, out: dict[str, Any], *, agent_id: str, mode: str, source: str
) -> dict[str, Any]:
    """The create answer, `agent show` and `agent history` all carry the same provenance."""
    started = datetime.now(UTC)
    assert out["id"] == agent_id
    assert out["creation_mode"] == mode
    assert out["source"] == source
    assert out["status"] == "SANDBOX"
    assert out["version"] == 1
    expires = parse_time(out["sandbox_expires_at"])
    assert started + SANDBOX_TTL - timedelta(minutes=5) < expires <= started + SANDBOX_TTL

    history = ok("agent", "history", agent_id, home=home)
    assert history["agent_id"] == agent_id
    assert len(history["versions"]) == 1
    version = history["versions"][0]
    assert (version["version"], version["creation_mode"], version["source"]) == (1, mode, source)
    assert version["spec_hash"] == out["spec_hash"]
    assert history["proofs"] == []
    assert [e["type"] for e in history["events"]] == ["AGENT_CREATED"]
    assert history["events"][0]["payload"] == {"mode": mode, "source": source, "spec_hash": out["spec_hash"]}

    # the stored spec (what `agent show` prints; that command is covered in test_e2e_agents)
    ((raw,),) = query(home, "SELECT spec FROM agent_versions WHERE agent_id = ? AND version = 1", [agent_id])
    spec = json.loads(raw)
    assert spec["spec"]["containment"] == {"external_calls": False, "persistent_writes": False}
    assert spec["metadata"]["id"] == agent_id
    return dict(spec)


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_from_file(ws: Path, tmp_path: Path, fmt: str) -> None:
    document = make_spec(f"imported-{fmt}", agent_type="advisory", temperature=0.4)
    path = write_doc(tmp_path / f"spec.{fmt}", document, fmt)

    out = ok("agent", "create", "--from-file", path, "--notes", "imported", home=ws)

    spec = check_created(ws, out, agent_id=f"imported-{fmt}", mode="import", source=str(path))
    assert spec == document
    assert out["type"] == "advisory"


def test_templates_are_listed_and_create_from_one(ws: Path) -> None:
    templates = ok("agent", "templates")
    assert {"finance-reconciler", "research-analyst", "ideation-partner", "mcp-tool-server"} <= set(templates)
    assert templates == sorted(templates)

    out = ok(
        "agent", "create", "--template", "finance-reconciler", "--id", "fin-1", "--name", "Fin One", home=ws
    )

    spec = check_created(ws, out, agent_id="fin-1", mode="template", source="finance-reconciler")
    assert spec["metadata"]["name"] == out["name"] == "Fin One"
    assert out["role_class"] == "compliance"


def test_scratch_from_a_name(ws: Path) -> None:
    out = ok("agent", "create", "--name", "Scratch Pad", home=ws)

    spec = check_created(ws, out, agent_id="scratch-pad", mode="scratch", source="scratch")
    assert spec["metadata"]["name"] == "Scratch Pad"
    # a skeleton: the anatomy parts exist but are empty, to be filled in before promotion
    assert spec["spec"]["anatomy"]["inputs"] == []
    assert spec["spec"]["anatomy"]["actions"] == []
    assert spec["spec"]["capabilities"] == []


def test_clone_gets_the_new_id_and_the_same_spec(ws: Path) -> None:
    ((raw,),) = query(ws, "SELECT spec FROM agent_versions WHERE agent_id = 'origin-agent'")
    original = json.loads(raw)

    out = ok("agent", "create", "--clone", "origin-agent", "--id", "origin-copy", home=ws)

    spec = check_created(ws, out, agent_id="origin-copy", mode="clone", source="origin-agent@1")
    assert spec["metadata"]["id"] == "origin-copy"
    assert spec["spec"] == original["spec"]
    assert spec["metadata"] == {**original["metadata"], "id": "origin-copy"}


def test_from_workflow_derives_capabilities_actions_and_inputs(ws: Path, tmp_path: Path) -> None:
    workflow = {
        "name": "Invoice Triage",
        "role_class": "compliance",
        "temperature": 0.1,
        "monthly_budget_usd": 75,
        "steps": [
            {
                "name": "fetch",
                "uses": "database.query",
                "resource": "erp",
                "input": {"name": "invoices", "classification": "confidential"},
            },
            {"name": "route", "uses": "ticket.create", "resource": "ap-queue"},
            {"name": "recheck", "uses": "database.query", "resource": "erp"},
        ],
    }
    path = write_doc(tmp_path / "triage.yaml", workflow)

    out = ok("agent", "create", "--from-workflow", path, "--id", "triage", home=ws)

    spec = check_created(ws, out, agent_id="triage", mode="workflow", source=str(path))
    assert spec["spec"]["capabilities"] == ["database.query", "ticket.create"]
    assert spec["spec"]["anatomy"]["actions"] == [
        {"type": "database.query", "resource": "erp"},
        {"type": "ticket.create", "resource": "ap-queue"},
    ]
    assert spec["spec"]["anatomy"]["inputs"] == [{"name": "invoices", "classification": "confidential"}]
    assert spec["spec"]["anatomy"]["reasoning"]["temperature"] == 0.1
    assert spec["spec"]["economics"] == {"monthly_budget_usd": 75}
    assert out["role_class"] == "compliance"
    assert out["name"] == "Invoice Triage"


def test_from_event(ws: Path, tmp_path: Path) -> None:
    agent = make_spec("registered-agent", role_class="ideation", temperature=0.9)
    event = {"event": "agent.registered", "source": "model-registry", "delivery_id": "d-42", "agent": agent}
    path = write_doc(tmp_path / "event.json", event, "json")

    out = ok("agent", "create", "--from-event", path, home=ws)

    spec = check_created(ws, out, agent_id="registered-agent", mode="event", source="model-registry#d-42")
    assert spec == agent


def test_an_event_with_no_delivery_id_is_named_by_its_source_alone(ws: Path, tmp_path: Path) -> None:
    home = copy_ws(ws, tmp_path / "ws")
    agent = make_spec("undelivered-agent", role_class="ideation", temperature=0.9)
    event = {"event": "agent.registered", "source": "model-registry", "delivery_id": None, "agent": agent}
    out = ok("agent", "create", "--from-event", write_doc(tmp_path / "event.json", event, "json"), home=home)
    assert out["source"] == "model-registry", "never the text '#None'"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("source", {"a": [1, 2]}),
        ("source", "registry\n  v9 forged"),
        ("delivery_id", 42),
        ("delivery_id", "d" * 100_000),
    ],
    ids=["source-object", "source-line-break", "delivery-number", "delivery-100k"],
)
def test_an_event_whose_provenance_is_not_a_short_string_is_refused(
    ws: Path, tmp_path: Path, field: str, value: object
) -> None:
    home = copy_ws(ws, tmp_path / "ws")
    agent = make_spec("odd-event-agent", role_class="ideation", temperature=0.9)
    event = {"event": "agent.registered", "source": "model-registry", "delivery_id": "d-1", "agent": agent}
    event[field] = value
    path = write_doc(tmp_path / "event.json", event, "json")
    before = snapshot(home)
    refused = expect_error(agov("agent", "create", "--from-event", path, home=home))
    assert f"the event's {field} must be a printable string of at most 200 characters" in refused["message"]
    assert_rejected_unchanged(before, snapshot(home))


ANSWERS = [
    "Chat Helper",  # name
    "",  # id: accept the default (slug of the name)
    "ops@example.com",  # owner
    "advisory",  # type
    "ideation",  # role class
    "model-x",  # model
    "0.8",  # temperature
    "notes, tickets",  # inputs
    "confidential",  # classification
    "summary.write,ticket.comment",  # actions
    "",  # capabilities: accept the default (the actions)
    "session",  # memory
    "250",  # budget
]


def test_interactive_wizard(ws: Path) -> None:
    result = agov("agent", "create", "--interactive", home=ws, stdin="\n".join(ANSWERS) + "\n")
    assert result.code == 0, str(result)
    out = json.loads(result.out)  # the wizard's prompts go to stderr

    spec = check_created(ws, out, agent_id="chat-helper", mode="conversation", source="interactive")
    assert spec["metadata"] == {
        "id": "chat-helper",
        "name": "Chat Helper",
        "owner": "ops@example.com",
        "version": "0.1.0",
    }
    assert spec["spec"]["agent_type"] == "advisory"
    assert spec["spec"]["role_class"] == "ideation"
    assert spec["spec"]["anatomy"] == {
        "reasoning": {"model": "model-x", "temperature": 0.8},
        "inputs": [
            {"name": "notes", "classification": "confidential"},
            {"name": "tickets", "classification": "confidential"},
        ],
        "actions": [{"type": "summary.write"}, {"type": "ticket.comment"}],
        "memory": {"kind": "session"},
    }
    assert spec["spec"]["capabilities"] == ["summary.write", "ticket.comment"]
    assert spec["spec"]["economics"] == {"monthly_budget_usd": 250}


def test_interactive_json_stdout_is_only_json(ws: Path, tmp_path: Path) -> None:
    home = copy_ws(ws, tmp_path / "ws")
    answers = ["Json Only", "", "", "", "", "", "", "a", "", "b", "", "", ""]
    result = agov("agent", "create", "--interactive", home=home, stdin="\n".join(answers) + "\n")
    assert result.code == 0, str(result)
    assert json.loads(result.out)["id"] == "json-only"


def test_interactive_with_too_few_answers_is_bad_input(ws: Path) -> None:
    result = agov("agent", "create", "--interactive", home=ws, stdin="Half Done\n")
    assert result.code == 2, str(result)
    assert "half-done" not in {a["id"] for a in ok("agent", "list", home=ws)}
