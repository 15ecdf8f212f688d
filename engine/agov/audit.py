"""Audit log verification and export (the chain itself is written by the store)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from agov.errors import AgovError
from agov.store import Store
from agov.store.sqlite import AUDIT_ROWS, GENESIS_HASH, audit_hash, audit_row


@dataclass(frozen=True)
class AuditReport:
    ok: bool
    events: int
    first_bad_seq: int | None = None
    problem: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "events": self.events,
            "first_bad_seq": self.first_bad_seq,
            "problem": self.problem,
        }


def verify_chain(store: Store) -> AuditReport:
    """Walk the chain from the first row: sequence numbers, links, hashes, then the anchor.

    Detects an edited row (hash), a deleted or reordered row (sequence gap or broken link) and a
    truncated tail (the anchor names a row that is gone or differs). A missing anchor is not ok:
    the tail cannot be vouched for (``first_bad_seq`` is then None).
    """
    rows = [audit_row(r) for r in store.query(f"{AUDIT_ROWS} ORDER BY seq")]
    prev_hash, expected_seq = GENESIS_HASH, 1
    for row in rows:
        seq = row["seq"]
        if seq != expected_seq:
            return AuditReport(
                False, len(rows), expected_seq, f"sequence {expected_seq} is missing (next is {seq})"
            )
        if row["prev_hash"] != prev_hash:
            return AuditReport(False, len(rows), seq, "link to the previous event is broken")
        try:
            recomputed = audit_hash(
                seq,
                row["time"],
                row["type"],
                row["agent_id"],
                row["actor"],
                row["policy_hash"],
                row["payload"],
                row["prev_hash"],
            )
        except AgovError:  # a value canonical JSON cannot carry: text that is not UTF-8, say
            return AuditReport(
                False, len(rows), seq, "event holds a value agov never writes (not UTF-8 text)"
            )
        if recomputed != row["hash"]:
            return AuditReport(False, len(rows), seq, "event content does not match its hash")
        prev_hash, expected_seq = row["hash"], seq + 1
    anchor = store.read_anchor()
    if anchor is None:
        # every committed event writes it, so only a deletion (or a log never written) leaves
        # none: without it a cut tail, or a log emptied, would verify
        return AuditReport(
            False,
            len(rows),
            None,
            f"the audit anchor {store.anchor_path} is missing, so a cut tail cannot be detected "
            "(the next write starts a new anchor at the log's end; restore the file from a backup "
            "of the workspace to check the tail)",
        )
    anchor_seq, anchor_hash = anchor
    if anchor_seq >= expected_seq:
        return AuditReport(
            False,
            len(rows),
            expected_seq,
            f"log truncated: the anchor records event {anchor_seq}, the log ends at {expected_seq - 1}",
        )
    matching = [r for r in rows if r["seq"] == anchor_seq]
    if not matching or matching[0]["hash"] != anchor_hash:
        return AuditReport(False, len(rows), anchor_seq, "event does not match the anchor")
    return AuditReport(True, len(rows))


def export_lines(store: Store) -> Iterator[str]:
    for event in store.audit_events():
        yield json.dumps(event.as_dict(), sort_keys=True)
