"""OPA's REST data API over a small HTTP/1.1 client: keep-alive pool, hard deadlines, fail-closed
parsing (malformed answers raise ``http.client``'s exceptions, mapped below).

Every fault raises; nothing here ever returns a default decision:

==========================================  ==========================================
fault                                       error
==========================================  ==========================================
refused, reset, DNS, TLS handshake           ``EngineUnavailableError``
deadline passed (connect, send, wait, read)  ``EngineUnavailableError``
malformed or truncated HTTP response         ``EngineUnavailableError``
5xx (not a policy evaluation error)          ``EngineUnavailableError``
401 / 403                                    ``EngineUnavailableError`` (auth)
500 with ``eval_*`` errors (policy bug)      ``DecisionError``
any other non-200                            ``DecisionError``
body too large, not JSON, not an object      ``DecisionError``
200 without ``result`` (undefined)           ``DecisionError``
no provenance revision, or the wrong one     ``DecisionError``
==========================================  ==========================================

Queries ask for ``strict-builtin-errors=true``: without it a builtin error (say, a bad
timestamp in ``time.parse_rfc3339_ns``) silently makes the expression undefined, which can
make a ``deny`` rule vanish and an ``allow`` come out true.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import re
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from agov.config import MAX_TIMEOUT_S
from agov.decisions import Evaluation
from agov.errors import DecisionError, EngineUnavailableError
from agov.opa.evaluator import EncodedInput, EvaluatorConfig

_PATH_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:/[A-Za-z_][A-Za-z0-9_]*)*")
_QUERY = "?provenance=true&strict-builtin-errors=true"
_REVISION_PROBE = "/v1/data/system/agov_revision_probe?provenance=true"
_ERROR_BODY_LIMIT = 64 * 1024
_AUTH_HINT = "check the bearer token (AGOV_OPA_TOKEN) and the TLS client certificate"


@dataclass(frozen=True)
class ConnectionConfig:
    """Where OPA listens and how to authenticate to it.

    Attributes:
        url: ``http://host:port`` or ``https://host:port``, optionally with a path prefix.
        token: Bearer token sent on every request (``--authentication=token`` on OPA).
        ca_file: PEM bundle of CAs that sign OPA's server certificate (https only; the
            system store when not given).
        client_cert: PEM client certificate for mTLS (https only).
        client_key: PEM key of ``client_cert`` (defaults to the key inside ``client_cert``).
        unix_socket: Connect to OPA's Unix domain socket at this path instead of the url's
            host and port (a managed sidecar); the url then names only the Host header.
        socket_owner_pid: With ``unix_socket``, the process that must be listening on it (the
            kernel's ``SO_PEERCRED``): a connection to any other process fails closed, so a
            socket path that outlived its OPA never reaches whatever listens there next.
    """

    url: str
    token: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    unix_socket: Path | None = None
    socket_owner_pid: int | None = None

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"OPA url must be http(s)://host[:port], got {self.url!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("OPA url must not carry a query, fragment or credentials")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"OPA url has a bad port: {self.url!r}") from exc
        tls_options = self.ca_file or self.client_cert or self.client_key
        if self.unix_socket is not None and tls_options:
            raise ValueError("TLS options do not apply to a Unix socket")
        if parts.scheme == "http" and tls_options:
            raise ValueError("TLS options need an https:// OPA url")
        if self.client_key and not self.client_cert:
            raise ValueError("client_key needs client_cert")
        if self.token is not None and (not self.token or any(c in self.token for c in "\r\n")):
            raise ValueError("token must be non-empty and on one line")
        if self.unix_socket is not None and parts.scheme != "http":
            raise ValueError("a Unix socket needs an http:// OPA url")
        if self.socket_owner_pid is not None and self.unix_socket is None:
            raise ValueError("socket_owner_pid needs unix_socket")

    @property
    def where(self) -> str:
        """Where OPA is, for messages: the url, or ``unix:<path>`` for a Unix socket (one reached
        through ``/proc/self/fd/N/`` shown by its directory's own path)."""
        if self.unix_socket is None:
            return self.url
        shown = self.unix_socket
        if shown.parent.parent == Path("/proc/self/fd"):
            with contextlib.suppress(OSError):
                shown = Path(os.readlink(shown.parent)) / shown.name
        return f"unix:{shown}"

    @property
    def tls(self) -> bool:
        """Whether the connection uses TLS."""
        return self.url.startswith("https:")


class Reply(NamedTuple):
    """One raw HTTP answer: status code and the complete body."""

    status: int
    body: bytes


def require_bool(value: object, what: str) -> bool:
    """Return ``value`` if it is a JSON boolean, else refuse it.

    Args:
        value: A field of a policy result, e.g. ``result.get("allow")``.
        what: Its name, for the message (``"admission allow"``).

    Returns:
        The boolean.

    Raises:
        DecisionError: ``value`` is anything but ``True`` or ``False`` (``"true"``, ``1``,
            ``None`` included).
    """
    if value is True or value is False:
        return value
    raise DecisionError(
        f"{what} must be a boolean, got {type(value).__name__} {_short(repr(value))}: "
        "the decision fails closed",
        hint="fix the policy so that it always yields true or false",
    )


class DecisionClient:
    """A thread-safe client for OPA's data API with a pool of keep-alive connections.

    A request takes an idle connection (or opens one), and puts it back after a clean
    answer. A connection that breaks is discarded. When a *reused* connection fails before
    a single response byte arrived (OPA closed an idle keep-alive), the request is retried
    once on a fresh connection; never after a timeout, never after any byte arrived.
    """

    def __init__(self, connection: ConnectionConfig, config: EvaluatorConfig | None = None) -> None:
        """Prepare the client; no connection is opened yet.

        Args:
            connection: Where OPA is and how to authenticate.
            config: Deadlines and size limits.

        Raises:
            EngineUnavailableError: TLS material could not be loaded.
        """
        self.connection = connection
        self.config = config or EvaluatorConfig()
        parts = urllib.parse.urlsplit(connection.url)
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if connection.tls else 80)
        self._prefix = parts.path.rstrip("/")
        self._ssl = _ssl_context(connection) if connection.tls else None
        host_header = self._host if ":" not in self._host else f"[{self._host}]"
        if parts.port is not None:
            host_header += f":{parts.port}"
        # the headers of every request but Content-Length, already joined
        self._head = f"Host: {host_header}\r\nContent-Type: application/json\r\nAccept: application/json\r\n"
        if connection.token:
            self._head += f"Authorization: Bearer {connection.token}\r\n"
        # newest last: the connection most recently used is the least likely to be stale
        self._idle: list[_Connection] = []
        self._idle_lock = threading.Lock()
        self._closed = threading.Event()
        # one encoder, not json.dumps with options (which builds a new encoder per call)
        self._encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    # --- decisions --------------------------------------------------------------------------

    def evaluate(
        self,
        path: str,
        input: Mapping[str, Any] | EncodedInput,
        *,
        expected_revision: str | None = None,
        timeout_s: float | None = None,
    ) -> Evaluation:
        """POST ``{"input": input}`` to ``/v1/data/<path>`` and return a checked answer.

        Args:
            path: Slash-separated rule path below ``data`` (``agov/admission/decision``).
            input: The input document, or its JSON bytes.
            expected_revision: When given, an answer from another revision is refused.
            timeout_s: This call's deadline instead of ``EvaluatorConfig.timeout_s``.

        Returns:
            The result, the revision of the configured bundle and OPA's decision id (None
            when decision logging is off).

        Raises:
            EngineUnavailableError: See the module table.
            DecisionError: See the module table; also for a bad ``path`` or an input that
                does not serialize to JSON within ``max_request_bytes``.
        """
        if not isinstance(path, str) or not _PATH_RE.fullmatch(path):
            raise DecisionError(f"bad policy path {path!r}: expected segments like 'agov/admission/decision'")
        try:
            if isinstance(input, EncodedInput):
                body = b'{"input":' + input.json + b"}"
            else:
                body = self._encoder.encode({"input": dict(input)}).encode("utf-8")
        except (TypeError, ValueError, RecursionError) as exc:
            raise DecisionError(f"input for data.{_dotted(path)} does not serialize to JSON: {exc}") from exc
        if len(body) > self.config.max_request_bytes:
            raise DecisionError(
                f"input for data.{_dotted(path)} is {len(body)} bytes, over the "
                f"{self.config.max_request_bytes}-byte limit"
            )
        reply = self.request("POST", f"/v1/data/{path}{_QUERY}", body, timeout_s=timeout_s)
        doc = _check_reply(reply, f"data.{_dotted(path)}")
        # (1) undefined is never "no objection"
        if "result" not in doc:
            raise DecisionError(
                f"undefined decision at data.{_dotted(path)}: OPA returned HTTP 200 with no result, "
                "so the call fails closed",
                hint="check that the bundle defines this rule, that its package path is right, and that"
                " it has a value for this input (a rule without a default is undefined where its body fails)",
            )
        # (2) the answer must name the bundle revision that produced it
        revision = _provenance_revision(doc, self.config.bundle_name)
        if revision is None:
            raise DecisionError(
                f"OPA's answer for data.{_dotted(path)} carries no revision for bundle "
                f"{self.config.bundle_name!r}: cannot tie the decision to a policy hash",
                hint="is the bundle activated, and does its .manifest set a revision?",
            )
        # (3) and, when asked, the revision the caller expects
        if expected_revision is not None and revision != expected_revision:
            raise DecisionError(
                f"data.{_dotted(path)} was answered by revision {revision!r}, expected {expected_revision!r}",
                hint="the sidecar serves another policy than the one expected: another process may have"
                " reloaded or rolled back meanwhile (`agov policy history` marks the active one), or the"
                " sidecar has not loaded the new bundle yet; try again",
            )
        decision_id = doc.get("decision_id")
        if decision_id is not None and not isinstance(decision_id, str):
            raise DecisionError(f"OPA's decision_id is not a string: {_short(decision_id)}")
        return Evaluation(result=doc["result"], revision=revision, decision_id=decision_id)

    def health(self, *, bundles: bool = True) -> None:
        """Check ``GET /health`` (with ``?bundles``: every bundle activated at least once).

        Raises:
            EngineUnavailableError: Not 200, or OPA unreachable.
        """
        reply = self.request("GET", "/health?bundles" if bundles else "/health")
        if reply.status != 200:
            raise EngineUnavailableError(
                f"OPA is not ready (GET /health{'?bundles' if bundles else ''} answered "
                f"HTTP {reply.status}: {_opa_message(reply.body)})"
            )

    def revision(self) -> str | None:
        """The active revision of the configured bundle, from ``?provenance=true``.

        Returns:
            The revision, or None while the bundle is not active.

        Raises:
            EngineUnavailableError: OPA unreachable, or refused the probe (auth, 5xx).
            DecisionError: The answer was malformed.
        """
        doc = _check_reply(self.request("POST", _REVISION_PROBE, b'{"input":{}}'), "revision probe")
        return _provenance_revision(doc, self.config.bundle_name)

    def status(self) -> dict[str, Any] | None:
        """OPA's own status report (``GET /v1/status``), or None if its status plugin is off.

        Raises:
            EngineUnavailableError: OPA unreachable or broken.
            DecisionError: The answer was malformed.
        """
        reply = self.request("GET", "/v1/status")
        if reply.status == 500 and b"not enabled" in reply.body:
            return None
        result = _check_reply(reply, "status").get("result")
        if not isinstance(result, dict):
            raise DecisionError("OPA's status report has no result object")
        return result

    # --- transport --------------------------------------------------------------------------

    def request(
        self, method: str, target: str, body: bytes | None = None, *, timeout_s: float | None = None
    ) -> Reply:
        """Send one request under the ``timeout_s`` deadline and read the whole answer.

        Args:
            method: HTTP method.
            target: Path and query below the base URL (``/v1/data/x?provenance=true``).
            body: Request body (JSON).
            timeout_s: This request's deadline instead of ``EvaluatorConfig.timeout_s``.

        Returns:
            Status and body (any status; mapping statuses is the caller's business).

        Raises:
            EngineUnavailableError: Transport failure, deadline, malformed HTTP, or closed.
            DecisionError: The body is larger than ``max_response_bytes``.
        """
        if self._closed.is_set():
            raise EngineUnavailableError("the OPA client is closed")
        timeout = self.config.timeout_s if timeout_s is None else timeout_s
        if not 0 < timeout <= MAX_TIMEOUT_S:
            raise ValueError(f"timeout_s must be in (0, {MAX_TIMEOUT_S:g}], got {timeout}")
        deadline = time.monotonic() + timeout
        retried = False
        while True:
            conn, reused = (self._new_connection(), False) if retried else self._acquire()
            try:
                status, data, keep = self._exchange(conn, method, self._prefix + target, body, deadline)
            except _StaleConnection as exc:
                conn.close()
                # (stale keep-alive) OPA closed an idle connection before we wrote: retry once
                if reused and not retried and time.monotonic() < deadline:
                    retried = True
                    self._drop_idle()  # OPA closed one idle connection: likely all of them
                    continue
                raise self._unavailable(exc.__cause__ or exc, timeout) from exc.__cause__
            except (DecisionError, EngineUnavailableError):
                conn.close()
                raise
            except (OSError, http.client.HTTPException, ValueError) as exc:
                conn.close()
                raise self._unavailable(exc, timeout) from exc
            except BaseException:
                conn.close()
                raise
            if keep:
                self._release(conn)
            else:
                conn.close()
            return Reply(status, data)

    def close(self) -> None:
        """Close every idle connection; later requests raise. Idempotent."""
        self._closed.set()
        self._drop_idle()

    def _drop_idle(self) -> None:
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> DecisionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _acquire(self) -> tuple[_Connection, bool]:
        with self._idle_lock:
            if self._idle:
                return self._idle.pop(), True
        return self._new_connection(), False

    def _release(self, conn: _Connection) -> None:
        pooled = False
        if not self._closed.is_set():
            with self._idle_lock:
                if len(self._idle) < self.config.pool_size:
                    self._idle.append(conn)
                    pooled = True
        if not pooled:
            conn.close()
        elif self._closed.is_set():  # close() ran meanwhile: do not leave this one in the pool
            self._drop_idle()

    def _exchange(
        self, conn: _Connection, method: str, target: str, body: bytes | None, deadline: float
    ) -> tuple[int, bytes, bool]:
        if time.monotonic() >= deadline:
            raise TimeoutError("deadline passed before the request was sent")
        if conn.sock is None:
            conn.open(deadline)
        conn.received = 0
        payload = body or b""
        head = f"{method} {target} HTTP/1.1\r\n{self._head}Content-Length: {len(payload)}\r\n\r\n"
        try:
            conn.send(head.encode("latin-1") + payload, deadline)
            status, headers, keep = conn.read_head(deadline)
        except (
            ConnectionResetError,
            BrokenPipeError,
            ConnectionAbortedError,
            http.client.RemoteDisconnected,
        ) as exc:
            if conn.received == 0:
                raise _StaleConnection() from exc
            raise
        if status in (204, 304) or 100 <= status < 200:
            # no body; a 101 switches protocols, and bytes beyond the head would be misread
            return status, b"", keep and status != 101 and conn.idle()
        limit = self.config.max_response_bytes if status == 200 else _ERROR_BODY_LIMIT
        if "chunked" in headers.get("transfer-encoding", "").lower():
            # with a Content-Length beside it the framing is ambiguous: read chunked, then close
            keep = keep and "content-length" not in headers
            data = conn.read_chunked(limit, deadline)
        elif "content-length" in headers:
            length = _content_length(headers["content-length"])
            if length > limit:
                if status == 200:
                    raise DecisionError(
                        f"OPA's answer is {length} bytes, over the {limit}-byte limit (max_response_bytes)"
                    )
                return status, b"", False
            data = conn.read_exact(length, deadline)
        else:  # no length: the body runs until OPA closes the connection
            data, keep = conn.read_to_close(limit, deadline), False
        if data is None:
            if status == 200:
                raise DecisionError(f"OPA's answer is over the {limit}-byte limit (max_response_bytes)")
            return status, b"", False
        return status, data, keep and conn.idle()

    def _new_connection(self) -> _Connection:
        return _Connection(
            self._host,
            self._port,
            self._ssl,
            self.connection.unix_socket,
            self.connection.socket_owner_pid,
        )

    def _unavailable(self, exc: BaseException, timeout_s: float) -> EngineUnavailableError:
        where = self.connection.where
        if isinstance(exc, _ResolverTimeout):
            return EngineUnavailableError(
                f"cannot resolve the OPA host in {where} within {timeout_s:g} s",
                hint="check the system resolver (DNS), or give OPA's address as an IP address",
            )
        if isinstance(exc, TimeoutError):
            return EngineUnavailableError(
                f"OPA at {where} did not answer within {timeout_s:g} s",
                hint="is OPA overloaded? raise the deadline only if these queries are known to be slow "
                "(agov.yaml: limits.opa_timeout_s for one decision, limits.revalidation_timeout_s for a "
                "revalidation chunk)",
            )
        if isinstance(exc, ConnectionRefusedError):
            return EngineUnavailableError(
                f"OPA at {where} refused the connection", hint="is the OPA sidecar running?"
            )
        if isinstance(exc, _WrongSocketOwner):
            return WrongListenerError(
                f"OPA at {where} is not the OPA agov started: process {exc.peer_pid} listens there, "
                f"not process {exc.expected_pid}",
                hint="if AGOV_OPA_BIN is a wrapper script, it must `exec` opa; otherwise another "
                "process took the sidecar's socket: restart agov, and find out what did",
            )
        if isinstance(exc, FileNotFoundError) and self.connection.unix_socket is not None:
            return EngineUnavailableError(
                f"OPA at {where} is not listening: there is no socket there (not yet, or no longer)",
                hint="is the OPA sidecar running?",
            )
        if isinstance(exc, socket.gaierror):
            return EngineUnavailableError(f"cannot resolve the OPA host in {where}: {exc}")
        if isinstance(exc, ssl.SSLError):
            return EngineUnavailableError(
                f"TLS with OPA at {where} failed: {exc}", hint="check the CA file and client certificate"
            )
        if isinstance(exc, http.client.RemoteDisconnected):
            return EngineUnavailableError(f"OPA at {where} closed the connection without answering")
        if isinstance(exc, http.client.HTTPException | ValueError):
            return EngineUnavailableError(
                f"OPA at {where} sent a malformed or truncated HTTP response ({type(exc).__name__})"
            )
        return EngineUnavailableError(f"connection to OPA at {where} failed: {type(exc).__name__}: {exc}")


# --- connections with a hard deadline ---------------------------------------------------------
#
# A small HTTP/1.1 client of its own: http.client parses every response's headers with the email
# package and reads through a new 64 KiB buffer, about 150 µs per decision on the hot path. OPA
# answers with Content-Length or chunked bodies; anything else about the answer that does not
# parse is a malformed response (an ``http.client`` exception), which fails closed.

_MAX_HEAD_BYTES = 64 * 1024
_MAX_LINE_BYTES = 4096
_STATUS_RE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [^\r\n]*)?")


class _Connection:
    """One keep-alive connection to OPA (TLS when a context is given) and its read buffer.

    Every socket operation waits at most until the request's deadline, however slowly bytes
    drip. ``received`` counts the bytes of the current answer, so that a reused connection
    which fails before any byte arrives can be told apart from a broken answer.
    """

    __slots__ = (
        "_buffer",
        "_context",
        "_host",
        "_port",
        "_socket_owner_pid",
        "_unix_socket",
        "received",
        "sock",
    )

    def __init__(
        self,
        host: str,
        port: int,
        context: ssl.SSLContext | None,
        unix_socket: Path | None = None,
        socket_owner_pid: int | None = None,
    ) -> None:
        self._host, self._port, self._context = host, port, context
        self._unix_socket, self._socket_owner_pid = unix_socket, socket_owner_pid
        self.sock: socket.socket | None = None
        self._buffer = bytearray()
        self.received = 0

    def open(self, deadline: float) -> None:
        if self._unix_socket is not None:
            self.sock = _connect_unix(self._unix_socket, deadline, self._socket_owner_pid)
            return
        sock = _connect(self._host, self._port, deadline)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._context is not None:
                sock.settimeout(_remaining(deadline))
                sock = self._context.wrap_socket(sock, server_hostname=self._host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._buffer.clear()

    def send(self, data: bytes, deadline: float) -> None:
        assert self.sock is not None
        self.sock.settimeout(_remaining(deadline))
        self.sock.sendall(data)  # request line, headers and body in one write

    def _fill(self, deadline: float) -> None:
        assert self.sock is not None
        self.sock.settimeout(_remaining(deadline))
        data = self.sock.recv(65536)
        if not data:
            if self.received == 0:
                raise http.client.RemoteDisconnected("OPA closed the connection without answering")
            raise http.client.IncompleteRead(bytes(self._buffer))
        self.received += len(data)
        self._buffer += data

    def read_head(self, deadline: float) -> tuple[int, dict[str, str], bool]:
        """The status, headers (names lower-cased) and keep-alive of the next final answer."""
        while True:
            head = self._read_through(b"\r\n\r\n", _MAX_HEAD_BYTES, "response head", deadline)
            status_line, *lines = head.split(b"\r\n")
            match = _STATUS_RE.fullmatch(status_line)
            if match is None:
                raise http.client.BadStatusLine(status_line.decode("latin-1")[:80])
            status = int(match.group(2))
            if not (100 <= status < 200 and status != 101):
                break  # else an interim answer (100 Continue): the final one follows
        headers: dict[str, str] = {}
        for line in lines:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise http.client.HTTPException(f"malformed header line {line[:80]!r}")
            key, text = name.decode("latin-1").lower(), value.strip().decode("latin-1")
            if key not in headers:
                headers[key] = text
            elif key == "content-length":
                if headers[key] != text:
                    raise http.client.HTTPException("conflicting Content-Length headers")
            else:
                headers[key] += f", {text}"
        # HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 closes
        keep = match.group(1) == b"1" and "close" not in headers.get("connection", "").lower()
        return status, headers, keep

    def idle(self) -> bool:
        """No bytes beyond the answer just read (anything more would be misread as the next one)."""
        return not self._buffer

    def read_exact(self, size: int, deadline: float) -> bytes:
        while len(self._buffer) < size:
            self._fill(deadline)
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _read_line(self, deadline: float) -> bytes:
        return self._read_through(b"\r\n", _MAX_LINE_BYTES, "chunk size line", deadline)

    def _read_through(self, delimiter: bytes, limit: int, what: str, deadline: float) -> bytes:
        """The bytes before the next ``delimiter``, which is consumed too; at most ``limit``."""
        while (end := self._buffer.find(delimiter)) < 0:
            if len(self._buffer) > limit:
                raise http.client.LineTooLong(what)
            self._fill(deadline)
        data = bytes(self._buffer[:end])
        del self._buffer[: end + len(delimiter)]
        return data

    def read_chunked(self, limit: int, deadline: float) -> bytes | None:
        """A chunked body; None once it grows past ``limit`` (the connection is then unusable)."""
        parts: list[bytes] = []
        total = 0
        while True:
            size_text = self._read_line(deadline).split(b";", 1)[0].strip()
            if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
                raise http.client.HTTPException(f"bad chunk size {size_text[:20]!r}")
            size = int(size_text, 16)
            if size == 0:
                while self._read_line(deadline):  # trailers, up to the empty line
                    pass
                return b"".join(parts)
            total += size
            if total > limit:
                return None
            parts.append(self.read_exact(size, deadline))
            if self.read_exact(2, deadline) != b"\r\n":
                raise http.client.HTTPException("chunk not followed by CRLF")

    def read_to_close(self, limit: int, deadline: float) -> bytes | None:
        """A body that ends when the peer closes; None once it grows past ``limit``."""
        while len(self._buffer) <= limit:
            try:
                self._fill(deadline)
            except http.client.IncompleteRead:
                data = bytes(self._buffer)
                self._buffer.clear()
                return data
        return None


class WrongListenerError(EngineUnavailableError):
    """Not the expected process listens on the Unix socket: waiting will not change that."""


class _WrongSocketOwner(OSError):
    """The process listening on a Unix socket is not the one expected."""

    def __init__(self, peer_pid: int, expected_pid: int) -> None:
        super().__init__(f"process {peer_pid} listens on the socket, not {expected_pid}")
        self.peer_pid, self.expected_pid = peer_pid, expected_pid


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _connect_unix(path: Path, deadline: float, owner_pid: int | None = None) -> socket.socket:
    """Connect to a Unix socket by the deadline, and check who listens there when ``owner_pid``
    is given. A listener whose backlog is full answers a connect at once with EAGAIN (where TCP
    would wait): it is asked again until the deadline."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        while True:
            sock.settimeout(_remaining(deadline))
            try:
                sock.connect(str(path))
            except BlockingIOError:
                time.sleep(min(0.005, _remaining(deadline)))
                continue
            break
        # Linux's SO_PEERCRED; where there is none, the socket's 0700 directory is the guard
        if owner_pid is not None and hasattr(socket, "SO_PEERCRED"):
            peer_pid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )[0]
            if peer_pid != owner_pid:
                raise _WrongSocketOwner(peer_pid, owner_pid)
        return sock
    except BaseException:
        sock.close()
        raise


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    """``socket.create_connection``, except that every address tried shares the one deadline.

    ``create_connection`` gives each address of a host name the whole timeout, so a name with
    three unreachable addresses would take three timeouts. As there, an address that fails
    (refused, or a family this host cannot use) passes on to the next one while time remains,
    and the first error is the one raised. Name resolution shares the deadline too.
    """
    errors: list[OSError] = []
    try:
        for family, kind, proto, _, address in _resolve(host, port, deadline):
            sock: socket.socket | None = None
            try:
                sock = socket.socket(family, kind, proto)
                sock.settimeout(_remaining(deadline))
                sock.connect(address)
            except OSError as exc:
                if sock is not None:
                    sock.close()
                if time.monotonic() >= deadline:
                    raise  # out of time: no later address can be tried
                errors.append(exc)
                continue
            except BaseException:
                if sock is not None:
                    sock.close()
                raise
            return sock
        raise errors[0] if errors else OSError(f"{host} resolves to no address")
    finally:
        errors.clear()  # the tracebacks would keep this frame alive


def _resolve(host: str, port: int, deadline: float) -> list[Any]:
    """``socket.getaddrinfo``, waited for only until ``deadline``: the system resolver can take
    many seconds (its own timeouts and retries) and cannot be interrupted, so a name is resolved on
    a daemon thread that is left to finish alone when the deadline passes. Requests for the same
    name share one lookup in flight, so a resolver that hangs holds one thread, not one per
    request. An IP address, as a managed sidecar has, needs no resolver and no thread."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    key = (host, port)
    with _RESOLVING_LOCK:  # one lookup per name at a time, however many requests wait for it
        answer = _RESOLVING.get(key)
        if answer is None:
            answer = _RESOLVING[key] = Future()
            threading.Thread(target=_lookup, args=(key, answer), name="agov-resolve", daemon=True).start()
    try:
        return answer.result(timeout=_remaining(deadline))
    except TimeoutError:
        raise _ResolverTimeout(f"resolving {host} did not finish within the deadline") from None


_RESOLVING: dict[tuple[str, int], Future[list[Any]]] = {}
_RESOLVING_LOCK = threading.Lock()


def _lookup(key: tuple[str, int], answer: Future[list[Any]]) -> None:
    try:
        answer.set_result(socket.getaddrinfo(key[0], key[1], type=socket.SOCK_STREAM))
    except BaseException as exc:  # handed to every waiter through the future
        answer.set_exception(exc)
    finally:
        with _RESOLVING_LOCK:
            if _RESOLVING.get(key) is answer:
                del _RESOLVING[key]


class _ResolverTimeout(TimeoutError):
    """The system resolver had not answered by the deadline."""


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("deadline passed while talking to OPA")
    return remaining


def _content_length(value: str) -> int:
    if not value.isdigit():
        raise http.client.HTTPException(f"bad Content-Length {value[:20]!r}")
    return int(value)


class _StaleConnection(Exception):
    """A reused connection failed before any response byte (raised ``from`` the cause)."""


def _ssl_context(connection: ConnectionConfig) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=str(connection.ca_file) if connection.ca_file else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if connection.client_cert:
            context.load_cert_chain(
                str(connection.client_cert), str(connection.client_key) if connection.client_key else None
            )
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise EngineUnavailableError(
            f"cannot load TLS material for OPA at {connection.url}: {exc}",
            hint="check the CA file, client certificate and key paths",
        ) from exc
    return context


# --- answers ------------------------------------------------------------------------------------


def _check_reply(reply: Reply, what: str) -> dict[str, Any]:
    """Map a non-200 status to an error, and a 200 body to a JSON object."""
    if reply.status in (401, 403):
        raise EngineUnavailableError(
            f"OPA refused {what} (HTTP {reply.status}): authentication or authorization failed: "
            f"{_opa_message(reply.body)}",
            hint=_AUTH_HINT,
        )
    if reply.status >= 500:
        if reply.status == 500 and _is_eval_error(reply.body):
            raise DecisionError(
                f"policy evaluation failed for {what}: {_opa_message(reply.body)}",
                hint="a policy error (builtin error, conflicting outputs): fix the policy",
            )
        raise EngineUnavailableError(
            f"OPA failed on {what} (HTTP {reply.status}): {_opa_message(reply.body)}"
        )
    if reply.status != 200:
        raise DecisionError(f"OPA rejected {what} (HTTP {reply.status}): {_opa_message(reply.body)}")
    try:
        # orjson: several times faster on a 1000-agent answer, and it refuses NaN and Infinity
        doc = orjson.loads(reply.body)
    except (ValueError, RecursionError) as exc:
        raise DecisionError(f"OPA's answer for {what} is not JSON: {_short(reply.body)}") from exc
    if not isinstance(doc, dict):
        raise DecisionError(f"OPA's answer for {what} is not a JSON object: {_short(doc)}")
    return doc


def _provenance_revision(doc: Mapping[str, Any], bundle: str) -> str | None:
    provenance = doc.get("provenance")
    if not isinstance(provenance, dict):
        return None
    bundles = provenance.get("bundles")
    if not isinstance(bundles, dict):
        return None
    entry = bundles.get(bundle)
    if not isinstance(entry, dict):
        return None
    revision = entry.get("revision")
    return revision if isinstance(revision, str) and revision else None


def _is_eval_error(body: bytes) -> bool:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return False
    errors = doc.get("errors") if isinstance(doc, dict) else None
    return isinstance(errors, list) and any(
        isinstance(e, dict) and str(e.get("code", "")).startswith("eval_") for e in errors
    )


def _opa_message(body: bytes) -> str:
    """OPA's ``{code, message}`` error, or a short excerpt of whatever came back."""
    if not body.strip():
        return "(empty body)"
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return _short(body)
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        code = doc.get("code")
        message = _short(f"{code}: {doc['message']}" if code else doc["message"])
        errors = doc.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            first = errors[0]
            message = f"{message}: {_short(first.get('message', ''), limit=400)}{_at(first.get('location'))}"
        return message
    return _short(doc)


def _at(location: object) -> str:
    """`` at FILE:ROW:COL`` from an OPA error's location, which names the policy line to fix; kept
    whole, however long the message before it."""
    if not isinstance(location, dict) or not isinstance(location.get("file"), str) or not location["file"]:
        return ""
    place = ":".join(str(location[k]) for k in ("row", "col") if isinstance(location.get(k), int))
    return " at " + _short(f"{location['file']}:{place}" if place else location["file"], limit=200)


def _short(value: object, limit: int = 200) -> str:
    if isinstance(value, bytes):
        text = value.decode("utf-8", "replace")
    elif isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError, RecursionError):
            text = repr(value)
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + "…"


def _dotted(path: str) -> str:
    return path.replace("/", ".")
