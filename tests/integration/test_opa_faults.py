"""R9: OPA down, slow, broken or lying. Every fault must raise; no call may return normally.

A fault-injecting fake OPA (raw sockets, one thread per connection, 127.0.0.1) plays each
failure; the real ``DecisionClient`` talks to it. No opa binary is needed here.
"""

from __future__ import annotations

import errno
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agov.errors import DecisionError, EngineUnavailableError
from agov.opa import ConnectionConfig, DecisionClient, EvaluatorConfig, ExternalSidecar, require_bool

TIMEOUT_S = 1.0
MAX_RESPONSE = 64 * 1024
PATH = "agov/admission/decision"
REVISION = "rev-1"

GOOD = {
    "decision_id": "d-1",
    "provenance": {"version": "1.22.2", "bundles": {"agov": {"revision": REVISION}}},
    "result": {"allow": True},
}


def _http(status: int, body: bytes, *, reason: str = "X", headers: dict[str, str] | None = None) -> bytes:
    head = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}", "Content-Type: application/json"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _json(status: int, doc: object) -> bytes:
    return _http(status, json.dumps(doc).encode())


def _chunked(body: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 8192]), body[i : i + 8192]) for i in range(0, len(body), 8192)
    )
    return head + chunks + b"0\r\n\r\n"


# A behaviour gets the connection after the request was read; it returns whether to keep it open.
Behaviour = Callable[[socket.socket], bool]


def send(data: bytes, *, keep: bool = True) -> Behaviour:
    def act(conn: socket.socket) -> bool:
        conn.sendall(data)
        return keep

    return act


def sleep_then(seconds: float, data: bytes) -> Behaviour:
    def act(conn: socket.socket) -> bool:
        time.sleep(seconds)
        conn.sendall(data)
        return False

    return act


def drip(data: bytes, every_s: float) -> Behaviour:
    """One byte at a time, each well within the timeout, the whole far beyond it."""

    def act(conn: socket.socket) -> bool:
        for i in range(len(data)):
            conn.sendall(data[i : i + 1])
            time.sleep(every_s)
        return False

    return act


def reset_after(data: bytes) -> Behaviour:
    """Send part of an answer, then abort the connection with a TCP RST."""

    def act(conn: socket.socket) -> bool:
        conn.sendall(data)
        time.sleep(0.05)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return False

    return act


class FakeOPA:
    """A loopback server that answers every request with ``behaviour``."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.requests = 0
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while _read_request(conn):
                    self.requests += 1
                    if not self.behaviour(conn):
                        return
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


def _read_request(conn: socket.socket) -> bool:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return False
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return False
        rest += chunk
    return True


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Case:
    name: str
    behaviour: Behaviour | None  # None: nothing listens
    expected: type[Exception]
    match: str
    url: str | None = None
    expected_revision: str | None = None
    check_allow: bool = True


CASES = [
    Case("refused", None, EngineUnavailableError, "refused the connection"),
    Case("dns", None, EngineUnavailableError, "cannot resolve", url="http://opa.invalid:8181"),
    Case(
        "slow beyond timeout",
        sleep_then(TIMEOUT_S + 1.5, _json(200, GOOD)),
        EngineUnavailableError,
        "did not answer within",
    ),
    Case(
        "drip-fed beyond timeout",
        drip(_json(200, GOOD), 0.2),
        EngineUnavailableError,
        "did not answer within",
    ),
    Case(
        "500",
        send(_json(500, {"code": "internal_error", "message": "boom"})),
        EngineUnavailableError,
        "HTTP 500.*boom",
    ),
    Case("502", send(_http(502, b"<html>bad gateway</html>")), EngineUnavailableError, "HTTP 502"),
    Case("503", send(_http(503, b"")), EngineUnavailableError, "HTTP 503"),
    Case(
        "401",
        send(_json(401, {"code": "unauthorized", "message": "missing token"})),
        EngineUnavailableError,
        "HTTP 401.*authentication",
    ),
    Case(
        "403",
        send(_json(403, {"code": "unauthorized", "message": "denied"})),
        EngineUnavailableError,
        "HTTP 403.*authorization",
    ),
    Case(
        "404", send(_json(404, {"code": "resource_not_found", "message": "nope"})), DecisionError, "HTTP 404"
    ),
    Case(
        "400",
        send(_json(400, {"code": "invalid_parameter", "message": "bad input"})),
        DecisionError,
        "HTTP 400.*bad input",
    ),
    Case(
        "500 policy eval error",
        send(
            _json(
                500,
                {
                    "code": "internal_error",
                    "message": "eval failed",
                    "errors": [{"code": "eval_builtin_error", "message": "x"}],
                },
            )
        ),
        DecisionError,
        "policy evaluation failed",
    ),
    Case("garbage body", send(_http(200, b"<html>not json")), DecisionError, "not JSON"),
    Case(
        "garbage HTTP",
        send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", keep=False),
        EngineUnavailableError,
        "malformed or truncated",
    ),
    Case(
        "empty reply",
        send(b"", keep=False),
        EngineUnavailableError,
        "closed the connection without answering",
    ),
    Case("non-object JSON", send(_json(200, [GOOD])), DecisionError, "not a JSON object"),
    Case("deeply nested JSON", send(_http(200, b"[" * 20000 + b"]" * 20000)), DecisionError, "not JSON"),
    Case(
        "truncated body",
        send(_http(200, json.dumps(GOOD).encode())[:-20], keep=False),
        EngineUnavailableError,
        "malformed or truncated",
    ),
    Case(
        "truncated chunked body",
        send(_chunked(json.dumps(GOOD).encode())[:-12], keep=False),
        EngineUnavailableError,
        "malformed or truncated",
    ),
    Case(
        "reset mid-response",
        reset_after(_http(200, json.dumps(GOOD).encode())[:-30]),
        EngineUnavailableError,
        "Connection reset",
    ),
    Case(
        "200 without result (undefined)",
        send(_json(200, {"provenance": GOOD["provenance"]})),
        DecisionError,
        "undefined decision.*fails closed",
    ),
    Case(
        "200 without provenance",
        send(_json(200, {"result": {"allow": True}})),
        DecisionError,
        "no revision for bundle 'agov'",
    ),
    Case(
        "200 with another bundle's provenance",
        send(_json(200, {**GOOD, "provenance": {"bundles": {"other": {"revision": REVISION}}}})),
        DecisionError,
        "no revision",
    ),
    Case(
        "wrong revision",
        send(_json(200, GOOD)),
        DecisionError,
        "answered by revision 'rev-1', expected 'rev-2'",
        expected_revision="rev-2",
    ),
    Case(
        "non-boolean allow",
        send(_json(200, {**GOOD, "result": {"allow": "true"}})),
        DecisionError,
        "must be a boolean",
    ),
    Case("null allow", send(_json(200, {**GOOD, "result": {}})), DecisionError, "must be a boolean"),
    Case(
        "non-string decision_id", send(_json(200, {**GOOD, "decision_id": 7})), DecisionError, "decision_id"
    ),
    Case("oversized body", send(_http(200, b" " * (MAX_RESPONSE + 1))), DecisionError, "over the .*limit"),
    Case(
        "oversized chunked body",
        send(_chunked(b" " * (MAX_RESPONSE * 2)), keep=False),
        DecisionError,
        "over the .*limit",
    ),
]


@pytest.fixture
def config() -> EvaluatorConfig:
    return EvaluatorConfig(timeout_s=TIMEOUT_S, max_response_bytes=MAX_RESPONSE)


def _decide(client: DecisionClient, case: Case) -> bool:
    """What a caller does: evaluate, then insist on a boolean allow. Returns it (fail-open)."""
    evaluation = client.evaluate(PATH, {"agent": "a"}, expected_revision=case.expected_revision)
    return require_bool(evaluation.result.get("allow"), "admission allow")


def test_r9_fault_table(config: EvaluatorConfig, capsys: pytest.CaptureFixture[str]) -> None:
    fail_open: list[str] = []
    wrong: list[str] = []
    latencies: dict[str, float] = {}
    for case in CASES:
        server = FakeOPA(case.behaviour) if case.behaviour else None
        url = case.url or (server.url if server else f"http://127.0.0.1:{_closed_port()}")
        client = DecisionClient(ConnectionConfig(url=url), config)
        started = time.monotonic()
        try:
            allow = _decide(client, case)
            fail_open.append(f"{case.name}: returned allow={allow!r}")
        except (EngineUnavailableError, DecisionError) as exc:
            if not isinstance(exc, case.expected) or not re.search(case.match, exc.message):
                wrong.append(f"{case.name}: {type(exc).__name__}: {exc.message}")
        finally:
            latencies[case.name] = time.monotonic() - started
            client.close()
            if server:
                server.close()
    slowest = max(latencies, key=latencies.__getitem__)
    with capsys.disabled():
        print(
            f"\nR9 fault table: {len(CASES)} cases, fail-open={len(fail_open)}, "
            f"max latency {latencies[slowest] * 1000:.0f} ms ({slowest}; timeout {TIMEOUT_S * 1000:.0f} ms)"
        )
    assert fail_open == []
    assert wrong == []
    late = {name: round(s, 3) for name, s in latencies.items() if s > TIMEOUT_S + 0.5}
    assert late == {}


# --- the client's own behaviour --------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[Callable[[Behaviour], FakeOPA]]:
    servers: list[FakeOPA] = []

    def make(behaviour: Behaviour) -> FakeOPA:
        servers.append(FakeOPA(behaviour))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_healthy_answer_and_keep_alive_reuse(
    fake: Callable[[Behaviour], FakeOPA], config: EvaluatorConfig
) -> None:
    server = fake(send(_json(200, GOOD)))
    with DecisionClient(ConnectionConfig(url=server.url), config) as client:
        for _ in range(20):
            evaluation = client.evaluate(PATH, {"x": 1}, expected_revision=REVISION)
            assert (evaluation.result, evaluation.revision, evaluation.decision_id) == (
                {"allow": True},
                REVISION,
                "d-1",
            )
    assert server.requests == 20
    assert server.connections == 1


GOOD_BODY = json.dumps(GOOD).encode()


@pytest.mark.parametrize(
    ("name", "answer", "reused"),
    [
        ("interim 100 Continue first", b"HTTP/1.1 100 Continue\r\n\r\n" + _json(200, GOOD), True),
        ("chunked with trailers", _chunked(GOOD_BODY)[:-2] + b"X-Trailer: 1\r\n\r\n", True),
        ("chunk extensions", _chunked(GOOD_BODY).replace(b"\r\n{", b";ext=1\r\n{", 1), True),
        ("lower-case header names", _json(200, GOOD).replace(b"Content-Length", b"content-length"), True),
        (
            "repeated equal Content-Length",
            _http(200, GOOD_BODY, headers={"Content-Length": str(len(GOOD_BODY))}),
            True,
        ),
        ("Connection: close", _http(200, GOOD_BODY, headers={"Connection": "close"}), False),
        ("HTTP/1.0", _json(200, GOOD).replace(b"HTTP/1.1", b"HTTP/1.0", 1), False),
        ("bytes beyond the answer", _json(200, GOOD) + b"HTTP/1.1 200 OK\r\n", False),
        (
            "chunked beside a Content-Length",
            _chunked(GOOD_BODY).replace(b"Transfer-Encoding", b"Content-Length: 5\r\nTransfer-Encoding", 1),
            False,
        ),
    ],
)
def test_answers_that_parse_and_whether_the_connection_is_reused(
    fake: Callable[[Behaviour], FakeOPA], config: EvaluatorConfig, name: str, answer: bytes, reused: bool
) -> None:
    server = fake(send(answer))
    with DecisionClient(ConnectionConfig(url=server.url), config) as client:
        for _ in range(3):
            assert client.evaluate(PATH, {}, expected_revision=REVISION).result == {"allow": True}, name
    assert server.requests == 3
    assert server.connections == (1 if reused else 3), name


@pytest.mark.parametrize(
    ("name", "answer"),
    [
        ("conflicting Content-Length", _http(200, GOOD_BODY, headers={"Content-Length": "3"})),
        ("negative Content-Length", _json(200, GOOD).replace(b"Content-Length: ", b"Content-Length: -", 1)),
        ("folded header line", _json(200, GOOD).replace(b"\r\nContent-Type", b"\r\n Content-Type", 1)),
        ("header line without a colon", _json(200, GOOD).replace(b"Content-Type:", b"Content-Type", 1)),
        (
            "bad chunk size",
            _chunked(GOOD_BODY).replace(b"\r\n{", b"zz\r\n{", 1),
        ),
        ("chunk without CRLF", _chunked(GOOD_BODY).replace(b"}\r\n0", b"}XX0", 1)),
        ("status line without a code", b"HTTP/1.1 OK\r\n\r\n"),
        ("head without an end", b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 70_000),
    ],
)
def test_answers_that_do_not_parse_fail_closed(
    fake: Callable[[Behaviour], FakeOPA], config: EvaluatorConfig, name: str, answer: bytes
) -> None:
    server = fake(send(answer, keep=False))
    with (
        DecisionClient(ConnectionConfig(url=server.url), config) as client,
        pytest.raises(EngineUnavailableError, match="malformed or truncated"),
    ):
        client.evaluate(PATH, {})


def test_bytes_after_a_bodiless_answer_never_answer_the_next_request(
    fake: Callable[[Behaviour], FakeOPA], config: EvaluatorConfig
) -> None:
    # a 204 with a whole allowing answer behind it: that answer belongs to no request of ours
    server = fake(send(b"HTTP/1.1 204 No Content\r\n\r\n" + _json(200, GOOD)))
    with DecisionClient(ConnectionConfig(url=server.url), config) as client:
        for _ in range(3):
            with pytest.raises(DecisionError, match="HTTP 204"):
                client.evaluate(PATH, {})
    assert server.connections == 3


def test_a_stale_pool_is_dropped_and_the_retry_opens_a_fresh_connection(
    fake: Callable[[Behaviour], FakeOPA], config: EvaluatorConfig
) -> None:
    # two connections go idle in the pool, then OPA closes both (as a restart would)
    server = fake(sleep_then(0.3, _json(200, GOOD)))
    with DecisionClient(ConnectionConfig(url=server.url), config) as client:
        barrier = threading.Barrier(2)

        def call() -> None:
            barrier.wait()
            client.evaluate(PATH, {})

        callers = [threading.Thread(target=call) for _ in range(2)]
        for t in callers:
            t.start()
        for t in callers:
            t.join(timeout=10)
        assert server.connections == 2
        time.sleep(0.2)  # both server sides have closed by now
        assert client.evaluate(PATH, {}, expected_revision=REVISION).result == {"allow": True}
    assert server.connections == 3


def test_stale_keep_alive_is_retried_once_on_a_fresh_connection(
    fake: Callable[[Behaviour], FakeOPA], config: EvaluatorConfig
) -> None:
    # answers, then silently drops the connection, as an idle keep-alive timeout does
    server = fake(send(_json(200, GOOD), keep=False))
    with DecisionClient(ConnectionConfig(url=server.url), config) as client:
        assert client.evaluate(PATH, {}).revision == REVISION
        time.sleep(0.1)
        assert client.evaluate(PATH, {}).revision == REVISION
    assert server.requests == 2
    assert server.connections == 2


def test_no_retry_after_a_timeout(fake: Callable[[Behaviour], FakeOPA], config: EvaluatorConfig) -> None:
    server = fake(sleep_then(TIMEOUT_S + 1.0, _json(200, GOOD)))
    with (
        DecisionClient(ConnectionConfig(url=server.url), config) as client,
        pytest.raises(EngineUnavailableError),
    ):
        client.evaluate(PATH, {})
    assert server.requests == 1


def test_a_call_with_its_own_deadline_outlasts_the_configured_one(
    fake: Callable[[Behaviour], FakeOPA], config: EvaluatorConfig
) -> None:
    """A revalidation chunk query gets a longer deadline than one decision; both are hard."""
    server = fake(sleep_then(TIMEOUT_S + 0.5, _json(200, GOOD)))
    with DecisionClient(ConnectionConfig(url=server.url), config) as client:
        started = time.monotonic()
        with pytest.raises(EngineUnavailableError, match=f"did not answer within {TIMEOUT_S:g} s"):
            client.evaluate(PATH, {})
        assert time.monotonic() - started < TIMEOUT_S + 0.4
        assert client.evaluate(PATH, {}, timeout_s=TIMEOUT_S + 2.0).result == {"allow": True}
        started = time.monotonic()
        with pytest.raises(EngineUnavailableError, match=r"did not answer within 0\.2 s"):
            client.evaluate(PATH, {}, timeout_s=0.2)
        assert time.monotonic() - started < 0.6
        for bad in (0.0, -1.0, 301.0):
            with pytest.raises(ValueError, match="timeout_s must be in"):
                client.evaluate(PATH, {}, timeout_s=bad)
    assert server.requests == 3


def test_no_retry_after_response_bytes(fake: Callable[[Behaviour], FakeOPA], config: EvaluatorConfig) -> None:
    server = fake(reset_after(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{"))
    with DecisionClient(ConnectionConfig(url=server.url), config) as client:
        # warm a connection first, so that the failing request runs on a reused one
        for _ in range(2):
            with pytest.raises(EngineUnavailableError):
                client.evaluate(PATH, {})
    assert server.requests == 2


def test_oversized_input_is_refused_before_sending(fake: Callable[[Behaviour], FakeOPA]) -> None:
    server = fake(send(_json(200, GOOD)))
    cfg = EvaluatorConfig(timeout_s=TIMEOUT_S, max_request_bytes=1024)
    with (
        DecisionClient(ConnectionConfig(url=server.url), cfg) as client,
        pytest.raises(DecisionError, match="over the 1024-byte limit"),
    ):
        client.evaluate(PATH, {"blob": "x" * 2000})
    assert server.requests == 0


def test_bearer_token_is_sent(config: EvaluatorConfig) -> None:
    seen: list[bytes] = []

    class Recording(FakeOPA):
        def _serve(self, conn: socket.socket) -> None:
            with conn:
                data = conn.recv(65536)
                seen.append(data)
                conn.sendall(_json(200, GOOD))

    server = Recording(send(b""))
    try:
        with DecisionClient(ConnectionConfig(url=server.url, token="s3cret"), config) as client:
            client.evaluate(PATH, {})
    finally:
        server.close()
    assert b"\r\nAuthorization: Bearer s3cret\r\n" in seen[0]
    assert "s3cret" not in repr(ConnectionConfig(url=server.url, token="s3cret"))


def test_closed_client_fails_closed(fake: Callable[[Behaviour], FakeOPA], config: EvaluatorConfig) -> None:
    server = fake(send(_json(200, GOOD)))
    client = DecisionClient(ConnectionConfig(url=server.url), config)
    client.close()
    with pytest.raises(EngineUnavailableError, match="closed"):
        client.evaluate(PATH, {})


def test_concurrent_callers_share_the_pool(
    fake: Callable[[Behaviour], FakeOPA], config: EvaluatorConfig
) -> None:
    server = fake(send(_json(200, GOOD)))
    results: list[str] = []
    with DecisionClient(ConnectionConfig(url=server.url), config) as client:

        def work() -> None:
            for _ in range(50):
                results.append(client.evaluate(PATH, {}).revision)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert results == [REVISION] * 400
    assert server.connections <= 8


def test_external_sidecar_from_env_requires_a_url() -> None:
    from agov.errors import UsageError

    with pytest.raises(UsageError, match="AGOV_OPA_URL is not set"):
        ExternalSidecar.from_env(environ={})
    with pytest.raises(UsageError, match="TLS options need an https"):
        ExternalSidecar.from_env(environ={"AGOV_OPA_URL": "http://x:1", "AGOV_OPA_CA_FILE": "/ca.pem"})
    sidecar = ExternalSidecar.from_env(environ={"AGOV_OPA_URL": "http://127.0.0.1:1", "AGOV_OPA_TOKEN": "t"})
    with pytest.raises(EngineUnavailableError, match="refused"):
        sidecar.evaluate(PATH, {})


@pytest.mark.parametrize(
    ("url", "socket_path"),
    [
        ("unix:///run/opa/opa.sock", "/run/opa/opa.sock"),
        ("unix:///tmp/a%20b.sock", "/tmp/a b.sock"),  # percent-decoded, as OPA reads --addr
        ("unix://relative/opa.sock", None),  # a host: OPA would bind /opa.sock
        ("unix:opa.sock", None),
        ("unix:///", None),
        ("unix:///tmp/opa.sock?mode=x", None),  # OPA drops the query: another path than written
        ("unix:///tmp/opa.sock#x", None),
    ],
)
def test_an_external_opa_on_a_unix_socket_is_named_as_its_addr_is(url: str, socket_path: str | None) -> None:
    from agov.errors import UsageError

    environ = {"AGOV_OPA_URL": url}
    if socket_path is None:
        with pytest.raises(UsageError, match="is not unix:// and an absolute socket path"):
            ExternalSidecar.from_env(environ=environ)
        return
    with ExternalSidecar.from_env(environ=environ) as sidecar:
        assert sidecar.connection.unix_socket == Path(socket_path)
        assert sidecar.connection.where == f"unix:{socket_path}"
    with pytest.raises(UsageError, match="TLS options do not apply to a Unix socket"):
        ExternalSidecar.from_env(environ={**environ, "AGOV_OPA_CA_FILE": "/ca.pem"})


def test_every_address_of_a_name_shares_the_one_deadline(
    monkeypatch: pytest.MonkeyPatch, config: EvaluatorConfig
) -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so connects hang.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port))
    real_getaddrinfo = socket.getaddrinfo

    def three_addresses(host: str, *args: object, **kwargs: object) -> list[object]:
        if host != "opa.invalid":
            return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))] * 3

    monkeypatch.setattr(socket, "getaddrinfo", three_addresses)
    try:
        with DecisionClient(ConnectionConfig(url=f"http://opa.invalid:{port}"), config) as client:
            started = time.monotonic()
            with pytest.raises(EngineUnavailableError, match="did not answer within"):
                client.evaluate(PATH, {})
            elapsed = time.monotonic() - started
        # socket.create_connection would give each of the three addresses the whole timeout
        assert TIMEOUT_S - 0.05 < elapsed < TIMEOUT_S + 0.5, f"{elapsed:.2f} s for a {TIMEOUT_S} s deadline"
    finally:
        queued.close()
        listener.close()


def test_a_resolver_that_hangs_is_bounded_by_the_deadline_too(
    monkeypatch: pytest.MonkeyPatch, config: EvaluatorConfig
) -> None:
    released = threading.Event()
    real_getaddrinfo = socket.getaddrinfo

    def hanging(host: str, *args: object, **kwargs: object) -> list[object]:
        if host != "opa.invalid":
            return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]
        released.wait(5)  # as a resolver whose servers do not answer
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    try:
        with DecisionClient(ConnectionConfig(url="http://opa.invalid:8181"), config) as client:
            started = time.monotonic()
            with pytest.raises(EngineUnavailableError, match=r"cannot resolve the OPA host .* within 1 s"):
                client.evaluate(PATH, {})
            elapsed = time.monotonic() - started
            for _ in range(20):  # more requests wait for the same lookup, not one thread each
                with pytest.raises(EngineUnavailableError, match="cannot resolve"):
                    client.evaluate(PATH, {}, timeout_s=0.05)
        assert TIMEOUT_S - 0.05 < elapsed < TIMEOUT_S + 0.5, f"{elapsed:.2f} s for a {TIMEOUT_S} s deadline"
        assert [t.name for t in threading.enumerate()].count("agov-resolve") == 1
    finally:
        released.set()


def test_an_address_family_this_host_cannot_use_passes_on_to_the_next(
    monkeypatch: pytest.MonkeyPatch, fake: Callable[[Behaviour], FakeOPA], config: EvaluatorConfig
) -> None:
    server = fake(send(_json(200, GOOD)))
    port = int(server.url.rsplit(":", 1)[1])
    real_getaddrinfo, real_socket = socket.getaddrinfo, socket.socket

    def ipv6_first(host: str, *args: object, **kwargs: object) -> list[object]:
        if host != "opa.invalid":
            return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    def no_ipv6(family: int = socket.AF_INET, *args: object, **kwargs: object) -> socket.socket:
        if family == socket.AF_INET6:  # as on a kernel booted with ipv6.disable=1
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real_socket(family, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", ipv6_first)
    monkeypatch.setattr(socket, "socket", no_ipv6)
    with DecisionClient(ConnectionConfig(url=f"http://opa.invalid:{port}"), config) as client:
        assert require_bool(client.evaluate(PATH, {}).result.get("allow"), "allow") is True
    assert server.requests == 1


def test_a_unix_socket_with_a_full_backlog_is_waited_for_until_the_deadline(tmp_path: Path) -> None:
    """A Unix socket whose listener's backlog is full refuses a connect at once (EAGAIN), where
    TCP would wait: the client asks again until its deadline, then fails closed, as for TCP."""
    path = tmp_path / "opa.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    queued: list[socket.socket] = []
    full = False
    try:
        while len(queued) < 64 and not full:  # fill the backlog (the listener never accepts)
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.setblocking(False)
            try:
                probe.connect(str(path))
            except BlockingIOError:
                probe.close()
                full = True
            else:
                queued.append(probe)
        assert full, "setup: the backlog never filled"
        client = DecisionClient(
            ConnectionConfig(url="http://localhost", unix_socket=path), EvaluatorConfig(timeout_s=0.5)
        )
        started = time.monotonic()
        with pytest.raises(
            EngineUnavailableError, match=r"OPA at unix:.*opa\.sock did not answer within 0\.5 s"
        ):
            client.evaluate("agov/test/decision", {"x": 1})
        assert 0.45 <= time.monotonic() - started < 2.0
    finally:
        for sock in queued:
            sock.close()
        listener.close()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"url": "http://localhost", "socket_owner_pid": 1}, "socket_owner_pid needs unix_socket"),
        (
            {"url": "http://localhost", "unix_socket": Path("/run/opa.sock"), "ca_file": Path("/ca.pem")},
            "TLS options do not apply to a Unix socket",
        ),
    ],
)
def test_unix_socket_settings_that_cannot_hold_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConnectionConfig(**fields)
