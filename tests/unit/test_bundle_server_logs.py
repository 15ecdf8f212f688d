"""The decision-log sink of the managed sidecar's bundle server: uploads are kept as received and
parsed only when read. Parsing holds the GIL for milliseconds per upload, which every decision
agov made meanwhile waited for, and in the managed sidecar nothing reads them but tests and a
person debugging."""

from __future__ import annotations

import gzip
import http.client
import json
from typing import Any
from urllib.parse import urlsplit

import pytest

from agov.opa import bundle_server
from agov.opa.bundle_server import BundleServer, BundleServerConfig


def _post(server: BundleServer, route: str, body: bytes) -> int:
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=10)
    try:
        conn.request(
            "POST",
            route,
            body=gzip.compress(body),
            headers={"Authorization": f"Bearer {server.token}", "Content-Encoding": "gzip"},
        )
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _events(*ids: str) -> bytes:
    return json.dumps(
        [{"decision_id": i, "path": "agov/admission/decision", "result": {"allow": True}} for i in ids]
    ).encode()


def test_uploads_are_parsed_when_read_not_when_received(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[bytes] = []
    real = bundle_server._events

    def counting(body: bytes, *args: Any) -> list[dict[str, Any]]:
        parsed.append(body)
        return real(body, *args)

    monkeypatch.setattr(bundle_server, "_events", counting)
    with BundleServer() as server:
        assert _post(server, "/logs", _events("a", "b")) == 200
        assert _post(server, "/logs", _events("c")) == 200
        assert parsed == []
        assert [e["decision_id"] for e in server.decision_logs()] == ["a", "b", "c"]
        assert len(parsed) == 2
        assert [e["decision_id"] for e in server.decision_logs()] == ["a", "b", "c"]
        assert len(parsed) == 2, "each upload is parsed once"


def test_what_is_not_a_list_of_events_is_dropped_when_read() -> None:
    with BundleServer() as server:
        for body in (
            b"not json",
            b"\xff\xfe",
            b'{"an": "object"}',
            b'[1, "two", {"decision_id": "kept"}]',
            b"[]",
        ):
            assert _post(server, "/logs", body) == 200
        assert [e.get("decision_id") for e in server.decision_logs()] == ["kept"]


def test_events_are_read_exactly() -> None:
    """orjson would read an integer over 64 bits as a float."""
    with BundleServer() as server:
        assert (
            _post(
                server, "/logs", b'[{"decision_id": "big", "input": {"n": 123456789012345678901234567890}}]'
            )
            == 200
        )
        assert server.decision_logs() == [
            {"decision_id": "big", "input": {"n": 123456789012345678901234567890}}
        ]


def test_unread_uploads_are_kept_gzipped_within_their_byte_limit_oldest_dropped_first() -> None:
    bodies = [_events(f"{i:040d}") for i in range(5)]
    budget = len(gzip.compress(bodies[3])) + len(gzip.compress(bodies[4]))
    with BundleServer(BundleServerConfig(unread_log_bytes=budget)) as server:
        for body in bodies:
            assert _post(server, "/logs", body) == 200
        assert server.log_upload_sizes() == [len(gzip.compress(b)) for b in bodies]
        assert [e["decision_id"] for e in server.decision_logs()] == [f"{i:040d}" for i in (3, 4)]


def test_an_upload_over_the_size_limit_once_decompressed_is_dropped_when_read() -> None:
    bomb = b"[" + b" " * 4096 + b"]"  # gzip shrinks it to a few dozen bytes
    with BundleServer(BundleServerConfig(max_report_bytes=1024)) as server:
        assert _post(server, "/logs", bomb) == 200
        assert _post(server, "/logs", _events("small")) == 200
        assert [e["decision_id"] for e in server.decision_logs()] == ["small"]


def test_kept_events_are_capped_and_large_inputs_slimmed() -> None:
    with BundleServer(BundleServerConfig(kept_log_events=3)) as server:
        big = [{"decision_id": "big", "input": {"agents": ["x" * 20_000]}}]
        assert _post(server, "/logs", _events("a", "b", "c")) == 200
        assert _post(server, "/logs", json.dumps(big).encode()) == 200
        logs = server.decision_logs()
    assert [e["decision_id"] for e in logs] == ["b", "c", "big"]
    assert logs[-1]["input"] == {"omitted_bytes": len(json.dumps(big[0]["input"], separators=(",", ":")))}


def test_status_reports_are_still_checked_on_arrival() -> None:
    with BundleServer() as server:
        assert _post(server, "/status", b"[]") == 400
        assert _post(server, "/status", b"not json") == 400
        assert server.last_status() is None
        assert _post(server, "/status", b'{"bundles": {}}') == 200
        assert server.last_status() == {"bundles": {}}
