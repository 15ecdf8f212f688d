"""`keys generate` refuses a key that could never sign, and leaves no key file the store does
not record (found by review: a window already over became the active signer, and a failed
generate left an orphan private key in keys/)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agov import cli, keyring
from agov.errors import KeyMaterialError, StoreError, UsageError
from agov.store import Store

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "agov.db")


def test_a_window_that_has_already_ended_is_refused(store: Store, tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    first = keyring.generate(store, keys_dir, actor="ops", now=NOW)
    files = sorted(keys_dir.iterdir())

    with pytest.raises(UsageError, match="has passed: the key could never sign"):
        keyring.generate(store, keys_dir, actor="ops", not_after=NOW - timedelta(seconds=1), now=NOW)

    assert [k.keyid for k in keyring.list_keys(store)] == [first.keyid]
    assert keyring.get(store, first.keyid).active, "the signer in use stays the active one"
    assert sorted(keys_dir.iterdir()) == files


def test_a_generate_the_store_refuses_leaves_no_key_file(store: Store, tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir(mode=0o700)
    store.anchor_path.write_text("{broken")  # every write is refused before it commits

    with pytest.raises(StoreError, match=r"audit anchor .* is unreadable"):
        keyring.generate(store, keys_dir, actor="ops", now=NOW)

    assert list(keys_dir.iterdir()) == []
    assert keyring.list_keys(store) == []


def test_a_time_with_no_utc_form_is_bad_input() -> None:
    with pytest.raises(UsageError, match=r"has no UTC time \(past year 9999\)"):
        cli._when("9999-12-31T23:59:59-12:00")
    assert cli._when("9999-12-31T23:59:59+00:00") == datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def test_keys_list_names_each_key_state_at_the_given_time(store: Store, tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    short = keyring.generate(store, keys_dir, actor="ops", not_after=NOW + timedelta(hours=1), now=NOW)
    revoked = keyring.generate(store, keys_dir, actor="ops", now=NOW)
    keyring.revoke(store, revoked.keyid, reason="leaked", actor="ops", now=NOW)
    current = keyring.generate(store, keys_dir, actor="ops", now=NOW)
    staged = keyring.generate(store, keys_dir, actor="ops", not_before=NOW + timedelta(days=1), now=NOW)

    def states(at: datetime) -> dict[str, tuple[str, bool]]:
        return {k.keyid: (k.state, k.active) for k in keyring.list_keys(store, at)}

    assert states(NOW) == {
        short.keyid: ("verifying", False),
        revoked.keyid: ("revoked", False),
        current.keyid: ("signing", True),
        staged.keyid: ("staged", False),
    }
    assert states(NOW + timedelta(days=2)) == {
        short.keyid: ("expired", False),
        revoked.keyid: ("revoked", False),
        current.keyid: ("verifying", False),
        staged.keyid: ("signing", True),
    }
    assert {k.state for k in keyring.list_keys(store, NOW)} <= set(keyring.KEY_STATES)


def test_a_window_agov_did_not_write_is_listed_and_signs_nothing(store: Store, tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    key = keyring.generate(store, keys_dir, actor="ops", now=NOW)
    with store.transaction() as tx:
        tx.execute("UPDATE signing_keys SET not_before = '2026-11-22 12:00' WHERE keyid = ?", (key.keyid,))

    assert [(k.keyid, k.state, k.active) for k in keyring.list_keys(store, NOW)] == [
        (key.keyid, "invalid", False)
    ]
    with pytest.raises(KeyMaterialError, match="validity window agov did not write"):
        keyring.active_signer(store, keys_dir, NOW)


def test_a_key_row_with_text_that_is_not_utf8_is_listed_and_a_new_key_replaces_it(
    store: Store, tmp_path: Path
) -> None:
    """Found by review: reading whole rows as text made `keys list` and `keys generate`, the way
    out the error names, fail on such a row."""
    keys_dir = tmp_path / "keys"
    key = keyring.generate(store, keys_dir, actor="ops", now=NOW)
    with store.transaction() as tx:
        tx.execute("UPDATE signing_keys SET not_after = CAST(X'ff20' AS TEXT) WHERE keyid = ?", (key.keyid,))

    assert [(k.keyid, k.state) for k in keyring.list_keys(store, NOW)] == [(key.keyid, "invalid")]
    with pytest.raises(KeyMaterialError, match="validity window agov did not write"):
        keyring.active_signer(store, keys_dir, NOW)

    new = keyring.generate(store, keys_dir, actor="ops", now=NOW)

    assert keyring.active_signer(store, keys_dir, NOW).keyid == new.keyid
    assert [(k.keyid, k.state) for k in keyring.list_keys(store, NOW)] == [
        (key.keyid, "invalid"),
        (new.keyid, "signing"),
    ]


def test_a_staged_time_with_no_utc_form_is_an_invalid_row_not_a_crash(store: Store, tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    key = keyring.generate(store, keys_dir, actor="ops", now=NOW)
    staged = keyring.generate(store, keys_dir, actor="ops", not_before=NOW + timedelta(days=1), now=NOW)
    with store.transaction() as tx:
        tx.execute(
            "UPDATE signing_keys SET not_before = '9999-12-31T23:00:00-12:00' WHERE keyid = ?",
            (staged.keyid,),
        )

    assert [(k.keyid, k.state) for k in keyring.list_keys(store, NOW)] == [
        (key.keyid, "verifying"),
        (staged.keyid, "invalid"),
    ]
    with pytest.raises(KeyMaterialError, match="validity window agov did not write"):
        keyring.active_signer(store, keys_dir, NOW)
    new = keyring.generate(store, keys_dir, actor="ops", now=NOW)  # the way out the hint names
    assert keyring.active_signer(store, keys_dir, NOW).keyid == new.keyid


def test_keys_list_prints_text_that_is_not_utf8_escaped(store: Store, tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    key = keyring.generate(store, keys_dir, actor="ops", now=NOW)
    with store.transaction() as tx:
        tx.execute("UPDATE signing_keys SET revoked_at = CAST(X'ff' AS TEXT) WHERE keyid = ?", (key.keyid,))

    (listed,) = keyring.list_keys(store, NOW)

    assert (listed.state, listed.revoked_at) == ("revoked", "\\xff")
    json.dumps(listed.as_dict()).encode("utf-8")  # printable as JSON and as text


def test_revoking_a_staged_key_retires_it_and_a_second_revoke_is_refused(
    store: Store, tmp_path: Path
) -> None:
    keys_dir = tmp_path / "keys"
    key = keyring.generate(store, keys_dir, actor="ops", now=NOW)
    staged = keyring.generate(store, keys_dir, actor="ops", not_before=NOW + timedelta(days=1), now=NOW)

    keyring.revoke(store, staged.keyid, reason="called off", actor="ops", now=NOW)

    row = store.query_one("SELECT active FROM signing_keys WHERE keyid = ?", (staged.keyid,))
    assert row["active"] == 0, "retired: it never takes over, whatever the clocks say later"
    assert keyring.active_signer(store, keys_dir, NOW + timedelta(days=2)).keyid == key.keyid
    (event,) = [e for e in store.audit_events() if e.type == "KEY_REVOKED"]
    assert event.payload == {"keyid": staged.keyid, "reason": "called off", "cancelled_staged": True}
    with pytest.raises(UsageError, match="already revoked"):
        keyring.revoke(store, staged.keyid, reason="again", actor="ops", now=NOW)
