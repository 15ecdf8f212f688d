"""An in-process bundle service that OPA's bundle, status and decision-log plugins talk to.

It speaks OPA's own protocol (the "Bundle Service API"):

- ``GET /bundles/<name>.tar.gz`` serves the current bundle with an ``ETag``; a request whose
  ``If-None-Match`` matches gets ``304 Not Modified``.
- Long polling: OPA sends ``Prefer: modes=snapshot,delta;wait=<seconds>`` once
  ``bundles.<name>.polling.long_polling_timeout_seconds`` is configured *and* the previous
  ``200`` answer carried ``Content-Type: application/vnd.openpolicyagent.bundles``. A matching
  request is then held until a new bundle is published or the wait runs out (then ``304``),
  and OPA asks again at once, so a publish reaches OPA in milliseconds.
- ``POST /status`` keeps the last status report (active revision, bundle errors).
- ``POST /logs`` takes gzipped JSON arrays of decision events; the last few are kept.

Every request must carry ``Authorization: Bearer <token>`` with a random per-server token, so
another local process can neither forge a status report nor read the bundle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

BUNDLE_CONTENT_TYPE = "application/vnd.openpolicyagent.bundles"
"""The content type that tells OPA this service supports long polling."""

_WAIT_RE = re.compile(r"(?:^|[;,\s])wait=(\d{1,6})(?:$|[;,\s])")
_REVISION_RE = re.compile(r"^[\x21\x23-\x7e]{1,256}$")  # printable ASCII, no quote, no space


@dataclass(frozen=True)
class BundleServerConfig:
    """Limits for the bundle service.

    Attributes:
        bundle_name: The bundle is served at ``/bundles/<bundle_name>.tar.gz``.
        host: Interface to bind; loopback only by default.
        max_wait_s: Upper bound on how long a long-poll request is held, whatever OPA asks.
        max_report_bytes: Largest status or decision-log body accepted (compressed, and again
            after decompression), so a runaway report cannot exhaust memory.
        kept_log_events: How many decision-log events are kept (oldest dropped first).
        unread_log_bytes: How many bytes of decision-log uploads (as received: gzipped) are
            kept until :meth:`BundleServer.decision_logs` reads them (oldest dropped first).
        token: Bearer token every request must carry; random when not given.
    """

    bundle_name: str = "agov"
    host: str = "127.0.0.1"
    max_wait_s: float = 60.0
    max_report_bytes: int = 16 * 1024 * 1024
    kept_log_events: int = 1000
    unread_log_bytes: int = 4 * 1024 * 1024
    token: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.bundle_name):
            raise ValueError(f"bundle_name {self.bundle_name!r} must match [A-Za-z0-9_.-]{{1,64}}")
        if (
            min(self.max_wait_s, self.max_report_bytes, self.unread_log_bytes) <= 0
            or self.kept_log_events < 0
        ):
            raise ValueError("BundleServerConfig limits must be positive (kept_log_events: not negative)")


@dataclass(frozen=True)
class PublishedBundle:
    """One published bundle version and what the server knows about its delivery.

    Attributes:
        generation: Increments with every publish, starting at 1.
        revision: The bundle's revision (the policy hash).
        etag: The entity tag served for it.
        size: Size of the tarball in bytes.
    """

    generation: int
    revision: str
    etag: str
    size: int


class BundleServer:
    """A loopback HTTP bundle service for one bundle, with status and decision-log sinks.

    Thread-safe. ``publish`` swaps the bundle atomically and wakes every held long poll.
    """

    def __init__(self, config: BundleServerConfig | None = None) -> None:
        """Bind a loopback port and start serving in a daemon thread.

        Args:
            config: Limits; defaults are fine for a managed sidecar.

        Raises:
            OSError: The port could not be bound.
        """
        cfg = config or BundleServerConfig()
        if not cfg.token:
            cfg = dataclasses.replace(cfg, token=secrets.token_urlsafe(32))
        self.config = cfg
        self._cond = threading.Condition()
        self._bundle: bytes | None = None
        self._current: PublishedBundle | None = None
        self._served: dict[int, int] = {}  # generation -> number of 200 answers
        self._last_status: dict[str, Any] | None = None
        self._status_count = 0
        self._logs: deque[dict[str, Any]] = deque(maxlen=cfg.kept_log_events)
        # uploads as received (gzipped or not), parsed only when read: parsing holds the GIL for
        # milliseconds per upload, and in the managed sidecar nothing reads them but tests and a
        # person debugging
        self._unread_logs: deque[tuple[bytes, bool]] = deque()
        self._unread_bytes = 0
        self._log_upload_sizes: deque[int] = deque(maxlen=100)
        self._reading_logs = threading.Lock()  # one reader at a time: events stay in order
        self._closed = False
        self._httpd = _Server((cfg.host, 0), _make_handler(self))
        self._httpd.daemon_threads = True  # held long polls must not block close()
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="agov-bundle-server",
            daemon=True,
        )
        self._thread.start()

    # --- public API -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the service, e.g. ``http://127.0.0.1:40123``."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def resource(self) -> str:
        """The bundle's resource path relative to :attr:`url` (``bundles/<name>.tar.gz``)."""
        return f"bundles/{self.config.bundle_name}.tar.gz"

    @property
    def token(self) -> str:
        """The bearer token clients must send."""
        return self.config.token

    def publish(self, bundle_bytes: bytes, revision: str) -> PublishedBundle:
        """Make ``bundle_bytes`` the bundle served from now on, and wake waiting long polls.

        The ETag is ``<revision>.<first 16 hex of SHA-256(bytes)>``: it names the revision but
        also changes when the bytes do, so a re-signed or repaired bundle with the same
        revision is still downloaded.

        Args:
            bundle_bytes: A ``.tar.gz`` bundle (signed; the server does not look inside).
            revision: Its manifest revision.

        Returns:
            What was published.

        Raises:
            ValueError: Empty bundle, or a revision that cannot appear in an ETag.
            RuntimeError: The server is closed.
        """
        if not bundle_bytes:
            raise ValueError("bundle_bytes is empty")
        if not _REVISION_RE.match(revision):
            raise ValueError(f"revision {revision!r} must be 1-256 printable ASCII characters without quotes")
        etag = f"{revision}.{hashlib.sha256(bundle_bytes).hexdigest()[:16]}"
        with self._cond:
            if self._closed:
                raise RuntimeError("bundle server is closed")
            generation = (self._current.generation + 1) if self._current else 1
            self._bundle = bytes(bundle_bytes)
            self._current = PublishedBundle(generation, revision, etag, len(bundle_bytes))
            self._cond.notify_all()
            return self._current

    def current(self) -> PublishedBundle | None:
        """The bundle being served, or None before the first publish."""
        with self._cond:
            return self._current

    def times_served(self, generation: int) -> int:
        """How many times the bundle of ``generation`` was sent in full (HTTP 200).

        OPA downloads a bundle it activated only once; it downloads it again only after
        rejecting it (a failed download or activation clears OPA's cached ETag).
        """
        with self._cond:
            return self._served.get(generation, 0)

    def last_status(self) -> dict[str, Any] | None:
        """The last status report OPA posted (a deep copy), or None."""
        with self._cond:
            return json.loads(json.dumps(self._last_status)) if self._last_status is not None else None

    def status_count(self) -> int:
        """How many status reports were received (to wait for a fresh one)."""
        with self._cond:
            return self._status_count

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``predicate()`` is true; it is re-checked after every state change.

        Args:
            predicate: Called with the server lock held; must be quick.
            timeout_s: Upper bound on the wait.

        Returns:
            Whether the predicate became true in time.
        """
        with self._cond:
            return self._cond.wait_for(predicate, timeout=timeout_s)

    def decision_logs(self) -> list[dict[str, Any]]:
        """The last decision-log events received, oldest first."""
        with self._reading_logs:
            with self._cond:
                uploads = list(self._unread_logs)
                self._unread_logs.clear()
                self._unread_bytes = 0
            # parsed outside the lock that publishing and long polls take
            limit = self.config.max_report_bytes
            events = [e for body, gzipped in uploads for e in _events(body, gzipped, limit)]
            keep = self._logs.maxlen
            kept = events if keep is None else events[len(events) - min(keep, len(events)) :]
            with self._cond:
                self._logs.extend(_slim(e) for e in kept)
                return list(self._logs)

    def log_upload_sizes(self) -> list[int]:
        """The sizes of the last decision-log uploads received, as sent (gzipped), oldest first."""
        with self._cond:
            return list(self._log_upload_sizes)

    def close(self) -> None:
        """Stop serving; held long polls are answered at once. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> BundleServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- called by the handler ------------------------------------------------------------

    def _authorized(self, header: str | None) -> bool:
        expected = f"Bearer {self.config.token}"
        return header is not None and hmac.compare_digest(header.encode(), expected.encode())

    def _get_bundle(self, if_none_match: str | None, wait_s: float | None) -> tuple[int, bytes, str]:
        """Decide the answer to a bundle GET: (status, body, etag); status 0 means closed."""
        deadline = time.monotonic() + min(wait_s, self.config.max_wait_s) if wait_s else 0.0
        with self._cond:
            while True:
                if self._closed:
                    return 0, b"", ""
                current, body = self._current, self._bundle
                if current is None or body is None:
                    return 404, b"", ""
                if not _etag_matches(if_none_match, current.etag):
                    self._served[current.generation] = self._served.get(current.generation, 0) + 1
                    self._cond.notify_all()
                    return 200, body, current.etag
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return 304, b"", current.etag
                # (long poll) hold until a publish, close, or the wait runs out
                self._cond.wait(remaining)

    def _record_status(self, status: dict[str, Any]) -> None:
        with self._cond:
            self._last_status = status
            self._status_count += 1
            self._cond.notify_all()

    def _record_logs(self, body: bytes, gzipped: bool) -> None:
        with self._cond:
            self._log_upload_sizes.append(len(body))
            self._unread_logs.append((body, gzipped))
            self._unread_bytes += len(body)
            while self._unread_bytes > self.config.unread_log_bytes and self._unread_logs:
                self._unread_bytes -= len(self._unread_logs.popleft()[0])


_MAX_KEPT_INPUT_BYTES = 16 * 1024


def _events(body: bytes, gzipped: bool, limit: int) -> list[dict[str, Any]]:
    """The events of one decision-log upload (a JSON array of objects, ``limit`` bytes at most
    once decompressed); none if it is not one."""
    try:
        if gzipped:
            body = _gunzip_capped(body, limit)
        doc = json.loads(body)  # not orjson: it turns an integer over 64 bits into a float
    except (OSError, EOFError, zlib.error, ValueError):  # UnicodeDecodeError is a ValueError
        return []
    return [e for e in doc if isinstance(e, dict)] if isinstance(doc, list) else []


def _slim(event: dict[str, Any]) -> dict[str, Any]:
    """Keep a decision-log event without a large input: a revalidation chunk logs every agent's
    spec, and keeping those would grow memory with the fleet. The decision id, path, revision and
    result stay."""
    if "input" in event:
        size = len(json.dumps(event["input"], separators=(",", ":")))
        if size > _MAX_KEPT_INPUT_BYTES:
            return {**event, "input": {"omitted_bytes": size}}
    return event


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # OPA went away mid-answer (stopped, or died): no traceback on stderr
        super().handle_error(request, client_address)


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = {t.strip().removeprefix("W/").strip('"') for t in if_none_match.split(",")}
    return etag in tags or "*" in tags


def _parse_wait(prefer: str | None) -> float | None:
    if not prefer:
        return None
    m = _WAIT_RE.search(prefer)
    return float(m.group(1)) if m else None


def _make_handler(server: BundleServer) -> type[BaseHTTPRequestHandler]:
    cfg = server.config
    bundle_path = "/" + server.resource

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: OPA's Go client reuses its connection
        server_version = "agov-bundle-server"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:
            """Silence the default stderr access log."""

        def _reply(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body:
                self.wfile.write(body)

        def _read_body(self, *, decompress: bool = True) -> bytes | None:
            """The request body within limits (decompressed if gzipped and ``decompress``), or
            None after answering an error."""
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._reply(411)
                self.close_connection = True
                return None
            if length < 0 or length > cfg.max_report_bytes:
                self._reply(413)
                self.close_connection = True
                return None
            raw = self.rfile.read(length)
            if decompress and self.headers.get("Content-Encoding", "").lower() == "gzip":
                try:
                    return _gunzip_capped(raw, cfg.max_report_bytes)
                except (OSError, EOFError, zlib.error, ValueError):
                    self._reply(400)
                    return None
            return raw

        def do_GET(self) -> None:
            if not server._authorized(self.headers.get("Authorization")):
                self._reply(401)
                return
            if self.path.split("?", 1)[0] != bundle_path:
                self._reply(404)
                return
            status, body, etag = server._get_bundle(
                self.headers.get("If-None-Match"), _parse_wait(self.headers.get("Prefer"))
            )
            if status == 0:
                self._reply(503)
                self.close_connection = True
            elif status == 200:
                self._reply(200, body, {"Content-Type": BUNDLE_CONTENT_TYPE, "ETag": f'"{etag}"'})
            elif status == 304:
                self._reply(304, b"", {"Content-Type": BUNDLE_CONTENT_TYPE, "ETag": f'"{etag}"'})
            else:
                self._reply(status)

        def do_POST(self) -> None:
            if not server._authorized(self.headers.get("Authorization")):
                self._reply(401)
                self.close_connection = True
                return
            route = self.path.split("?", 1)[0]
            if route not in ("/status", "/logs"):
                self._reply(404)
                self.close_connection = True
                return
            gzipped = self.headers.get("Content-Encoding", "").lower() == "gzip"
            body = self._read_body(decompress=route != "/logs")
            if body is None:
                return
            if route == "/logs":
                server._record_logs(body, gzipped)  # decompressed and parsed when read
                self._reply(200)
                return
            try:
                doc = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                self._reply(400)
                return
            if not isinstance(doc, dict):
                self._reply(400)
                return
            server._record_status(cast(dict[str, Any], doc))
            self._reply(200)

    return Handler


def _gunzip_capped(data: bytes, limit: int) -> bytes:
    """Decompress gzip without letting a small bomb expand past ``limit`` bytes."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = d.decompress(data, limit + 1)
    if len(out) > limit or d.unconsumed_tail:
        raise ValueError("decompressed body over limit")
    out += d.flush()
    if len(out) > limit:
        raise ValueError("decompressed body over limit")
    return out


__all__ = ["BUNDLE_CONTENT_TYPE", "BundleServer", "BundleServerConfig", "PublishedBundle"]
