"""SQLite store in WAL mode: agents, versions, proofs, policy versions, runs, keys, audit.

Every state change runs in one ``BEGIN IMMEDIATE`` transaction together with its audit event
(:meth:`Store.transaction`). The audit log is hash-chained: each row stores the previous row's
hash, so an edit, deletion, reordering or truncation shows in :meth:`Store.verify_audit`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from agov.errors import StoreError
from agov.hashing import canonical_json, sha256_hex

_log = logging.getLogger("agov.store")

SCHEMA_VERSION = 4
GENESIS_HASH = "0" * 64

# Each entry migrates from version i to i + 1; the list only ever grows.
_MIGRATIONS: list[str] = [
    """
    CREATE TABLE agents (
        id TEXT PRIMARY KEY,
        workspace TEXT NOT NULL,
        name TEXT NOT NULL,
        type TEXT NOT NULL,
        role_class TEXT NOT NULL,
        status TEXT NOT NULL,
        current_version INTEGER NOT NULL,
        sandbox_expires_at TEXT,
        reasons TEXT NOT NULL DEFAULT '[]',
        row_version INTEGER NOT NULL DEFAULT 1,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX agents_status ON agents(status, id);
    CREATE TABLE agent_versions (
        agent_id TEXT NOT NULL REFERENCES agents(id),
        version INTEGER NOT NULL,
        spec TEXT NOT NULL,
        spec_hash TEXT NOT NULL,
        creation_mode TEXT NOT NULL,
        source TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at TEXT NOT NULL,
        notes TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (agent_id, version)
    );
    CREATE TABLE agent_proofs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        agent_id TEXT NOT NULL REFERENCES agents(id),
        version INTEGER NOT NULL,
        policy_hash TEXT NOT NULL,
        spec_hash TEXT NOT NULL,
        envelope BLOB NOT NULL,
        keyid TEXT NOT NULL,
        governance_status TEXT NOT NULL,
        issued_at TEXT NOT NULL,
        expires_at TEXT,
        superseded_at TEXT
    );
    CREATE INDEX agent_proofs_current ON agent_proofs(agent_id, superseded_at);
    CREATE UNIQUE INDEX agent_proofs_one_current ON agent_proofs(agent_id) WHERE superseded_at IS NULL;
    CREATE TABLE policy_versions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        hash TEXT NOT NULL UNIQUE,
        bundle_path TEXT NOT NULL,
        actor TEXT NOT NULL,
        reason TEXT NOT NULL,
        created_at TEXT NOT NULL,
        active INTEGER NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX policy_versions_one_active ON policy_versions(active) WHERE active = 1;
    CREATE TABLE revalidation_runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        policy_hash TEXT NOT NULL,
        previous_hash TEXT,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        cursor TEXT NOT NULL DEFAULT '',
        total INTEGER NOT NULL DEFAULT 0,
        valid INTEGER NOT NULL DEFAULT 0,
        restricted INTEGER NOT NULL DEFAULT 0,
        invalidated INTEGER NOT NULL DEFAULT 0,
        newly_invalidated INTEGER NOT NULL DEFAULT 0,
        restored INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE signing_keys (
        keyid TEXT PRIMARY KEY,
        alg TEXT NOT NULL,
        created_at TEXT NOT NULL,
        not_before TEXT,
        not_after TEXT,
        revoked_at TEXT,
        revoke_reason TEXT,
        active INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE audit_events (
        seq INTEGER PRIMARY KEY,
        time TEXT NOT NULL,
        type TEXT NOT NULL,
        agent_id TEXT,
        actor TEXT,
        policy_hash TEXT,
        payload TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    """,
    # the org limits (agov.yaml) a run judges with: a change of them re-judges every agent
    """
    ALTER TABLE revalidation_runs ADD COLUMN org_digest TEXT;
    """,
    # agov's HMAC over each proof row (agov.proofs.ProofSeal); rows from before have none, and
    # revalidation verifies those in full before it renews them
    """
    ALTER TABLE agent_proofs ADD COLUMN seal TEXT;
    """,
    # signing_keys.active now marks every key that takes its turn as signer (staged keys too):
    # the version makes an agov from before, which reads it as "the one signer", refuse the store
    """
    CREATE INDEX IF NOT EXISTS signing_keys_active ON signing_keys(active);
    """,
]


_RESTORE_HINT = (
    "the file is damaged: restore agov.db (with its -wal file and agov.db.audit-anchor) from a backup"
)


def _hint_for(exc: sqlite3.Error) -> str:
    text = str(exc).lower()
    if "not a database" in text or "malformed" in text:
        return _RESTORE_HINT
    if "readonly" in text or "read-only" in text:
        return "agov.db, the directory it is in, and its -wal and -shm files must be writable by this user"
    if "full" in text or "disk i/o" in text:
        return "free some disk space where agov.db lives, then retry"
    if "locked" in text or "busy" in text:
        return "another agov process held the write lock for too long; retry"
    return ""


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime | None) -> str | None:
    """Timestamps are stored as ISO 8601 UTC with microseconds, so they sort as text."""
    if ts is None:
        return None
    if type(ts) is datetime and ts.tzinfo is UTC:  # agov's own clock: cached, see _iso_utc
        return _iso_utc(ts)
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


@functools.lru_cache(maxsize=1024)
def _iso_utc(ts: datetime) -> str:
    """A revalidation chunk writes one time, and agents often share an expiry. Only plain UTC
    datetimes are cached: two times in a zone with a DST fold compare (and hash) equal an hour
    apart, and a subclass compares equal to a plain datetime."""
    return ts.isoformat(timespec="microseconds")


def parse_iso(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def blob_text(value: Any) -> Any:
    """A text column read as ``CAST(... AS BLOB)``, as text again. sqlite3 fails a whole fetch on
    text that is not UTF-8 (written outside agov); read this way, such bytes become surrogates,
    which match nothing agov wrote, and fail only that row's checks."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


@dataclass(frozen=True)
class AuditEvent:
    """One audit row; ``hash`` covers every other field, ``prev_hash`` links the chain."""

    seq: int
    time: str
    type: str
    agent_id: str | None
    actor: str | None
    policy_hash: str | None
    payload: dict[str, Any]
    prev_hash: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "type": self.type,
            "agent_id": self.agent_id,
            "actor": self.actor,
            "policy_hash": self.policy_hash,
            "payload": self.payload,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


def audit_hash(
    seq: int,
    time: str,
    type_: str,
    agent_id: str | None,
    actor: str | None,
    policy_hash: str | None,
    payload: str,
    prev_hash: str,
) -> str:
    body = {
        "seq": seq,
        "time": time,
        "type": type_,
        "agent_id": agent_id,
        "actor": actor,
        "policy_hash": policy_hash,
        "payload": payload,
        "prev_hash": prev_hash,
    }
    return sha256_hex(canonical_json(body))


_TEXT_FIELDS = ("time", "type", "prev_hash", "hash")
_OPTIONAL_TEXT_FIELDS = ("agent_id", "actor", "policy_hash")
_AUDIT_TEXT = (*_TEXT_FIELDS, *_OPTIONAL_TEXT_FIELDS, "payload")
# Text read as BLOB (see blob_text): a row whose text is not UTF-8 fails that row, not the fetch,
# and the same bytes stored as a BLOB read as the same event.
AUDIT_ROWS = (
    "SELECT seq, "
    + ", ".join(f"CAST({column} AS BLOB) AS {column}" for column in _AUDIT_TEXT)
    + " FROM audit_events"
)


def audit_row(row: Any) -> dict[str, Any]:
    """A row of :data:`AUDIT_ROWS` with its text columns as text (bytes that are not UTF-8 as
    surrogates, which canonical JSON refuses)."""
    return {"seq": row["seq"], **{column: blob_text(row[column]) for column in _AUDIT_TEXT}}


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and not any("\udc80" <= c <= "\udcff" for c in value)


def _audit_event(row: dict[str, Any]) -> AuditEvent:
    """One audit row (from :func:`audit_row`) as agov wrote it.

    Raises:
        StoreError: a value is not of the type agov writes there, or not UTF-8 (the row was
            changed outside agov): named by its sequence number, never a crash halfway through
            an export.
    """
    seq = row["seq"]
    wrong = [f for f in _TEXT_FIELDS if not _is_text(row[f])]
    wrong += [f for f in _OPTIONAL_TEXT_FIELDS if row[f] is not None and not _is_text(row[f])]
    payload: Any = None
    if _is_text(row["payload"]):
        with contextlib.suppress(ValueError):
            payload = json.loads(row["payload"])
    if not isinstance(payload, dict):
        wrong.append("payload")
    if wrong:
        raise StoreError(
            f"audit event {seq} cannot be read: {', '.join(wrong)} is not what agov writes there "
            "(agov.db was changed outside agov)",
            hint="run `agov audit verify`, and restore agov.db from a backup",
        )
    return AuditEvent(
        seq=seq,
        time=row["time"],
        type=row["type"],
        agent_id=row["agent_id"],
        actor=row["actor"],
        policy_hash=row["policy_hash"],
        payload=payload,
        prev_hash=row["prev_hash"],
        hash=row["hash"],
    )


class Tx:
    """A transaction handle: SQL plus the audit append that must go with every change."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.last_audit: tuple[int, str] | None = None

    def execute(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> sqlite3.Cursor:
        return self.conn.executemany(sql, rows)

    def audit(
        self,
        type_: str,
        *,
        agent_id: str | None = None,
        actor: str | None = None,
        policy_hash: str | None = None,
        payload: dict[str, Any] | None = None,
        now: datetime | None = None,
    ) -> int:
        """Append a chained audit event inside this transaction and return its sequence number."""
        row = self.conn.execute("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS_HASH)
        time = iso(now or utcnow())
        assert time is not None
        body = json.dumps(payload or {}, sort_keys=True, separators=(",", ":"))
        type_ = str(type_.value) if isinstance(type_, Enum) else type_  # a plain str hashes on the fast path
        digest = audit_hash(seq, time, type_, agent_id, actor, policy_hash, body, prev)
        self.conn.execute(
            "INSERT INTO audit_events (seq, time, type, agent_id, actor, policy_hash, payload, prev_hash, hash)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, time, type_, agent_id, actor, policy_hash, body, prev, digest),
        )
        self.last_audit = (int(seq), digest)
        return int(seq)


_CONNECTION_IDS = itertools.count(1)


def _unwritable(db: Path) -> str | None:
    """Why agov cannot write beside ``db``, if that is why the store did not open: SQLite's WAL
    mode writes agov.db-wal and agov.db-shm there, even for a command that only reads. None when
    it cannot tell (this only words a hint)."""
    directory = db.parent
    why = "agov writes agov.db and its -wal and -shm files there, even to read"
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return f"{directory} is on a read-only file system: {why}; mount it read-write"
        if not os.access(directory, os.W_OK):
            return f"this user may not write in {directory}: {why}"
        if os.path.exists(db) and not os.access(db, os.R_OK | os.W_OK):
            return f"this user may not read and write {db}"
    except OSError:
        return None
    return None


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


class Store:
    """The SQLite store of one workspace. One connection per thread; WAL; foreign keys on."""

    def __init__(self, path: Path, *, busy_timeout_ms: int = 10_000, check_anchor: bool = True) -> None:
        """``check_anchor``: refuse a store whose audit log lacks the event its anchor records
        (emptied, replaced, rolled back to an older copy), whose agents and proofs would then be
        read as if nothing was lost. Off only to verify or export that log.

        Raises:
            StoreError: the file cannot be opened or migrated, or (``check_anchor``) it lost what
                the anchor records.
        """
        self.path = path
        # The newest audit (seq, hash) is also kept beside the database, so that cutting rows off
        # the end of the chain (which leaves a valid shorter chain) is still detected.
        self.anchor_path = path.with_name(path.name + ".audit-anchor")
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        anchor = None
        with contextlib.suppress(
            StoreError
        ):  # unreadable: every write refuses it, and `agov audit verify` says why
            anchor = self.read_anchor()
        # an empty or missing file where the log was (for audit verify too, whose evidence it is):
        # refused before SQLite writes a header to it
        if self.anchor_path.exists() and not _size(path):
            raise self._lost(anchor, None)
        anchored = check_anchor and anchor is not None
        if anchored and self.schema_version() == 0:
            raise self._lost(anchor, None)
        self.migrate()
        if anchored:
            self._require_anchored(self._connect(), anchor)

    # -- connections -------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
                conn.execute("PRAGMA journal_mode = WAL")
                # FULL: a commit is on disk before agov reports it, and before the audit anchor
                # moves past it. Under NORMAL a power loss could take the last commits back while
                # the anchor kept them: the store was then refused as rolled back.
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA foreign_keys = ON")
            except sqlite3.Error as exc:
                raise StoreError(
                    f"cannot open the store {self.path}: {exc}",
                    hint=_hint_for(exc)
                    or _unwritable(Path(self.path))
                    or "check the path and its permissions",
                ) from exc
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
            self._local.conn_id = next(_CONNECTION_IDS)
        return conn

    def close(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def transaction(self, *, lock_wait_s: float | None = None) -> Iterator[Tx]:
        """One ``BEGIN IMMEDIATE`` transaction; commits on success, rolls back on any exception.
        ``lock_wait_s``: how long to wait for the write lock, when shorter than the busy timeout
        suits the caller (a decision with a deadline).

        Raises:
            StoreError: SQLite failed (locked past the busy timeout, disk full, corrupt file).
        """
        conn = self._connect()
        try:
            if lock_wait_s is None:
                conn.execute("BEGIN IMMEDIATE")
            else:
                wait_ms = min(max(0, int(lock_wait_s * 1000)), int(self._busy_timeout_ms))
                conn.execute(f"PRAGMA busy_timeout = {wait_ms}")
                try:
                    conn.execute("BEGIN IMMEDIATE")
                finally:
                    try:
                        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
                    except BaseException:
                        if conn.in_transaction:  # never leave the write lock held by a failed start
                            conn.execute("ROLLBACK")
                        self.close()  # nor the short wait: the next call connects afresh
                        raise
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot start a transaction on {self.path}: {exc}", hint=_hint_for(exc)
            ) from exc
        tx = Tx(conn)
        try:
            yield tx
            if tx.last_audit is not None:
                self._require_anchored(conn, self.read_anchor())  # refuse now, while nothing is committed
        except sqlite3.Error as exc:  # a read-only file, a full disk: say so, not "internal error"
            with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                conn.execute("ROLLBACK")
            raise StoreError(f"writing to {self.path} failed: {exc}", hint=_hint_for(exc)) from exc
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK")
            raise StoreError(f"commit failed on {self.path}: {exc}") from exc
        if tx.last_audit is not None:
            # Committed: whatever happens to the anchor now, the caller must hear that it did.
            # An anchor left behind the log still detects every truncation below it.
            try:
                self._write_anchor(*tx.last_audit)
            except (OSError, StoreError) as exc:
                _log.warning(
                    "audit anchor %s not advanced to event %d: %s", self.anchor_path, tx.last_audit[0], exc
                )

    def _require_anchored(self, conn: sqlite3.Connection, anchor: tuple[int, str] | None) -> None:
        """The audit log still holds the event ``anchor`` (as read from the anchor file, None when
        there is none) records, with its hash.

        Otherwise the store was replaced or rolled back (an emptied file, a lost -wal file, an
        older copy restored): writing on would soon move the anchor past the loss, and `agov
        audit verify` would then find nothing wrong.

        Raises:
            StoreError: the log does not hold that event.
        """
        if anchor is None:
            return
        seq, digest = anchor
        row = conn.execute("SELECT hash FROM audit_events WHERE seq = ?", (seq,)).fetchone()
        if row is None or row[0] != digest:
            raise self._lost(anchor, row)

    def _lost(self, anchor: tuple[int, str] | None, row: sqlite3.Row | None) -> StoreError:
        seq = anchor[0] if anchor else "?"  # "?": an anchor file that cannot be read
        held = "does not hold" if row is None else "holds another"
        return StoreError(
            f"the audit log in {self.path} {held} event {seq}, which {self.anchor_path.name} records:"
            " the store was replaced or rolled back since (or lost its last commits to a power loss),"
            " so agov neither reads nor writes it",
            hint="restore agov.db (with its -wal file) from a backup, or move the anchor aside to accept"
            " the loss; `agov audit verify` names the first bad event of whatever log is left",
        )

    def _write_anchor(self, seq: int, digest: str) -> None:
        tmp = self.anchor_path.with_name(self.anchor_path.name + f".{os.getpid()}.{threading.get_ident()}")
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(json.dumps({"seq": seq, "hash": digest}))
            out.flush()
            # on disk before the rename: a power loss may leave the old anchor (behind the log,
            # which is accepted), never an empty one (unreadable: the store would be refused)
            os.fsync(out.fileno())
        current = self.read_anchor()
        # Concurrent writers: never move the anchor backwards.
        if current is None or current[0] <= seq:
            os.replace(tmp, self.anchor_path)
        else:
            tmp.unlink(missing_ok=True)

    def read_anchor(self) -> tuple[int, str] | None:
        try:
            raw = json.loads(self.anchor_path.read_text())
            return int(raw["seq"]), str(raw["hash"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(
                f"audit anchor {self.anchor_path} is unreadable: {exc}",
                hint="it records the audit log's last event, and nothing is written while it cannot be"
                " read: restore it from a backup, or move it aside (`agov audit verify` then checks the"
                " chain of the log, but can no longer tell whether its tail was cut off)",
            ) from exc

    def query(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        try:
            return self._connect().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"query failed on {self.path}: {exc}") from exc

    def query_one(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> sqlite3.Row | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def data_version(self) -> tuple[int, int, int]:
        """A value that changes whenever anything commits to the database, as this thread sees it.

        ``PRAGMA data_version`` moves when another connection or process commits (an edit with
        the sqlite3 shell included); ``total_changes`` when this thread's own connection writes;
        the connection's id when the thread reconnects (after ``close()``), since both counters
        start afresh. Reads made under an unchanged value are still current.

        Raises:
            StoreError: SQLite failed.
        """
        conn = self._connect()
        try:
            version = int(conn.execute("PRAGMA data_version").fetchone()[0])
            return self._local.conn_id, version, conn.total_changes
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the data version of {self.path}: {exc}") from exc

    # -- schema ------------------------------------------------------------------------------

    def schema_version(self) -> int:
        return int(self._connect().execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        """Bring the schema to ``SCHEMA_VERSION``; refuses a database from a newer agov.

        Raises:
            StoreError: the file is newer than this agov, or a migration failed.
        """
        conn = self._connect()
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {current}, newer than this agov ({SCHEMA_VERSION})",
                hint="upgrade agov",
            )
        for version in range(current, SCHEMA_VERSION):
            try:
                conn.execute("BEGIN IMMEDIATE")
                for statement in _MIGRATIONS[version].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version + 1}")
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK")
                raise StoreError(f"migration {version} -> {version + 1} failed: {exc}") from exc

    # -- audit -------------------------------------------------------------------------------

    def audit_events(
        self, *, after_seq: int = 0, agent_id: str | None = None, types: Sequence[str] = ()
    ) -> list[AuditEvent]:
        """The audit events after ``after_seq``, in order: of one agent, of some ``types``, or all.

        Raises:
            StoreError: a row is not as agov writes it (named by its sequence number).
        """
        where: list[str] = ["seq > ?"]
        params: list[Any] = [after_seq]
        if agent_id is not None:
            where.append("agent_id = ?")
            params.append(agent_id)
        if types:
            where.append(f"type IN ({', '.join('?' * len(types))})")
            params.extend(types)
        rows = self.query(f"{AUDIT_ROWS} WHERE {' AND '.join(where)} ORDER BY seq", tuple(params))
        return [_audit_event(audit_row(r)) for r in rows]

    def record_rejection(self, type_: str, **fields: Any) -> None:
        """Record a rejected request: the one row a rejected operation may add."""
        with self.transaction() as tx:
            tx.audit(type_, **fields)

    def integrity_check(self) -> str:
        return str(self._connect().execute("PRAGMA integrity_check").fetchone()[0])


class ReadMemo:
    """Store reads kept until anything commits to the store (see :meth:`Store.data_version`).

    Per thread, as SQLite connections are; bounded. For hot read paths such as admission, which
    reads the same agent, proof, key and policy rows at every start (and writes only to renew a
    proof a revalidation run has not reached yet, which empties the memo as any commit does).
    """

    def __init__(self, store: Store, max_entries: int = 10_000) -> None:
        self._store = store
        self._max = max_entries
        self._local = threading.local()

    def view(self) -> dict[Any, Any]:
        """The reads valid now: empty after any commit since the last call on this thread.

        Raises:
            StoreError: SQLite failed.
        """
        version = self._store.data_version()
        local = self._local
        if getattr(local, "version", None) != version:
            local.version, local.reads = version, {}
        reads: dict[Any, Any] = local.reads
        if len(reads) >= self._max:
            reads.clear()
        return reads
