"""New proofs are signed only by a key inside its validity window.

A key generated with ``--not-before`` in the future once became the active signer at once:
promotions reported success with proofs admission refused, and a revalidation re-signed every
governed agent with it, so every one of them was then denied. Later it signed nothing until its
window opened, and every promotion was denied meanwhile. Now it is staged: the key in use keeps
signing until then.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from _reload_support import ACTOR, agent_doc, create_governed, engine_governing

from agov.config import Config, Limits
from agov.decisions import Status
from agov.engine import Engine
from agov.errors import KeyMaterialError
from agov.registry import CreationMode
from agov.store.sqlite import iso

GOVERNED = ("window-a", "window-b")


@pytest.fixture
def engine(tmp_path: Path, opa_bin: Path) -> Iterator[Engine]:
    with engine_governing(tmp_path / "ws", GOVERNED) as eng:
        eng.create_agent(agent_doc("window-new"), mode=CreationMode.IMPORT, source="x.yaml", actor=ACTOR)
        yield eng


def _state(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    return {
        table: [tuple(r) for r in engine.store.query(f"SELECT * FROM {table} ORDER BY 1")]
        for table in ("agents", "agent_proofs", "revalidation_runs")
    }


def _at(engine: Engine, when: datetime) -> None:
    engine.clock = lambda: when


def _signed_by(engine: Engine, agent_id: str) -> str:
    row = engine.store.query_one(
        "SELECT keyid FROM agent_proofs WHERE agent_id = ? AND superseded_at IS NULL", (agent_id,)
    )
    return str(row["keyid"])


def _key_states(engine: Engine) -> dict[str, str]:
    return {k.keyid: k.state for k in engine.list_keys()}


def _no_signer_signs_nothing(engine: Engine, key: str, message: str) -> None:
    before = _state(engine)
    keys = engine.list_keys()
    assert not any(k.active for k in keys), "keys list names no signer"

    promoted = engine.promote("window-new", actor=ACTOR, role="agent_admin")
    assert not promoted.allow
    assert [r.code for r in promoted.deny] == ["PROMOTION_DENY_ENGINE_UNAVAILABLE"]
    assert re.search(message, promoted.deny[0].message) and key in promoted.deny[0].message
    with pytest.raises(KeyMaterialError, match=message):
        engine.revalidate()
    assert engine.list_keys() == keys

    assert _state(engine) == before, "no proof signed, no agent changed, no run opened"
    assert engine.get_agent("window-new").status is Status.SANDBOX


def test_a_key_whose_window_has_closed_signs_nothing(engine: Engine) -> None:
    now = engine.clock()
    key = engine.generate_key(alg="ed25519", actor=ACTOR, not_after=now + timedelta(hours=1))
    _at(engine, now + timedelta(hours=2))

    _no_signer_signs_nothing(engine, key.keyid, "stopped being valid at")

    for agent_id in GOVERNED:
        assert engine.admit(agent_id).allow, "the proofs of the old key still admit"


def test_a_staged_key_leaves_the_key_in_use_signing_until_its_window_opens(engine: Engine) -> None:
    (old,) = [k.keyid for k in engine.list_keys() if k.active]
    opens = engine.clock() + timedelta(days=1)

    staged = engine.generate_key(alg="ed25519", actor=ACTOR, not_before=opens)

    assert (staged.state, staged.active) == ("staged", False)
    assert _key_states(engine) == {old: "signing", staged.keyid: "staged"}
    generated = engine.store.query_one(
        "SELECT payload FROM audit_events WHERE type = 'KEY_GENERATED' ORDER BY seq DESC"
    )
    assert json.loads(generated["payload"]) == {
        "keyid": staged.keyid,
        "alg": "ed25519",
        "staged_until": iso(opens),
    }
    promoted = engine.promote("window-new", actor=ACTOR, role="agent_admin")
    assert promoted.allow and promoted.proof_keyid == old
    assert engine.revalidate().valid == len(GOVERNED) + 1
    assert {_signed_by(engine, a) for a in (*GOVERNED, "window-new")} == {old}

    _at(engine, opens)
    assert _key_states(engine) == {old: "verifying", staged.keyid: "signing"}
    engine.create_agent(agent_doc("window-later"), mode=CreationMode.IMPORT, source="x.yaml", actor=ACTOR)
    later = engine.promote("window-later", actor=ACTOR, role="agent_admin")
    assert later.allow and later.proof_keyid == staged.keyid
    for agent_id in (*GOVERNED, "window-new", "window-later"):
        assert engine.admit(agent_id).allow, "proofs of both keys admit"


def test_while_a_staged_key_waits_a_revoked_signer_signs_nothing(engine: Engine) -> None:
    (old,) = [k.keyid for k in engine.list_keys() if k.active]
    opens = engine.clock() + timedelta(days=1)
    staged = engine.generate_key(alg="ed25519", actor=ACTOR, not_before=opens)
    engine.revoke_key(old, reason="leaked", actor=ACTOR)

    assert _key_states(engine) == {old: "revoked", staged.keyid: "staged"}
    _no_signer_signs_nothing(engine, old, f"was revoked at .*the staged key {staged.keyid} takes over")

    _at(engine, opens)
    assert engine.promote("window-new", actor=ACTOR, role="agent_admin").proof_keyid == staged.keyid


def test_revoking_a_staged_key_after_it_took_over_does_not_bring_back_the_old_one(engine: Engine) -> None:
    """Found by review: the key it took over from was still designated, and signed again."""
    (old,) = [k.keyid for k in engine.list_keys() if k.active]
    opens = engine.clock() + timedelta(days=1)
    staged = engine.generate_key(alg="ed25519", actor=ACTOR, not_before=opens)
    _at(engine, opens + timedelta(hours=1))
    engine.revoke_key(staged.keyid, reason="leaked", actor=ACTOR)

    assert _key_states(engine) == {old: "verifying", staged.keyid: "revoked"}
    _no_signer_signs_nothing(engine, staged.keyid, "was revoked at")


def test_revoking_a_staged_key_before_its_window_opens_cancels_the_rotation(engine: Engine) -> None:
    (old,) = [k.keyid for k in engine.list_keys() if k.active]
    opens = engine.clock() + timedelta(days=1)
    staged = engine.generate_key(alg="ed25519", actor=ACTOR, not_before=opens)
    engine.revoke_key(staged.keyid, reason="rotation called off", actor=ACTOR)

    _at(engine, opens + timedelta(hours=1))

    assert _key_states(engine) == {old: "signing", staged.keyid: "revoked"}
    assert engine.promote("window-new", actor=ACTOR, role="agent_admin").proof_keyid == old


def test_a_store_whose_only_designated_key_is_not_valid_yet_signs_nothing(engine: Engine) -> None:
    """As an older agov left it: a key generated for later replaced the signer at once."""
    (old,) = [k.keyid for k in engine.list_keys() if k.active]
    opens = engine.clock() + timedelta(days=1)
    staged = engine.generate_key(alg="ed25519", actor=ACTOR, not_before=opens)
    with engine.store.transaction() as tx:
        tx.execute("UPDATE signing_keys SET active = 0 WHERE keyid = ?", (old,))

    _no_signer_signs_nothing(engine, staged.keyid, "no proof signing key may sign yet")


def test_a_key_generated_for_now_leaves_a_staged_key_staged(engine: Engine) -> None:
    (old,) = [k.keyid for k in engine.list_keys() if k.active]
    opens = engine.clock() + timedelta(days=1)
    staged = engine.generate_key(alg="ed25519", actor=ACTOR, not_before=opens)

    current = engine.generate_key(alg="ed25519", actor=ACTOR)

    assert _key_states(engine) == {old: "verifying", staged.keyid: "staged", current.keyid: "signing"}
    assert engine.promote("window-new", actor=ACTOR, role="agent_admin").proof_keyid == current.keyid
    _at(engine, opens)
    assert _key_states(engine) == {old: "verifying", staged.keyid: "signing", current.keyid: "verifying"}
    assert engine.revalidate().valid == len(GOVERNED) + 1
    assert {_signed_by(engine, a) for a in (*GOVERNED, "window-new")} == {staged.keyid}


def test_the_key_signs_once_its_window_opens(engine: Engine) -> None:
    opens = engine.clock() + timedelta(days=1)
    key = engine.generate_key(alg="ed25519", actor=ACTOR, not_before=opens)
    _at(engine, opens)

    promoted = engine.promote("window-new", actor=ACTOR, role="agent_admin")

    assert promoted.allow and promoted.proof_keyid == key.keyid
    assert engine.admit("window-new").allow


def test_a_key_revoked_during_a_run_stops_it_and_its_resumption_re_signs_everyone(
    tmp_path: Path, opa_bin: Path
) -> None:
    home = tmp_path / "chunked"
    with Engine.init(home, Config(limits=Limits(revalidation_chunk_size=1)), actor=ACTOR) as engine:
        for agent_id in GOVERNED:
            create_governed(engine, agent_id)
        first_key = engine.list_keys()[0].keyid
        state: dict[str, list[tuple[Any, ...]]] = {}

        def revoke_after_first_chunk(done: int) -> None:
            if state:
                return
            state.update(_state(engine))  # GOVERNED[0] is re-signed, with the first key
            with Engine.open(home) as other:  # another process revokes that key
                other.revoke_key(first_key, reason="leaked", actor="other")

        with pytest.raises(KeyMaterialError, match="was revoked during the revalidation"):
            engine.revalidate(progress=revoke_after_first_chunk)
        after = _state(engine)
        assert after["agent_proofs"] == state["agent_proofs"], "nothing signed after the revocation"
        run = engine.store.query_one(
            "SELECT id, finished_at, cursor, total FROM revalidation_runs ORDER BY id DESC"
        )
        assert (run["finished_at"], run["cursor"], run["total"]) == (None, "", 0), (
            "open, from the first agent"
        )
        stopped = engine.store.query_one(
            "SELECT payload FROM audit_events WHERE type = 'POLICY_REVALIDATION' ORDER BY seq DESC"
        )
        assert "was revoked during the revalidation" in stopped["payload"]

        engine.generate_key(alg="ed25519", actor=ACTOR)
        report = engine.revalidate()

        assert (report.run_id, report.resumed, report.total, report.valid) == (run["id"], False, 2, 2)
        for agent_id in GOVERNED:
            keyid = engine.store.query_one(
                "SELECT keyid FROM agent_proofs WHERE agent_id = ? AND superseded_at IS NULL", (agent_id,)
            )["keyid"]
            assert keyid != first_key
            assert engine.admit(agent_id).allow


def test_a_key_revoked_while_no_process_runs_the_interrupted_run_makes_its_resumption_start_over(
    tmp_path: Path, opa_bin: Path
) -> None:
    """The run died (kill -9, Ctrl-C) after re-signing the first agents; their key was revoked
    before anyone resumed it. Resuming from the cursor left those agents on proofs no admission
    accepts, and `agov revalidate` reported the rest as valid."""
    home = tmp_path / "chunked"
    with Engine.init(home, Config(limits=Limits(revalidation_chunk_size=1)), actor=ACTOR) as engine:
        for agent_id in GOVERNED:
            create_governed(engine, agent_id)
        first_key = engine.list_keys()[0].keyid

        def die_after_first_chunk(done: int) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            engine.revalidate(progress=die_after_first_chunk)
        run = engine.store.query_one("SELECT id, cursor FROM revalidation_runs WHERE finished_at IS NULL")
        assert run["cursor"] == GOVERNED[0]
        engine.revoke_key(first_key, reason="leaked", actor="other")
        engine.generate_key(alg="ed25519", actor=ACTOR)

        report = engine.revalidate()

        assert (report.run_id, report.resumed, report.total, report.valid) == (run["id"], False, 2, 2)
        for agent_id in GOVERNED:
            assert engine.admit(agent_id).allow, agent_id
        (restart,) = [
            e.payload
            for e in engine.store.audit_events()
            if e.type == "POLICY_REVALIDATION" and "revoked" in e.payload.get("stopped", "")
        ]
        assert restart["run_id"] == run["id"] and restart["restarts_from_the_first_agent"] is True


RUN = ("run-a", "run-b", "run-c", "run-d", "run-e")


def _chunked(home: Path) -> tuple[Engine, list[datetime]]:
    """An engine judging one agent per chunk, with RUN governed and a clock the test moves."""
    engine = Engine.init(home, Config(limits=Limits(revalidation_chunk_size=1)), actor=ACTOR)
    clock = [engine.clock()]
    engine.clock = lambda: clock[0]
    for agent_id in RUN:
        create_governed(engine, agent_id)
    return engine, clock


def test_a_key_that_takes_over_during_a_run_signs_the_rest_of_it(tmp_path: Path, opa_bin: Path) -> None:
    engine, clock = _chunked(tmp_path / "ws")
    with engine:
        (old,) = [k.keyid for k in engine.list_keys() if k.active]
        opens = clock[0] + timedelta(hours=1)
        staged = engine.generate_key(alg="ed25519", actor=ACTOR, not_before=opens)

        def open_the_window(done: int) -> None:
            clock[0] = opens + timedelta(minutes=1)

        report = engine.revalidate(progress=open_the_window)

        assert (report.total, report.valid) == (len(RUN), len(RUN))
        signers = [_signed_by(engine, agent_id) for agent_id in RUN]
        assert signers[0] == old and signers[-1] == staged.keyid, signers
        assert signers == sorted(signers, key=[old, staged.keyid].index), (
            "never the old key after the new one"
        )
        for agent_id in RUN:
            assert engine.admit(agent_id).allow


def test_a_run_stops_when_the_key_that_took_over_is_revoked_and_the_old_one_signs_no_more(
    tmp_path: Path, opa_bin: Path
) -> None:
    """Found by review: the run went on signing with the key it started with."""
    home = tmp_path / "ws"
    engine, clock = _chunked(home)
    with engine:
        (old,) = [k.keyid for k in engine.list_keys() if k.active]
        opens = clock[0] + timedelta(hours=1)
        staged = engine.generate_key(alg="ed25519", actor=ACTOR, not_before=opens)
        seq: list[int] = []

        def take_over_then_revoke(done: int) -> None:
            if seq:
                return
            clock[0] = opens + timedelta(minutes=1)
            with Engine.open(home) as other:  # another process revokes the key that took over
                other.clock = lambda: clock[0]
                other.revoke_key(staged.keyid, reason="leaked", actor="other")
            seq.append(engine.store.audit_events()[-1].seq)

        with pytest.raises(
            KeyMaterialError, match=f"was revoked at .*{staged.keyid}|{staged.keyid}.*was revoked"
        ):
            engine.revalidate(progress=take_over_then_revoke)

        renewed_after = [
            e
            for e in engine.store.audit_events(after_seq=seq[0])
            if e.type in ("PROOFS_RENEWED", "PROMOTION_SUCCESS")
        ]
        assert renewed_after == [], "nothing signed after the revocation, by either key"
        assert old in {_signed_by(engine, agent_id) for agent_id in RUN}
        assert staged.keyid not in {_signed_by(engine, agent_id) for agent_id in RUN}


def test_a_planned_rotation_hands_over_during_a_run(tmp_path: Path, opa_bin: Path) -> None:
    """The old key's window ends when the staged key's opens. Found by review: the run checked
    its own key's expiry first, stopped, and started again from the first agent."""
    engine, clock = _chunked(tmp_path / "ws")
    with engine:
        switch = clock[0] + timedelta(hours=1)
        first = engine.generate_key(alg="ed25519", actor=ACTOR, not_after=switch)
        staged = engine.generate_key(alg="ed25519", actor=ACTOR, not_before=switch)
        engine.revalidate()  # every proof now by the first key
        runs = engine.store.query_one("SELECT COUNT(*) AS n FROM revalidation_runs")["n"]

        def pass_the_switch(done: int) -> None:
            clock[0] = switch + timedelta(minutes=1)

        with engine.store.transaction() as tx:  # a run to do again, as after an org limits change
            tx.execute("UPDATE revalidation_runs SET org_digest = 'other'")
        report = engine.revalidate(progress=pass_the_switch)

        assert (report.total, report.valid, report.resumed) == (len(RUN), len(RUN), False)
        assert engine.store.query_one("SELECT COUNT(*) AS n FROM revalidation_runs")["n"] == runs + 1
        signers = [_signed_by(engine, agent_id) for agent_id in RUN]
        assert signers[0] == first.keyid and signers[-1] == staged.keyid, signers
        for agent_id in RUN:
            assert engine.admit(agent_id).allow, "proofs of the first key were issued inside its window"


def test_a_proof_that_expires_between_judging_and_commit_is_not_renewed(
    tmp_path: Path, opa_bin: Path
) -> None:
    """Found by review: the proof was renewed with its old expiry, before its new issue time, and
    the run failed with an internal error."""
    engine, clock = _chunked(tmp_path / "ws")
    with engine:
        expiry = clock[0] + timedelta(days=365)  # the default proof TTL
        clock[0] = expiry - timedelta(minutes=1)

        def pass_the_expiry(done: int) -> None:
            clock[0] = expiry + timedelta(minutes=1)

        report = engine.revalidate(progress=pass_the_expiry)

        assert report.total == len(RUN) and report.invalidated >= 1
        for agent_id in RUN:
            agent = engine.get_agent(agent_id)
            if agent.status is Status.GOVERNED_INVALIDATED:
                assert "REVALIDATION_PROOF_EXPIRED" in json.dumps(agent.reasons)
            assert not engine.admit(agent_id).allow, "every proof has expired by now"
