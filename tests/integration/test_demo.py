"""`agov demo` tells the whole story on a real OPA; each chapter's admission code is checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from agov.demo import run_demo


def test_the_demo_story_shows_each_admission_code(opa_bin: Path) -> None:
    lines: list[str] = []
    seen = run_demo(echo=lines.append)
    assert seen["admit:finance-reconciler"] == "ADMISSION_ALLOW"
    assert seen["admit:scratch-pad"] == "ADMISSION_ALLOW", "a contained sandbox agent may start"
    assert seen["tampered"] == "ADMISSION_DENY_SPEC_HASH_MISMATCH"
    assert seen["revoked"] == "ADMISSION_DENY_SIGNER_REVOKED"
    assert seen["after_resign"] == "ADMISSION_ALLOW"
    assert seen["after_reload:research-analyst"] == "ADMISSION_DENY_INVALIDATED"
    assert seen["after_reload:invoice-triage"] == "ADMISSION_DENY_INVALIDATED"
    assert seen["after_reload:finance-reconciler"] == "ADMISSION_ALLOW"
    assert seen["after_rollback:research-analyst"] == "ADMISSION_ALLOW"
    assert seen["audit_ok"] is True
    assert any("PROMOTION_DENY_ANATOMY_INCOMPLETE" in line for line in lines)


def test_demo_json_is_one_document_with_the_story_and_the_codes(opa_bin: Path) -> None:
    from click.testing import CliRunner

    from agov.cli import main

    result = CliRunner().invoke(main, ["demo", "--json", "--keep"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)  # the whole output: no prose around it
    kept = Path(doc["seen"]["kept_workspace"])
    assert (kept / "agov.db").is_file()
    shutil.rmtree(kept.parent)
    assert doc["seen"]["admit:finance-reconciler"] == "ADMISSION_ALLOW"
    assert doc["seen"]["audit_ok"] is True
    assert any(line.startswith("== 9.") for line in doc["story"])
