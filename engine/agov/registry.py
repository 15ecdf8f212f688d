"""Agents and their versions: the seven creation modes, update, list, show, history.

Every mode ends in :func:`create_agent`, which validates the spec, writes the agent in
``SANDBOX`` with an expiry and records the mode and its source as provenance.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import yaml

from agov.config import Config
from agov.decisions import GOVERNED, Code, Status
from agov.errors import NotFoundError, SpecError, StoreError, UsageError
from agov.resources import templates_dir
from agov.spec import AgentSpec, parse_spec_bytes, spec_from_canonical, validate_spec
from agov.store import Store
from agov.store.sqlite import iso, utcnow


class CreationMode(StrEnum):
    IMPORT = "import"
    TEMPLATE = "template"
    SCRATCH = "scratch"
    CLONE = "clone"
    WORKFLOW = "workflow"
    EVENT = "event"
    CONVERSATION = "conversation"


DEFAULT_MODEL = "unassigned-model"
_SLUG = re.compile(r"[^a-zA-Z0-9\-_]+")


@dataclass(frozen=True)
class AgentRecord:
    """An agent row joined with its current version."""

    id: str
    workspace: str
    name: str
    type: str
    role_class: str
    status: Status
    version: int
    spec: AgentSpec
    creation_mode: str
    source: str
    sandbox_expires_at: str | None
    reasons: list[dict[str, str]]
    row_version: int
    created_at: str
    updated_at: str
    # the hash written with the spec; differs from spec.hash only if the stored spec was edited
    recorded_spec_hash: str | None = None

    def summary(self) -> dict[str, Any]:
        shown: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "workspace": self.workspace,
            "type": self.type,
            "role_class": self.role_class,
            "status": self.status.value,
            "version": self.version,
            "spec_hash": self.spec.hash,
            "creation_mode": self.creation_mode,
            "source": self.source,
            "sandbox_expires_at": self.sandbox_expires_at,
            "reasons": self.reasons,
        }
        if self.recorded_spec_hash != self.spec.hash:
            shown["warning"] = (
                f"the stored spec does not match the hash recorded with it ({self.recorded_spec_hash}):"
                " agov.db was changed outside agov; admission denies this agent"
            )
        return shown


# --- builders: each mode turns its source into a spec document (pure) ----------------------


def slugify(text: str) -> str:
    slug = _SLUG.sub("-", text.strip().lower()).strip("-_")
    return slug[:63] or "agent"


def skeleton(name: str, *, agent_id: str | None = None, role_class: str = "analysis") -> dict[str, Any]:
    """A minimal spec to fill in: anatomy parts exist but are empty, so promotion asks for them."""
    return {
        "apiVersion": "agov/v1",
        "kind": "Agent",
        "metadata": {"id": agent_id or slugify(name), "name": name, "version": "0.1.0"},
        "spec": {
            "agent_type": "supervised",
            "role_class": role_class,
            "anatomy": {
                "reasoning": {"model": DEFAULT_MODEL, "temperature": 0.0},
                "inputs": [],
                "actions": [],
                "memory": {"kind": "none"},
            },
            "capabilities": [],
            "containment": {"external_calls": False, "persistent_writes": False},
            "economics": {"monthly_budget_usd": 0},
        },
    }


def list_templates() -> list[str]:
    return sorted(p.stem for p in templates_dir().glob("*.yaml"))


def from_template(
    name: str, *, agent_id: str | None = None, display_name: str | None = None
) -> dict[str, Any]:
    """A shipped template with a fresh id and name.

    Raises:
        NotFoundError: no template of that name.
    """
    path = templates_dir() / f"{name}.yaml"
    if not path.is_file():
        raise NotFoundError(f"no template named {name!r}", hint=f"available: {', '.join(list_templates())}")
    document = parse_spec_bytes(path.read_bytes(), source=f"template {name}")
    if agent_id:
        document["metadata"]["id"] = agent_id
    if display_name:
        document["metadata"]["name"] = display_name
    return document


def from_workflow(workflow: Mapping[str, Any], *, agent_id: str | None = None) -> dict[str, Any]:
    """Derive capabilities, actions and inputs from a workflow's steps.

    A workflow is ``{name, [id], [role_class], [model], [temperature], steps: [{name, uses,
    [resource], [input: {name, classification}]}]}``.

    Raises:
        SpecError: the workflow has no steps, or a step has no ``uses``.
    """
    name = workflow.get("name")
    steps = workflow.get("steps")
    if not isinstance(name, str) or not name:
        raise SpecError("a workflow needs a non-empty 'name'", path="name")
    if not isinstance(steps, list) or not steps:
        raise SpecError("a workflow needs a non-empty list of 'steps'", path="steps")
    actions: list[dict[str, Any]] = []
    inputs: list[dict[str, Any]] = []
    capabilities: list[str] = []
    for index, step in enumerate(steps):
        if not isinstance(step, dict) or not isinstance(step.get("uses"), str) or not step["uses"]:
            raise SpecError("each step needs a 'uses' naming its action type", path=f"steps/{index}/uses")
        action = {"type": step["uses"]}
        if isinstance(step.get("resource"), str):
            action["resource"] = step["resource"]
        if action not in actions:
            actions.append(action)
        if step["uses"] not in capabilities:
            capabilities.append(step["uses"])
        step_input = step.get("input")
        if isinstance(step_input, dict) and step_input not in inputs:
            inputs.append(dict(step_input))
    document = skeleton(
        name, agent_id=agent_id or workflow.get("id"), role_class=workflow.get("role_class", "analysis")
    )
    anatomy = document["spec"]["anatomy"]
    anatomy["reasoning"] = {
        "model": workflow.get("model", DEFAULT_MODEL),
        "temperature": workflow.get("temperature", 0.2),
    }
    anatomy["actions"] = actions
    anatomy["inputs"] = inputs or [{"name": f"{slugify(name)}-trigger", "classification": "internal"}]
    document["spec"]["capabilities"] = capabilities
    document["spec"]["economics"]["monthly_budget_usd"] = workflow.get("monthly_budget_usd", 50)
    document["metadata"]["description"] = f"derived from workflow {name!r} ({len(steps)} steps)"
    return document


def from_event(event: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Take the agent spec from a registry webhook-style payload.

    The payload is ``{event: "agent.registered", source, delivery_id, agent: <spec>}``.
    Returns the document and the provenance string ``<source>#<delivery_id>``.

    Raises:
        SpecError: not an ``agent.registered`` event, or no spec in it.
    """
    if event.get("event") != "agent.registered":
        raise SpecError(
            f"unsupported event type {event.get('event')!r}",
            path="event",
            hint="agov creates agents from 'agent.registered' events",
        )
    agent = event.get("agent")
    if not isinstance(agent, dict):
        raise SpecError("the event carries no 'agent' spec", path="agent")
    source = _provenance_field(event, "source", "unknown")
    delivery = _provenance_field(event, "delivery_id", "")
    return copy.deepcopy(agent), f"{source}#{delivery}" if delivery else source


_MAX_PROVENANCE_CHARS = 200


def _provenance_field(event: Mapping[str, Any], name: str, default: str) -> str:
    """A string the event names its origin by: absent or null is ``default``; anything else that
    is not a short printable string is refused rather than written as Python's rendering of it.

    Raises:
        SpecError: not a string, too long, or holding a control or line-breaking character.
    """
    value = event.get(name)
    if value is None:
        return default
    if not isinstance(value, str) or len(value) > _MAX_PROVENANCE_CHARS or not value.isprintable():
        raise SpecError(
            f"the event's {name} must be a printable string of at most {_MAX_PROVENANCE_CHARS}"
            f" characters, not {json.dumps(value)[:80]}",
            path=name,
            hint="it is stored as the agent's provenance",
        )
    return value


def from_answers(answers: Mapping[str, Any]) -> dict[str, Any]:
    """Build a spec from the interactive wizard's answers (the conversation mode)."""
    document = skeleton(
        str(answers["name"]),
        agent_id=answers.get("id") or None,
        role_class=str(answers.get("role_class", "analysis")),
    )
    spec = document["spec"]
    spec["agent_type"] = answers.get("agent_type", "supervised")
    spec["anatomy"]["reasoning"] = {
        "model": answers.get("model", DEFAULT_MODEL),
        "temperature": float(answers.get("temperature", 0.2)),
    }
    spec["anatomy"]["inputs"] = [
        {"name": n, "classification": answers.get("classification", "internal")}
        for n in answers.get("inputs", [])
    ]
    spec["anatomy"]["actions"] = [{"type": a} for a in answers.get("actions", [])]
    spec["anatomy"]["memory"] = {"kind": answers.get("memory", "none")}
    spec["capabilities"] = list(answers.get("capabilities", []))
    spec["economics"]["monthly_budget_usd"] = answers.get("monthly_budget_usd", 0)
    if answers.get("owner"):
        document["metadata"]["owner"] = answers["owner"]
    return document


def load_document_file(raw: bytes, *, source: str, max_bytes: int) -> dict[str, Any]:
    return parse_spec_bytes(raw, source=source, max_bytes=max_bytes)


# --- store operations -------------------------------------------------------------------------


def _record(row: Any) -> AgentRecord:
    """Raises: StoreError: the agent's stored row does not decode (edited outside agov)."""
    try:
        return _decode(row)
    except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError and an unknown status included
        raise StoreError(
            f"the stored row of agent {row['id']!r} is damaged: {type(exc).__name__}: {exc}",
            hint="it was changed outside agov; restore agov.db from a backup, or remove the agent's rows",
        ) from exc


def _decode(row: Any) -> AgentRecord:
    if row["spec"] is None:
        raise ValueError(f"its current version {row['current_version']!r} has no stored spec")
    return AgentRecord(
        id=row["id"],
        workspace=row["workspace"],
        name=row["name"],
        type=row["type"],
        role_class=row["role_class"],
        status=Status(row["status"]),
        version=row["current_version"],
        spec=spec_from_canonical(row["spec"]),
        creation_mode=row["creation_mode"],
        source=row["source"],
        sandbox_expires_at=row["sandbox_expires_at"],
        reasons=json.loads(row["reasons"]),
        row_version=row["row_version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        recorded_spec_hash=row["spec_hash"],
    )


# LEFT JOIN: an agent whose current version row is gone is a damaged row, not no agent
_SELECT = (
    "SELECT a.*, v.spec, v.spec_hash, v.creation_mode, v.source FROM agents a "
    "LEFT JOIN agent_versions v ON v.agent_id = a.id AND v.version = a.current_version"
)


def get_agent(store: Store, agent_id: str) -> AgentRecord:
    """Raises: NotFoundError: no agent with that id."""
    row = store.query_one(f"{_SELECT} WHERE a.id = ?", (agent_id,))
    if row is None:
        raise NotFoundError(f"no agent with id {agent_id!r}", hint="`agov agent list` shows the agents")
    return _record(row)


def list_agents(
    store: Store,
    *,
    status: str | None = None,
    agent_type: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[AgentRecord]:
    clauses, params = [], []
    if status:
        if status not in Status.__members__:
            raise UsageError(f"unknown status {status!r}", hint=f"one of {', '.join(Status.__members__)}")
        clauses.append("a.status = ?")
        params.append(status)
    if agent_type:
        clauses.append("a.type = ?")
        params.append(agent_type)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = store.query(f"{_SELECT}{where} ORDER BY a.id LIMIT ? OFFSET ?", (*params, limit, offset))
    return [_record(r) for r in rows]


def _require_contained(spec: AgentSpec) -> None:
    containment = spec.containment
    if containment.get("external_calls") is not False or containment.get("persistent_writes") is not False:
        raise SpecError(
            "a new agent starts in the sandbox and must be contained",
            path="spec/containment",
            hint="set external_calls: false and persistent_writes: false; promotion governs the rest",
        )


def create_agent(
    store: Store,
    config: Config,
    document: Mapping[str, Any],
    *,
    mode: CreationMode,
    source: str,
    actor: str,
    notes: str = "",
    now: datetime | None = None,
) -> AgentRecord:
    """Validate and store a new agent in ``SANDBOX`` with an expiry.

    Raises:
        SpecError: the spec is invalid, or not contained.
        UsageError: an agent with that id exists.
    """
    spec = validate_spec(document)
    _require_contained(spec)
    now = now or utcnow()
    expires = now + timedelta(days=config.sandbox_ttl_days)
    with store.transaction() as tx:
        if tx.execute("SELECT 1 FROM agents WHERE id = ?", (spec.id,)).fetchone():
            raise UsageError(
                f"an agent with id {spec.id!r} already exists",
                hint="choose another id, or `agov agent update` it",
            )
        tx.execute(
            "INSERT INTO agents (id, workspace, name, type, role_class, status, current_version,"
            " sandbox_expires_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?)",
            (
                spec.id,
                spec.workspace,
                spec.name,
                spec.agent_type,
                spec.role_class,
                Status.SANDBOX.value,
                iso(expires),
                iso(now),
                iso(now),
            ),
        )
        tx.execute(
            "INSERT INTO agent_versions (agent_id, version, spec, spec_hash, creation_mode, source, created_by,"
            " created_at, notes) VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?)",
            (spec.id, spec.canonical.decode(), spec.hash, mode.value, source, actor, iso(now), notes),
        )
        tx.audit(
            Code.AGENT_CREATED,
            agent_id=spec.id,
            actor=actor,
            payload={"mode": mode.value, "source": source, "spec_hash": spec.hash},
            now=now,
        )
    return get_agent(store, spec.id)


def update_agent(
    store: Store,
    config: Config,
    agent_id: str,
    document: Mapping[str, Any],
    *,
    actor: str,
    notes: str = "",
    now: datetime | None = None,
) -> AgentRecord:
    """Store a new version. A governed agent goes back to the sandbox: its old proof is
    superseded, so the new version can never run on the old version's proof.

    Raises:
        NotFoundError: no such agent.
        SpecError: invalid spec, or its id differs from ``agent_id``.
        UsageError: the spec is the current version's (nothing to update), or a concurrent
            update won.
    """
    current = get_agent(store, agent_id)
    spec = validate_spec(document)
    _require_contained(spec)  # an updated agent is back in the sandbox
    if spec.id != agent_id:
        raise SpecError(
            f"metadata.id is {spec.id!r}, not {agent_id!r}",
            path="metadata/id",
            hint="an update keeps the agent's id; use `agent create --clone` for a copy",
        )
    if spec.hash == current.spec.hash:
        # a new version of the same spec would only restart its sandbox period: an expired or
        # invalidated agent would run again with nothing changed
        raise UsageError(
            f"agent {agent_id!r} version {current.version} already has this exact spec"
            f" ({spec.hash[:12]}): nothing to update",
            hint="an update stores a changed spec; an invalidated agent is governed again by a"
            " promotion (or a revalidation) that the active policy allows",
        )
    now = now or utcnow()
    version = current.version + 1
    with store.transaction() as tx:
        # Under the write lock: another update that won since the read would make this version
        # number collide (a raw IntegrityError); refuse it as the lost race it is.
        latest = tx.execute("SELECT row_version FROM agents WHERE id = ?", (agent_id,)).fetchone()
        if latest is None or latest[0] != current.row_version:
            raise UsageError(f"agent {agent_id!r} changed while it was being updated", hint="retry")
        tx.execute(
            "INSERT INTO agent_versions (agent_id, version, spec, spec_hash, creation_mode, source, created_by,"
            " created_at, notes) VALUES (?, ?, ?, ?, 'update', ?, ?, ?, ?)",
            (
                agent_id,
                version,
                spec.canonical.decode(),
                spec.hash,
                f"{agent_id}@{current.version}",
                actor,
                iso(now),
                notes,
            ),
        )
        tx.execute(
            "UPDATE agent_proofs SET superseded_at = ? WHERE agent_id = ? AND superseded_at IS NULL",
            (iso(now), agent_id),
        )
        changed = tx.execute(
            "UPDATE agents SET current_version = ?, name = ?, type = ?, role_class = ?, status = ?,"
            " sandbox_expires_at = ?, reasons = '[]', row_version = row_version + 1, updated_at = ?"
            " WHERE id = ? AND row_version = ?",
            (
                version,
                spec.name,
                spec.agent_type,
                spec.role_class,
                Status.SANDBOX.value,
                iso(now + timedelta(days=config.sandbox_ttl_days)),
                iso(now),
                agent_id,
                current.row_version,
            ),
        ).rowcount
        if changed != 1:
            raise UsageError(f"agent {agent_id!r} changed while it was being updated", hint="retry")
        tx.audit(
            Code.AGENT_UPDATED,
            agent_id=agent_id,
            actor=actor,
            now=now,
            payload={
                "version": version,
                "spec_hash": spec.hash,
                "previous_status": current.status.value,
                "notes": notes,
                "back_to_sandbox": current.status in GOVERNED,
            },
        )
    return get_agent(store, agent_id)


_PROOF_FIELDS = ("version", "policy_hash", "keyid", "governance_status", "issued_at", "expires_at")


def current_proof(store: Store, agent_id: str) -> dict[str, Any] | None:
    """What the agent's current proof records (not verified here: admission verifies it), or
    None for an agent with no proof (a sandbox agent, never promoted)."""
    row = store.query_one(
        f"SELECT {', '.join(_PROOF_FIELDS)} FROM agent_proofs WHERE agent_id = ? AND superseded_at IS NULL",
        (agent_id,),
    )
    return None if row is None else {k: row[k] for k in _PROOF_FIELDS}


def history(store: Store, agent_id: str) -> dict[str, Any]:
    """Versions (with provenance), proofs and audit events of one agent.

    Raises:
        NotFoundError: no such agent.
    """
    get_agent(store, agent_id)
    versions = [
        {
            k: r[k]
            for k in ("version", "spec_hash", "creation_mode", "source", "created_by", "created_at", "notes")
        }
        for r in store.query("SELECT * FROM agent_versions WHERE agent_id = ? ORDER BY version", (agent_id,))
    ]
    proofs = [
        {k: r[k] for k in (*_PROOF_FIELDS, "superseded_at")}
        for r in store.query("SELECT * FROM agent_proofs WHERE agent_id = ? ORDER BY id", (agent_id,))
    ]
    events = [e.as_dict() for e in store.audit_events(agent_id=agent_id)]
    return {"agent_id": agent_id, "versions": versions, "proofs": proofs, "events": events}


def dump_yaml(document: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(document), sort_keys=False)
