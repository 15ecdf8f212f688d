"""Admission tells a user whose proof expired, or whose signer was revoked, to promote the agent
again: that promotion must be allowed. It was refused as "already GOVERNED_VALID under this
policy", so the advice led nowhere (found by review). A live proof still refuses a duplicate."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from _reload_support import ACTOR, ADMIN_ROLE, agent_doc, engine_governing

from agov.engine import Engine
from agov.errors import UsageError

AGENT = "renewed"


@pytest.fixture
def engine(tmp_path: Path, opa_bin: Path) -> Iterator[Engine]:
    with engine_governing(tmp_path / "ws", [AGENT]) as eng:
        yield eng


def _current_proofs(engine: Engine) -> list[str]:
    rows = engine.store.query(
        "SELECT keyid FROM agent_proofs WHERE agent_id = ? AND superseded_at IS NULL", (AGENT,)
    )
    return [r["keyid"] for r in rows]


def _rows(engine: Engine) -> dict[str, list[tuple[object, ...]]]:
    return {
        t: [tuple(r) for r in engine.store.query(f"SELECT * FROM {t} ORDER BY 1")]
        for t in ("agents", "agent_proofs")
    }


def test_a_live_proof_refuses_a_duplicate_promotion(engine: Engine) -> None:
    before = _rows(engine)
    with pytest.raises(UsageError, match="is already GOVERNED_VALID under this policy"):
        engine.promote(AGENT, actor=ACTOR, role=ADMIN_ROLE)
    assert _rows(engine) == before


def test_after_its_signer_is_revoked_the_agent_is_promoted_again_as_the_deny_advises(engine: Engine) -> None:
    (old,) = engine.list_keys()
    engine.revoke_key(old.keyid, reason="compromised", actor=ACTOR)
    new = engine.generate_key(alg="ed25519", actor=ACTOR)
    denied = engine.admit(AGENT)
    assert (
        denied.code == "ADMISSION_DENY_SIGNER_REVOKED"
        and "once a key may sign, `agov revalidate` re-signs it" in denied.reasons[0].message
    )

    assert engine.promote(AGENT, actor=ACTOR, role=ADMIN_ROLE).allow

    assert _current_proofs(engine) == [new.keyid]
    assert engine.admit(AGENT).allow


def test_after_its_proof_expires_the_agent_is_promoted_again_as_the_deny_advises(engine: Engine) -> None:
    expires = engine.store.query_one(
        "SELECT expires_at FROM agent_proofs WHERE agent_id = ? AND superseded_at IS NULL", (AGENT,)
    )["expires_at"]
    start = engine.clock()
    later = start + timedelta(days=engine.config.proof_ttl_days or 0, seconds=1)
    assert later.isoformat() > expires
    engine.clock = lambda: later
    denied = engine.admit(AGENT)
    assert (
        denied.code == "ADMISSION_DENY_PROOF_EXPIRED"
        and "promote the agent again" in denied.reasons[0].message
    )

    assert engine.promote(AGENT, actor=ACTOR, role=ADMIN_ROLE).allow

    assert engine.admit(AGENT).allow


def test_a_proof_row_with_a_time_no_agov_wrote_does_not_block_promoting_again(engine: Engine) -> None:
    with engine.store.transaction() as tx:
        tx.execute("UPDATE agent_proofs SET expires_at = 'garbage' WHERE agent_id = ?", (AGENT,))

    assert engine.promote(AGENT, actor=ACTOR, role=ADMIN_ROLE).allow

    assert engine.admit(AGENT).allow


def test_a_signing_failure_after_opa_allowed_is_an_audited_deny_that_changes_nothing(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, only a lost race was handled there: any other error escaped unaudited."""
    from agov import promotion
    from agov.errors import ProofError
    from agov.registry import CreationMode

    engine.create_agent(agent_doc("fresh"), mode=CreationMode.IMPORT, source="x.yaml", actor=ACTOR)
    before = _rows(engine)
    seq = engine.store.audit_events()[-1].seq

    def broken_sign(*_args: object, **_kwargs: object) -> object:
        raise ProofError("injected: the statement could not be signed")

    monkeypatch.setattr(promotion, "sign_for", broken_sign)
    result = engine.promote("fresh", actor=ACTOR, role=ADMIN_ROLE)

    assert not result.allow and [r.code for r in result.deny] == ["PROMOTION_DENY_ENGINE_UNAVAILABLE"]
    assert "injected: the statement could not be signed" in result.deny[0].message
    assert _rows(engine) == before
    assert [e.type for e in engine.store.audit_events(after_seq=seq)] == [
        "PROMOTION_ATTEMPT",
        "PROMOTION_DENIED",
    ]
