"""`agov audit verify` and `agov audit export`: the hash-chained log, and tampering found."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from e2e_support import AGOV, HEX64, agov, base_env, copy_ws, ok, parallel, query, sql

pytestmark = pytest.mark.acceptance


@pytest.fixture(scope="module")
def ws(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = copy_ws(pristine, tmp_path_factory.mktemp("audit") / "ws")
    ok("agent", "create", "--template", "ideation-partner", "--id", "idea-1", home=home)
    ok("agent", "create", "--name", "Second One", home=home)
    duplicate = agov("agent", "create", "--template", "ideation-partner", "--id", "idea-1", home=home)
    assert duplicate.code == 2  # a REQUEST_REJECTED event too
    return home


def rows(home: Path) -> int:
    ((count,),) = query(home, "SELECT COUNT(*) FROM audit_events")
    return int(count)


def test_verify_intact_log(ws: Path) -> None:
    result = agov("audit", "verify", home=ws)
    assert result.code == 0, str(result)
    assert result.json == {"ok": True, "events": rows(ws), "first_bad_seq": None, "problem": ""}


def test_export_prints_one_json_line_per_event_chained(ws: Path) -> None:
    result = agov("audit", "export", home=ws, as_json=False)
    assert result.code == 0, str(result)
    lines = result.out.splitlines()
    assert len(lines) == rows(ws) >= 5
    events = [json.loads(line) for line in lines]
    previous = "0" * 64
    for seq, event in enumerate(events, start=1):
        assert {"seq", "type", "hash", "prev_hash"} <= set(event)
        assert event["seq"] == seq
        assert re.fullmatch(HEX64, event["hash"])
        assert event["prev_hash"] == previous
        previous = event["hash"]
    types = [e["type"] for e in events]
    assert types[:4] == ["KEY_GENERATED", "POLICY_BUILT", "POLICY_HOTRELOAD", "WORKSPACE_INIT"]
    assert types.count("AGENT_CREATED") == 2
    assert "REQUEST_REJECTED" in types
    # the same events as the store holds, in order
    assert [(e["seq"], e["hash"]) for e in events] == query(
        ws, "SELECT seq, hash FROM audit_events ORDER BY seq"
    )


TAMPERS: dict[str, tuple[Callable[[Path], object], Callable[[Path], int]]] = {
    # name: (tamper, expected first_bad_seq)
    "edit-payload": (
        lambda home: sql(home, 'UPDATE audit_events SET payload = \'{"mode":"forged"}\' WHERE seq = 4'),
        lambda home: 4,
    ),
    "edit-type": (
        lambda home: sql(home, "UPDATE audit_events SET type = 'AGENT_UPDATED' WHERE seq = 5"),
        lambda home: 5,
    ),
    "delete-middle": (lambda home: sql(home, "DELETE FROM audit_events WHERE seq = 3"), lambda home: 3),
    "truncate-tail": (
        lambda home: sql(home, "DELETE FROM audit_events WHERE seq = (SELECT MAX(seq) FROM audit_events)"),
        lambda home: rows(home) + 1,
    ),
}


@pytest.fixture(scope="module")
def tampered(
    ws: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[int, dict[str, object], int]]:
    root = tmp_path_factory.mktemp("audit-tamper")

    def run(name: str) -> tuple[int, dict[str, object], int]:
        home = copy_ws(ws, root / name)
        tamper, expected = TAMPERS[name]
        tamper(home)
        result = agov("audit", "verify", home=home)
        return result.code, result.json, expected(home)

    names = list(TAMPERS)
    return dict(zip(names, parallel(run, names), strict=True))


@pytest.mark.parametrize("name", list(TAMPERS))
def test_verify_finds_tampering(tampered: dict[str, tuple[int, dict[str, object], int]], name: str) -> None:
    code, report, first_bad = tampered[name]
    assert code == 1
    assert report["ok"] is False
    assert report["first_bad_seq"] == first_bad
    assert report["problem"]


def test_export_to_a_reader_that_went_away_stops_quietly(ws: Path) -> None:
    """`agov audit export | head -1`: the pipe closes early. That is no internal error (it was
    exit 3 with a traceback-like message): agov stops as a process killed by SIGPIPE would."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line is written
    try:
        proc = subprocess.run(
            [*AGOV, "audit", "export", "--home", str(ws)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=base_env(),
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 128 + 13
    assert proc.stderr == b""
