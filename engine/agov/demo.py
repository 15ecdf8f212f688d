"""``agov demo``: the whole loop in a temporary workspace, told as a story.

Everything is real: a managed ``opa run --server`` with the signed bundle, Ed25519 proofs, a
SQLite store. Nothing needs to be set up first.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agov.decisions import AdmissionDecision
from agov.engine import Engine
from agov.registry import CreationMode, from_event, from_template, from_workflow, skeleton

Echo = Callable[[str], None]
ACTOR = "demo-admin"
_BUDGET_EDIT = ('"monthly_budget_usd":200', '"monthly_budget_usd":9000')


def _admit(engine: Engine, echo: Echo, agent_id: str) -> AdmissionDecision:
    decision = engine.admit(agent_id)
    mark = "ALLOW" if decision.allow else "DENY "
    echo(f"    admit {agent_id:<22} {mark} {decision.code}")
    return decision


def _chapter(echo: Echo, title: str) -> None:
    echo("")
    echo(f"== {title}")


def run_demo(*, keep: bool = False, echo: Echo = print) -> dict[str, Any]:
    """Run the story; returns the admission codes seen (and the kept workspace), for tests and --json.

    Raises:
        AgovError: a step failed unexpectedly (the demo stops there).
    """
    home = Path(tempfile.mkdtemp(prefix="agov-demo-")) / "workspace"
    seen: dict[str, Any] = {}
    try:
        _chapter(echo, "1. A workspace: policies, keys, a signed bundle, a store")
        engine = Engine.init(home, actor=ACTOR)
        with engine:
            active = engine.active_policy()
            echo(f"    workspace {home}")
            echo(f"    policy hash {active.hash} (the bundle's .manifest revision)")

            _chapter(echo, "2. Agents are created in SANDBOX, in several modes")
            created = [
                engine.create_agent(
                    from_template("finance-reconciler"),
                    mode=CreationMode.TEMPLATE,
                    source="finance-reconciler",
                    actor=ACTOR,
                ),
                engine.create_agent(
                    from_template("research-analyst"),
                    mode=CreationMode.TEMPLATE,
                    source="research-analyst",
                    actor=ACTOR,
                ),
                engine.create_agent(
                    from_workflow(
                        {
                            "name": "Invoice Triage",
                            "id": "invoice-triage",
                            "role_class": "analysis",
                            "temperature": 0.6,
                            "monthly_budget_usd": 120,
                            "steps": [
                                {
                                    "name": "fetch",
                                    "uses": "database.query",
                                    "resource": "erp",
                                    "input": {"name": "invoices", "classification": "confidential"},
                                },
                                {"name": "route", "uses": "ticket.create", "resource": "ap-queue"},
                            ],
                        }
                    ),
                    mode=CreationMode.WORKFLOW,
                    source="invoice-triage.yaml",
                    actor=ACTOR,
                ),
                engine.create_agent(
                    *_event_agent(), mode=CreationMode.EVENT, source="model-registry#d-4711", actor=ACTOR
                ),
                engine.create_agent(
                    skeleton("Scratch Pad"), mode=CreationMode.SCRATCH, source="scratch", actor=ACTOR
                ),
            ]
            for record in created:
                echo(
                    f"    {record.id:<22} {record.status.value:<10} mode={record.creation_mode:<9}"
                    f" {record.role_class:<10} spec {record.spec.hash[:12]}"
                )

            _chapter(echo, "3. Promotion asks agov.promotion; allowed agents earn a signed proof")
            denied = engine.promote("finance-reconciler", actor="intern", role="viewer")
            echo(
                f"    promote finance-reconciler as a viewer: {'ALLOW' if denied.allow else 'DENY'} "
                f"({', '.join(r.code for r in denied.deny)})"
            )
            for record in created:
                result = engine.promote(record.id, actor=ACTOR, role="agent_admin")
                echo(f"    promote {record.id:<20} {'ALLOW' if result.allow else 'DENY '} -> {result.status}")
                for reason in result.deny + result.warn:
                    echo(f"        {reason.code}: {reason.message}")

            _chapter(echo, "4. Admission at every start, fail-closed")
            for record in created:
                seen[f"admit:{record.id}"] = _admit(engine, echo, record.id).code

            _chapter(echo, "5. Someone edits a governed agent's stored spec behind agov's back")
            _edit_stored_spec(engine.workspace.db_path, "finance-reconciler", *_BUDGET_EDIT)
            seen["tampered"] = _admit(engine, echo, "finance-reconciler").code
            _edit_stored_spec(engine.workspace.db_path, "finance-reconciler", *reversed(_BUDGET_EDIT))
            echo("    (edit undone)")

            _chapter(echo, "6. The proof signer is revoked")
            old_key = next(k for k in engine.list_keys() if k.active)
            engine.revoke_key(old_key.keyid, reason="demo: key compromised", actor=ACTOR)
            echo(f"    revoked key {old_key.keyid[:16]}")
            seen["revoked"] = _admit(engine, echo, "finance-reconciler").code
            new_key = engine.generate_key(alg="ed25519", actor=ACTOR)
            report = engine.revalidate()
            echo(
                f"    new key {new_key.keyid[:16]}; revalidation re-signed {report.valid + report.restricted}"
                f" agents"
            )
            seen["after_resign"] = _admit(engine, echo, "finance-reconciler").code

            _chapter(echo, "7. The policy tightens: analysis agents may now use temperature 0.4 at most")
            limits_file = engine.workspace.policies / "agov" / "config" / "data.json"
            limits = json.loads(limits_file.read_text())
            limits["temperature_limits"]["analysis"] = 0.4
            limits_file.write_text(json.dumps(limits, indent=2) + "\n")
            dry = engine.reload_policy(actor=ACTOR, reason="tighten analysis temperature", dry_run=True)
            echo(
                f"    dry run on {dry['policy_hash'][:12]}: would invalidate "
                f"{dry['revalidation']['newly_invalidated']} ({', '.join(c['agent_id'] for c in dry['revalidation']['changes'])})"
            )
            reload = engine.reload_policy(actor=ACTOR, reason="tighten analysis temperature")
            reval = reload["revalidation"]
            echo(
                f"    hot reload {reload['previous_hash'][:12]} -> {reload['policy_hash'][:12]}: valid {reval['valid']},"
                f" restricted {reval['restricted']}, invalidated {reval['invalidated']}"
            )
            for agent in engine.list_agents(status="GOVERNED_INVALIDATED"):
                echo(f"        {agent.id}: {'; '.join(r['message'] for r in agent.reasons)}")
            for record in created:
                seen[f"after_reload:{record.id}"] = _admit(engine, echo, record.id).code

            _chapter(echo, "8. Roll back to the previous policy")
            back = engine.rollback_policy(reload["previous_hash"], actor=ACTOR, reason="demo rollback")
            echo(
                f"    active again: {back['policy_hash'][:12]}; restored {back['revalidation']['restored']} agents"
            )
            for record in created:
                seen[f"after_rollback:{record.id}"] = _admit(engine, echo, record.id).code

            _chapter(echo, "9. The audit trail is hash-chained")
            audit = engine.verify_audit()
            echo(f"    {audit.events} events, chain {'intact' if audit.ok else 'BROKEN'}")
            seen["audit_ok"] = audit.ok
    finally:
        if keep:
            seen["kept_workspace"] = str(home)
            echo(f"\nworkspace kept at {home}")
        else:
            shutil.rmtree(home.parent, ignore_errors=True)
    return seen


def _event_agent() -> tuple[dict[str, Any]]:
    document, _source = from_event(
        {
            "event": "agent.registered",
            "source": "model-registry",
            "delivery_id": "d-4711",
            "agent": from_template("ideation-partner", agent_id="launch-ideas", display_name="Launch Ideas"),
        }
    )
    return (document,)


def _edit_stored_spec(db: Path, agent_id: str, old: str, new: str) -> None:
    """Change the stored spec behind agov's back, as an attacker with the database file would."""
    conn = sqlite3.connect(db)
    conn.execute(
        "UPDATE agent_versions SET spec = replace(spec, ?, ?) WHERE agent_id = ?", (old, new, agent_id)
    )
    conn.commit()
    conn.close()
