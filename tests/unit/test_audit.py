"""Reliability row R13: the hash-chained audit log shows every edit, deletion, reordering and
truncation, and names the first bad sequence number."""

from __future__ import annotations

import errno
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from agov.audit import verify_chain
from agov.errors import StoreError
from agov.store import Store

EVENTS = 10


def _store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "agov.db")
    for i in range(EVENTS):
        with store.transaction() as tx:
            tx.audit("TEST_EVENT", agent_id=f"agent-{i}", actor="tester", payload={"i": i})
    return store


def _raw(store: Store, sql: str, params: tuple[object, ...] = ()) -> None:
    conn = sqlite3.connect(store.path)
    conn.execute(sql, params)
    conn.commit()
    conn.close()


def test_an_untouched_chain_verifies(tmp_path: Path) -> None:
    report = verify_chain(_store(tmp_path))
    assert report.ok and report.events == EVENTS and report.first_bad_seq is None


def _swap_3_and_6(store: Store) -> None:
    _raw(store, "UPDATE audit_events SET seq = -3 WHERE seq = 3")
    _raw(store, "UPDATE audit_events SET seq = 3 WHERE seq = 6")
    _raw(store, "UPDATE audit_events SET seq = 6 WHERE seq = -3")


TAMPERS: dict[str, tuple[Callable[[Store], None], int]] = {
    "edit payload": (lambda s: _raw(s, "UPDATE audit_events SET payload = '{\"i\":99}' WHERE seq = 4"), 4),
    "edit type": (lambda s: _raw(s, "UPDATE audit_events SET type = 'OTHER' WHERE seq = 7"), 7),
    "edit actor": (lambda s: _raw(s, "UPDATE audit_events SET actor = 'mallory' WHERE seq = 1"), 1),
    "delete middle": (lambda s: _raw(s, "DELETE FROM audit_events WHERE seq = 5"), 5),
    "delete first": (lambda s: _raw(s, "DELETE FROM audit_events WHERE seq = 1"), 1),
    "reorder": (_swap_3_and_6, 3),
    "truncate tail": (lambda s: _raw(s, "DELETE FROM audit_events WHERE seq > 8"), 9),
    "truncate all": (lambda s: _raw(s, "DELETE FROM audit_events"), 1),
    # bytes that are not UTF-8 (sqlite3 would fail the whole read on them as text)
    "time not utf-8": (lambda s: _raw(s, "UPDATE audit_events SET time = X'ff' WHERE seq = 6"), 6),
    "actor not utf-8": (
        lambda s: _raw(s, "UPDATE audit_events SET actor = CAST(X'ff' AS TEXT) WHERE seq = 3"),
        3,
    ),
    "rehash edited row": (
        lambda s: _raw(s, "UPDATE audit_events SET payload = '{}', hash = ? WHERE seq = 2", ("f" * 64,)),
        2,
    ),
}


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_r13_tampering_is_detected_at_the_first_bad_sequence(tmp_path: Path, name: str) -> None:
    store = _store(tmp_path)
    tamper, first_bad = TAMPERS[name]
    tamper(store)
    report = verify_chain(store)
    assert not report.ok, name
    assert report.first_bad_seq == first_bad, (name, report)


def test_r13_figure(tmp_path: Path) -> None:
    detected = 0
    for index, name in enumerate(sorted(TAMPERS)):
        (tmp_path / str(index)).mkdir()
        store = _store(tmp_path / str(index))
        TAMPERS[name][0](store)
        report = verify_chain(store)
        detected += (not report.ok) and report.first_bad_seq == TAMPERS[name][1]
    print(f"R13 audit tampering: detected {detected}/{len(TAMPERS)} with the right first bad sequence")
    assert detected == len(TAMPERS)


def test_a_rolled_back_transaction_leaves_no_event(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.audit("WILL_ROLL_BACK")
        raise RuntimeError("boom")
    assert len(store.audit_events()) == EVENTS
    assert verify_chain(store).ok


def test_an_unreadable_anchor_refuses_a_write_before_it_commits(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.anchor_path.write_text("{broken")

    with pytest.raises(StoreError, match=r"audit anchor .* is unreadable"), store.transaction() as tx:
        tx.audit("NEVER_COMMITTED")
        tx.execute("CREATE TABLE never_committed (x)")

    assert len(store.audit_events()) == EVENTS
    assert store.query("SELECT name FROM sqlite_master WHERE name = 'never_committed'") == []


@pytest.mark.parametrize(
    ("loss", "held"),
    [
        ("DELETE FROM audit_events WHERE seq > 7", "does not hold"),  # an older copy restored, a lost -wal
        ("DELETE FROM audit_events", "does not hold"),  # an emptied store, its schema made again
        ("UPDATE audit_events SET hash = 'f' WHERE seq = 10", "holds another"),
    ],
    ids=["rolled-back", "emptied", "replaced"],
)
def test_a_store_that_lost_what_the_anchor_records_is_not_written_to(
    tmp_path: Path, loss: str, held: str
) -> None:
    """Before: agov wrote on, and once the new log passed the anchor's sequence the anchor moved
    forward; `agov audit verify` then said ok, and the loss left no trace."""
    store = _store(tmp_path)
    anchor = store.anchor_path.read_text()
    _raw(store, loss)
    before = store.audit_events()
    for _ in range(EVENTS + 2):  # more events than the anchor's sequence: none is written
        with (
            pytest.raises(StoreError, match=r"holds|does not hold") as refused,
            store.transaction() as tx,
        ):
            tx.audit("AFTER_THE_LOSS")
            tx.execute("CREATE TABLE never_committed (x)")
        assert f"{held} event 10, which agov.db.audit-anchor records" in refused.value.message
    assert store.audit_events() == before
    assert store.query("SELECT name FROM sqlite_master WHERE name = 'never_committed'") == []
    assert store.anchor_path.read_text() == anchor
    assert not verify_chain(store).ok
    with pytest.raises(StoreError, match=f"{held} event 10"):
        Store(store.path)  # nor read as if nothing was lost
    assert not verify_chain(Store(store.path, check_anchor=False)).ok, "verify and export may open it"


def test_a_committed_write_is_not_reported_as_failed_when_the_anchor_cannot_be_advanced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The anchor is written after COMMIT: a failure there (a full disk) must not tell the caller
    that a committed change failed. The anchor stays behind the log, which still verifies."""
    store = _store(tmp_path)

    def disk_full(seq: int, digest: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_write_anchor", disk_full)
    with caplog.at_level(logging.WARNING, logger="agov.store"), store.transaction() as tx:
        tx.audit("COMMITTED")

    assert store.audit_events()[-1].type == "COMMITTED"
    assert "not advanced to event 11" in caplog.text and "No space left" in caplog.text
    assert verify_chain(store).ok


def test_a_write_sqlite_refuses_is_a_store_error_that_says_what_to_check(tmp_path: Path) -> None:
    """Not a raw sqlite3 error ("internal error ... please report this"): a read-only database
    (here SQLite's own query_only switch) names what to check, and a statement that fails inside
    a transaction rolls it back and leaves the connection usable."""
    store = _store(tmp_path)
    conn = store._connect()
    try:
        with (
            pytest.raises(
                StoreError, match=r"^writing to .* failed: attempt to write a readonly database$"
            ) as refused,
            store.transaction() as tx,
        ):
            tx.execute("PRAGMA query_only = ON")  # the file turns read-only under the transaction
            tx.audit("NEVER_WRITTEN")
        assert "must be writable" in refused.value.hint
        conn.execute("PRAGMA query_only = ON")  # and before it: refused as it starts
        with (
            pytest.raises(
                StoreError, match=r"^cannot start a transaction on .*: attempt to write"
            ) as refused,
            store.transaction() as tx,
        ):
            tx.audit("NEVER_WRITTEN")
        assert "must be writable" in refused.value.hint
    finally:
        conn.execute("PRAGMA query_only = OFF")

    with (
        pytest.raises(StoreError, match=r"^writing to .*agov\.db failed: no such table: nowhere$"),
        store.transaction() as tx,
    ):
        tx.audit("ROLLED_BACK")
        tx.execute("INSERT INTO nowhere VALUES (1)")

    assert len(store.audit_events()) == EVENTS
    with store.transaction() as tx:
        tx.audit("WRITTEN")
    assert store.audit_events()[-1].type == "WRITTEN"


@pytest.mark.parametrize("cut", ["nothing", "the tail", "every event"])
def test_a_missing_anchor_is_not_ok_however_the_log_looks(tmp_path: Path, cut: str) -> None:
    """Without the anchor a cut tail, or a log emptied, would verify: the report says the tail
    cannot be vouched for rather than "ok"."""
    store = _store(tmp_path)
    if cut == "the tail":
        _raw(store, "DELETE FROM audit_events WHERE seq > 4")
    elif cut == "every event":
        _raw(store, "DELETE FROM audit_events")
    store.anchor_path.unlink()

    report = verify_chain(store)

    assert not report.ok and report.first_bad_seq is None
    assert "anchor" in report.problem and "is missing" in report.problem
    if cut == "every event":
        return
    # as the message says, the next write starts a new anchor at the log's end (so a cut made
    # before it can no longer be seen: the limit of an anchor kept beside the database)
    with store.transaction() as tx:
        tx.audit("AFTER")
    assert store.read_anchor() is not None
    assert verify_chain(store).ok


@pytest.mark.parametrize(
    ("sql", "field"),
    [
        ("UPDATE audit_events SET payload = '{' WHERE seq = 5", "payload"),
        ("UPDATE audit_events SET payload = '[1]' WHERE seq = 5", "payload"),
        ("UPDATE audit_events SET time = X'ff' WHERE seq = 5", "time"),
        ("UPDATE audit_events SET actor = CAST(X'ff' AS TEXT) WHERE seq = 5", "actor"),
    ],
)
def test_an_event_agov_could_not_have_written_is_named_when_read(
    tmp_path: Path, sql: str, field: str
) -> None:
    """audit export and agent history read every event: a row changed outside agov is a
    StoreError naming its sequence number, not a crash halfway through."""
    store = _store(tmp_path)
    _raw(store, sql)
    with pytest.raises(StoreError, match=rf"^audit event 5 cannot be read: {field} is not what agov writes"):
        store.audit_events()
    assert [e.seq for e in store.audit_events(after_seq=5)] == list(range(6, EVENTS + 1))
    assert verify_chain(store).first_bad_seq == 5


def test_the_same_bytes_stored_as_a_blob_are_the_same_event(tmp_path: Path) -> None:
    """As for proofs: the hash covers the bytes, not SQLite's storage class of them."""
    store = _store(tmp_path)
    _raw(
        store,
        "UPDATE audit_events SET payload = CAST(payload AS BLOB), actor = CAST(actor AS BLOB) WHERE seq = 3",
    )
    assert verify_chain(store).ok
    third = store.audit_events()[2]
    assert (third.payload, third.actor) == ({"i": 2}, "tester")


def test_a_commit_is_on_disk_before_the_anchor_records_it(
    tmp_path: Path, file_syncs: list[tuple[str, str, str]]
) -> None:
    """Under synchronous=NORMAL a power loss could take back commits the anchor already recorded,
    and the store was then refused as rolled back. FULL syncs the log at each commit; the anchor's
    new content is synced before it replaces the old one, so it is never left empty."""
    store = Store(tmp_path / "agov.db")
    assert store.query("PRAGMA synchronous")[0][0] == 2  # FULL
    with store.transaction() as tx:
        tx.audit("TEST_EVENT")
    assert [step for step, *_ in file_syncs] == ["fsync", "replace"], file_syncs
    assert file_syncs[0][1] == file_syncs[1][1], "the file synced is the one renamed over the anchor"
    anchor = store.read_anchor()
    assert anchor is not None and anchor[0] == 1
