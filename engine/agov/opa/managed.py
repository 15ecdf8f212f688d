"""A managed OPA sidecar: agov runs ``opa run --server`` itself and feeds it signed bundles.

The process pulls its one bundle from an in-process :class:`BundleServer` (long polling, so a
publish reaches it in milliseconds), verifies it with the configured ES256 key, and reports
status and decision logs back to the same server.

Decision logs go to the bundle server's ``/logs`` (batched, gzipped, every few seconds):
that is what makes OPA put a ``decision_id`` in each answer. Console decision logs would do
the same, but OPA prints them whatever ``--log-level`` says (measured: ~530 bytes of stderr
per decision, unbounded), and they would bury the stderr tail used to explain failures.

No ``opa`` process outlives the Python process that started it:

- ``stop()`` (also on ``with`` exit and from an ``atexit`` hook) terminates, then kills;
- on Linux the child is spawned with ``PR_SET_PDEATHSIG = SIGKILL``, from a keeper thread
  that lives exactly as long as the sidecar (the signal follows the *thread* that forked),
  so even ``kill -9`` of Python takes OPA down.

OPA listens on a Unix domain socket in its working directory (mode 0700), not on a loopback
port: another local user can neither query nor write to it, nor answer in its place on a port
it left. OPA binds it by a name relative to that directory (so no path is ever parsed as a
URL), and agov connects by its path, or through the directory's file descriptor
(``/proc/self/fd``) when the path is too long for a socket address.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from agov.decisions import Evaluation
from agov.errors import DecisionError, EngineUnavailableError, KeyMaterialError, PolicyError
from agov.opa.binary import find_opa, pdeathsig_preexec
from agov.opa.bundle_server import BundleServer, BundleServerConfig
from agov.opa.evaluator import EncodedInput, EvaluatorConfig
from agov.opa.http import ConnectionConfig, DecisionClient, WrongListenerError
from agov.tempdirs import claim_dir, sweep_orphaned

_SERVICE = "agov"
_ADDR_IN_USE = "address already in use"
_TMP_PREFIX = "agov-opa-"
# An upload must stay within what the bundle server reads once decompressed (16 MiB): admission
# events compressed 14- to 16-fold here, and revalidation events of a fleet denied for one reason
# 45-fold, which is 11 MiB at this limit.
_MAX_LOG_UPLOAD_BYTES = 256 * 1024
# A socket's path must fit sockaddr_un.sun_path (108 bytes on Linux, with its NUL); kept short of it.
_MAX_SOCKET_PATH = 100
_SOCKET_NAME = "opa.sock"  # in OPA's working directory, which is its cwd


DECISION_LOG_MASK = Path(__file__).resolve().parent / "rego" / "system" / "log" / "mask.rego"


@dataclass(frozen=True)
class ManagedConfig:
    """How the managed OPA process is run, with explicit limits.

    Attributes:
        startup_timeout_s: ``start()`` fails if OPA is not serving the bundle by then.
        activation_timeout_s: Default deadline for ``activate()``.
        stop_grace_s: Time between SIGTERM and SIGKILL.
        long_polling_timeout_s: How long OPA asks the bundle server to hold a poll.
        polling_min_delay_s: OPA's polling delay when long polling is off.
        polling_max_delay_s: Also caps OPA's retry back-off after a failed download, so
            it bounds how long a good bundle waits after a rejected one.
        decision_log_min_delay_s: Decision-log upload interval, lower bound.
        decision_log_max_delay_s: Decision-log upload interval, upper bound.
        decision_log_buffer_bytes: OPA drops the oldest events beyond this.
        decision_log_upload_bytes: Largest compressed upload of decision logs (OPA's
            ``upload_size_limit_bytes``; its default is 32 KiB). OPA gzips events into chunks of
            about this size as decisions are made, and at each chunk's end starts a new gzip
            writer and often re-encodes the chunk to fit: at 32 KiB that cost about a sixth of
            its CPU per admission decision (measured against 256 KiB, same run).
        kept_log_events: Decision-log events the bundle server keeps.
        max_bundle_bytes: Largest bundle published or accepted by OPA.
        probe_interval_s: Pause between readiness probes.
        stderr_tail_bytes: How much of OPA's stderr goes into error messages.
        also_tcp: Also listen on a free 127.0.0.1 port (``tcp_url``), for a client that speaks
            only TCP (the benchmarks' opa-python-client baseline); agov itself keeps to the
            socket. Any local user can reach that port: never for a deployment.
        gogc: Go's garbage-collection target for the OPA process (``GOGC``), unless the
            environment sets one. A revalidation chunk is about 1 MB of JSON that OPA parses
            into short-lived values; at Go's default of 100 it spent about a fifth of its CPU
            collecting them (a 1000-agent chunk: ~170 against ~135 µs of OPA CPU per agent at
            200, for ~30 MB more peak memory). None leaves Go's default.
    """

    startup_timeout_s: float = 15.0
    activation_timeout_s: float = 15.0
    stop_grace_s: float = 3.0
    long_polling_timeout_s: int = 30
    polling_min_delay_s: int = 1
    polling_max_delay_s: int = 2
    decision_log_min_delay_s: int = 5
    decision_log_max_delay_s: int = 10
    decision_log_buffer_bytes: int = 16 * 1024 * 1024
    decision_log_upload_bytes: int = 256 * 1024
    kept_log_events: int = 1000
    max_bundle_bytes: int = 64 * 1024 * 1024
    probe_interval_s: float = 0.02
    stderr_tail_bytes: int = 4000
    also_tcp: bool = False
    gogc: int | None = 200

    def __post_init__(self) -> None:
        if (
            min(self.startup_timeout_s, self.activation_timeout_s, self.stop_grace_s, self.probe_interval_s)
            <= 0
        ):
            raise ValueError("ManagedConfig timeouts must be positive")
        if not 1 <= self.polling_min_delay_s <= self.polling_max_delay_s:
            raise ValueError("need 1 <= polling_min_delay_s <= polling_max_delay_s")
        if not 1 <= self.decision_log_min_delay_s <= self.decision_log_max_delay_s:
            raise ValueError("need 1 <= decision_log_min_delay_s <= decision_log_max_delay_s")
        if min(self.long_polling_timeout_s, self.decision_log_buffer_bytes, self.max_bundle_bytes) <= 0:
            raise ValueError("ManagedConfig limits must be positive")
        if not 0 < self.decision_log_upload_bytes <= _MAX_LOG_UPLOAD_BYTES:
            raise ValueError(f"ManagedConfig decision_log_upload_bytes must be in 1..{_MAX_LOG_UPLOAD_BYTES}")
        if self.gogc is not None and self.gogc <= 0:
            raise ValueError("ManagedConfig gogc must be positive (None: Go's default)")


class ManagedSidecar:
    """An ``opa run --server`` process on a Unix socket of its own, owned by this object.

    Implements :class:`~agov.opa.evaluator.Evaluator`. Use as a context manager, or call
    :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        bundle_bytes: bytes,
        revision: str,
        verification_public_key_pem: str | bytes,
        keyid: str,
        config: EvaluatorConfig | None = None,
        *,
        managed: ManagedConfig | None = None,
        opa_bin: Path | None = None,
        start_timeout_s: float | None = None,
    ) -> None:
        """Check the inputs; nothing runs until :meth:`start`.

        Args:
            bundle_bytes: The initial signed bundle (``opa build ... --signing-key``).
            revision: Its manifest revision (the policy hash).
            verification_public_key_pem: ES256 (P-256) public key, PEM.
            keyid: The key id the bundle's signature names (``--verification-key-id`` at
                build time); always configured, so OPA never accepts an unsigned bundle.
            config: Evaluation deadlines and limits.
            managed: Process settings.
            opa_bin: The binary; :func:`~agov.opa.binary.find_opa` when not given.
            start_timeout_s: Overrides ``managed.startup_timeout_s``.

        Raises:
            KeyMaterialError: The key is not a P-256 public key, or the key id is unusable.
            ValueError: Empty or oversized bundle.
        """
        self.config = config or EvaluatorConfig()
        self.managed = managed or ManagedConfig()
        if start_timeout_s is not None:
            self.managed = dataclasses.replace(self.managed, startup_timeout_s=start_timeout_s)
        self._key_pem = _check_es256_public_key(verification_public_key_pem)
        if not keyid or not keyid.isprintable() or len(keyid) > 128:
            raise KeyMaterialError(f"bad bundle signing key id {keyid!r}")
        self._keyid = keyid
        if not bundle_bytes or len(bundle_bytes) > self.managed.max_bundle_bytes:
            raise ValueError(
                f"bundle must be 1..{self.managed.max_bundle_bytes} bytes, got {len(bundle_bytes)}"
            )
        self._initial = (bytes(bundle_bytes), revision)
        self._opa_bin = opa_bin
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._tmp: Path | None = None
        self._server: BundleServer | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._keeper_release = threading.Event()
        self._keeper: threading.Thread | None = None
        self._stderr: IO[bytes] | None = None
        self._owner_fd: int | None = None  # flock on the working directory's owner.lock
        self._client: DecisionClient | None = None
        self._active: tuple[bytes, str] | None = None
        self._socket: Path | None = None  # the socket's real path, for messages
        self._socket_address: Path | None = None  # the path agov connects by
        self._dir_fd: int | None = None  # the working directory, for a socket path too long
        self._port = 0

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> ManagedSidecar:
        """Start OPA and wait until it serves the initial bundle's revision.

        Returns:
            self, for chaining.

        Raises:
            EngineUnavailableError: No binary, OPA died, or it was not ready in time (the
                message carries the tail of OPA's stderr). Nothing is left running.
            PolicyError: OPA refused the initial bundle (bad or missing signature, ...).
        """
        with self._lock:
            if self._proc is not None:
                return self
            self._stopping.clear()
            try:
                self._start_locked()
            except BaseException:
                self._stop_locked()
                raise
            atexit.register(self._atexit_stop)
        return self

    def stop(self) -> None:
        """Terminate OPA (SIGKILL after the grace period) and release everything. Idempotent."""
        self._stopping.set()
        with self._lock:
            self._stop_locked()

    def close(self) -> None:
        """Same as :meth:`stop`."""
        self.stop()

    def __enter__(self) -> ManagedSidecar:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- Evaluator ----------------------------------------------------------------------------

    def evaluate(
        self,
        path: str,
        input: Mapping[str, Any] | EncodedInput,
        *,
        expected_revision: str | None = None,
        timeout_s: float | None = None,
    ) -> Evaluation:
        """Evaluate ``data.<path>``; see :meth:`agov.opa.evaluator.Evaluator.evaluate`.

        Raises:
            EngineUnavailableError: Not started, OPA died, unreachable, slow or broken.
            DecisionError: The answer was unusable (undefined, malformed, wrong revision).
        """
        client = self._client
        if client is None:
            raise EngineUnavailableError("the managed OPA sidecar is not running", hint="call start() first")
        try:
            return client.evaluate(path, input, expected_revision=expected_revision, timeout_s=timeout_s)
        except EngineUnavailableError as exc:
            raise self._with_exit_note(exc) from exc

    def health(self) -> None:
        """Check that the process lives and ``/health?bundles`` answers 200.

        Raises:
            EngineUnavailableError: It does not.
        """
        client = self._client
        if client is None:
            raise EngineUnavailableError("the managed OPA sidecar is not running", hint="call start() first")
        try:
            client.health()
        except EngineUnavailableError as exc:
            raise self._with_exit_note(exc) from exc

    def revision(self) -> str | None:
        """The revision OPA reports active (``?provenance=true``).

        Raises:
            EngineUnavailableError: Not running or unreachable.
            DecisionError: Malformed answer.
        """
        client = self._client
        if client is None:
            raise EngineUnavailableError("the managed OPA sidecar is not running", hint="call start() first")
        try:
            return client.revision()
        except EngineUnavailableError as exc:
            raise self._with_exit_note(exc) from exc

    # --- bundles ------------------------------------------------------------------------------

    def activate(self, bundle_bytes: bytes, revision: str, timeout_s: float | None = None) -> None:
        """Publish a new bundle and wait until OPA serves its revision.

        If OPA refuses it (bad signature, unsigned, does not compile), OPA keeps the previous
        bundle, and so does the bundle server: the previous bundle is published again so OPA
        stops retrying the refused one.

        Args:
            bundle_bytes: The new signed bundle.
            revision: Its manifest revision.
            timeout_s: Deadline; ``ManagedConfig.activation_timeout_s`` when not given.

        Raises:
            PolicyError: OPA refused the bundle; the message carries OPA's reason.
            EngineUnavailableError: Not running, OPA died, or no verdict in time.
            ValueError: Empty or oversized bundle, or a revision unusable as an ETag.
        """
        if not bundle_bytes or len(bundle_bytes) > self.managed.max_bundle_bytes:
            raise ValueError(
                f"bundle must be 1..{self.managed.max_bundle_bytes} bytes, got {len(bundle_bytes)}"
            )
        with self._lock:
            server, previous = self._server, self._active
            if server is None or self._client is None or previous is None:
                raise EngineUnavailableError(
                    "the managed OPA sidecar is not running", hint="call start() first"
                )
            if revision == previous[1]:
                # already active. Other bytes under the same revision are the same policy (the
                # revision hashes every policy and data file): a rebuild signs anew (ES256 is
                # randomised). OPA keeps the bundle it verified; offering the new bytes would
                # only look active at once, whatever OPA made of them.
                return
            published = server.publish(bundle_bytes, revision)
            deadline = time.monotonic() + (timeout_s or self.managed.activation_timeout_s)
            try:
                self._wait_active(revision, published.generation, deadline, require_health=False)
            except BaseException:
                # the refused (or late) bundle must not stay on offer; OPA converges back
                with contextlib.suppress(RuntimeError):
                    server.publish(*previous)
                raise
            self._active = (bytes(bundle_bytes), revision)

    @property
    def active_revision(self) -> str | None:
        """The revision this sidecar last confirmed active (None when not running)."""
        active = self._active
        return active[1] if active else None

    @property
    def bundle_server(self) -> BundleServer | None:
        """The bundle service OPA pulls from (status report, decision logs)."""
        return self._server

    @property
    def url(self) -> str:
        """Where OPA listens, for messages: ``unix:<socket path>`` (empty when not running)."""
        if self._socket is not None:
            return f"unix:{self._socket}"
        return ""

    @property
    def tcp_url(self) -> str:
        """OPA's loopback URL with ``ManagedConfig.also_tcp``, else empty."""
        return f"http://127.0.0.1:{self._port}" if self._port else ""

    @property
    def connection(self) -> ConnectionConfig:
        """How a client reaches this OPA, as agov's own client does.

        Raises:
            EngineUnavailableError: the sidecar is not running.
        """
        proc = self._proc
        if self._socket_address is None or proc is None:
            raise EngineUnavailableError("the managed OPA sidecar is not running")
        # only this OPA may answer on the socket path (SO_PEERCRED is checked at each connect)
        return ConnectionConfig(
            url="http://localhost", unix_socket=self._socket_address, socket_owner_pid=proc.pid
        )

    @property
    def pid(self) -> int | None:
        """The OPA process id while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def stderr_tail(self) -> str:
        """The last ``stderr_tail_bytes`` of OPA's stderr."""
        if self._tmp is None:
            return ""
        try:
            with open(self._tmp / "opa.stderr", "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - self.managed.stderr_tail_bytes))
                return f.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""

    # --- internals ----------------------------------------------------------------------------

    def _start_locked(self) -> None:
        opa = self._opa_bin or find_opa()
        sweep_orphaned_dirs(Path(tempfile.gettempdir()))
        self._tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX))  # mode 0700: the config holds a token
        self._owner_fd = claim_dir(self._tmp)
        self._server = BundleServer(
            BundleServerConfig(
                bundle_name=self.config.bundle_name,
                max_wait_s=float(self.managed.long_polling_timeout_s) + 5.0,
                kept_log_events=self.managed.kept_log_events,
            )
        )
        bundle_bytes, revision = self._initial
        published = self._server.publish(bundle_bytes, revision)
        config_path = self._tmp / "opa-config.yaml"
        _write_private(config_path, yaml.safe_dump(self._opa_config(self._server), sort_keys=True))
        deadline = time.monotonic() + self.managed.startup_timeout_s
        self._socket = self._tmp / _SOCKET_NAME
        self._socket_address = self._socket_address_of(self._tmp)
        for attempt in range(3):
            self._socket.unlink(missing_ok=True)  # left by an OPA killed in a previous attempt
            self._port = _free_port() if self.managed.also_tcp else 0
            self._spawn(opa, config_path)
            self._client = DecisionClient(self.connection, self.config)
            try:
                self._wait_active(revision, published.generation, deadline, require_health=True)
            except EngineUnavailableError:
                # another process took the free port between our probe and OPA's bind
                if attempt < 2 and _ADDR_IN_USE in self.stderr_tail() and self._exited():
                    self._kill_process()
                    continue
                raise
            self._active = (bundle_bytes, revision)
            return

    def _opa_config(self, server: BundleServer) -> dict[str, Any]:
        m = self.managed
        return {
            "services": {
                _SERVICE: {"url": server.url, "credentials": {"bearer": {"token": server.token}}},
            },
            "bundles": {
                self.config.bundle_name: {
                    "service": _SERVICE,
                    "resource": server.resource,
                    "persist": False,
                    "size_limit_bytes": m.max_bundle_bytes,
                    "polling": {
                        "min_delay_seconds": m.polling_min_delay_s,
                        "max_delay_seconds": m.polling_max_delay_s,
                        "long_polling_timeout_seconds": m.long_polling_timeout_s,
                    },
                    # (R15) always set: without a keyid OPA accepts unsigned bundles
                    "signing": {"keyid": self._keyid},
                },
            },
            "keys": {self._keyid: {"algorithm": "ES256", "key": self._key_pem}},
            "status": {"service": _SERVICE},
            "decision_logs": {
                "service": _SERVICE,
                "reporting": {
                    "min_delay_seconds": m.decision_log_min_delay_s,
                    "max_delay_seconds": m.decision_log_max_delay_s,
                    "buffer_size_limit_bytes": m.decision_log_buffer_bytes,
                    "upload_size_limit_bytes": m.decision_log_upload_bytes,
                },
            },
        }

    def _opa_environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.managed.gogc is not None and not env.get("GOGC"):  # an operator's GOGC wins
            env["GOGC"] = str(self.managed.gogc)
        return env

    def _socket_address_of(self, directory: Path) -> Path:
        """The path agov connects to the socket by: its own, or, when that is too long for a
        socket address, the same name through a descriptor of the directory.

        Raises:
            EngineUnavailableError: the path is too long and there is no ``/proc/self/fd``.
        """
        path = directory / _SOCKET_NAME
        if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
            return path
        if not os.path.isdir("/proc/self/fd"):
            raise EngineUnavailableError(
                f"cannot start OPA: its socket path {path} is too long for a Unix socket",
                hint="set TMPDIR to a shorter directory",
            )
        self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        return Path(f"/proc/self/fd/{self._dir_fd}/{_SOCKET_NAME}")

    def _addresses(self) -> list[str]:
        # relative to OPA's cwd, its 0700 working directory: only the owner may connect
        addresses = ["--addr", f"unix://{_SOCKET_NAME}", "--unix-socket-perm", "600"]
        if self._port:
            addresses += ["--addr", f"127.0.0.1:{self._port}"]
        return addresses

    def _spawn(self, opa: Path, config_path: Path) -> None:
        assert self._tmp is not None
        if self._stderr is None:
            self._stderr = open(self._tmp / "opa.stderr", "ab")  # noqa: SIM115 - closed in stop
        argv = [
            str(opa),
            "run",
            "--server",
            *self._addresses(),
            "--config-file",
            str(config_path),
            "--log-level",
            "error",
            "--skip-version-check",  # no call to GitHub at every start
            "--shutdown-grace-period",
            str(max(1, int(self.managed.stop_grace_s))),
            # beside the bundle, outside its roots: keeps revalidation specs out of decision logs
            str(DECISION_LOG_MASK),
        ]
        stderr = self._stderr
        handoff: queue.Queue[subprocess.Popen[bytes] | BaseException] = queue.Queue(maxsize=1)
        release = threading.Event()

        def keeper() -> None:
            # PR_SET_PDEATHSIG fires when the forking *thread* exits, so this thread forks
            # OPA and then lives until stop() has reaped it
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=stderr,
                    env=self._opa_environment(),
                    cwd=self._tmp,
                    close_fds=True,
                    start_new_session=True,
                    preexec_fn=pdeathsig_preexec(),
                )
            except BaseException as exc:
                handoff.put(exc)
                return
            handoff.put(proc)
            release.wait()

        thread = threading.Thread(target=keeper, name="agov-opa-keeper", daemon=True)
        thread.start()
        got = handoff.get()
        if isinstance(got, BaseException):
            raise EngineUnavailableError(f"cannot start {opa}: {got}") from got
        self._proc, self._keeper, self._keeper_release = got, thread, release

    def _wait_active(self, revision: str, generation: int, deadline: float, *, require_health: bool) -> None:
        """Wait until OPA serves ``revision``; fail fast if it dies or refuses the bundle."""
        server, client = self._server, self._client
        assert server is not None and client is not None
        last_error: Exception | None = None
        while True:
            if self._stopping.is_set():
                raise EngineUnavailableError("the managed OPA sidecar is stopping")
            note = self._exit_note()
            if note is not None:
                raise EngineUnavailableError(f"OPA exited while loading revision {revision!r}: {note}")
            try:
                if client.revision() == revision:
                    if require_health:
                        client.health()
                    return
            except WrongListenerError:
                raise  # OPA runs, but not as the process agov started (a wrapper that forks it)
            except (EngineUnavailableError, DecisionError) as exc:
                last_error = exc  # not listening yet, or not ready
            # OPA downloads a bundle again only after refusing it (its ETag cache is cleared)
            if server.times_served(generation) >= 2:
                raise PolicyError(
                    f"OPA refused bundle revision {revision!r}: {self._bundle_error()}; "
                    f"it keeps serving {self._serving()}",
                    hint="is the bundle signed with the configured key and key id, and unmodified?",
                )
            if time.monotonic() >= deadline:
                detail = (
                    f" (last probe: {last_error.message})"
                    if isinstance(last_error, EngineUnavailableError | DecisionError)
                    else ""
                )
                raise EngineUnavailableError(
                    f"OPA did not activate revision {revision!r} in time{detail}; "
                    f"bundle status: {self._bundle_error()}; stderr: {self.stderr_tail() or '(empty)'}",
                    hint="run `opa run --server` with the generated config by hand to see why",
                )
            server.wait_for(lambda: server.times_served(generation) >= 2, self.managed.probe_interval_s)

    def _bundle_error(self) -> str:
        """OPA's own account of the bundle: code and message from its status."""
        status: dict[str, Any] | None = None
        client = self._client
        if client is not None:
            with contextlib.suppress(EngineUnavailableError, DecisionError):
                status = client.status()
        if status is None and self._server is not None:
            status = self._server.last_status()
        bundles = (status or {}).get("bundles")
        entry = bundles.get(self.config.bundle_name) if isinstance(bundles, dict) else None
        if not isinstance(entry, dict):
            return "no status reported"
        code, message = entry.get("code"), entry.get("message")
        errors = entry.get("errors")
        if not code and not message:
            return f"no error reported (active revision {entry.get('active_revision')!r})"
        extra = f" {errors}" if errors else ""
        return f"{code}: {message}{extra}"

    def _serving(self) -> str:
        revision = self._revision_or_none()
        return "no revision (no bundle is active)" if revision is None else f"revision {revision!r}"

    def _revision_or_none(self) -> str | None:
        client = self._client
        if client is None:
            return None
        try:
            return client.revision()
        except (EngineUnavailableError, DecisionError):
            return None

    def exit_note(self) -> str | None:
        """How OPA ended (exit code, stderr tail) if it exited on its own; None while it runs,
        and once stopped."""
        return self._exit_note()

    def _exited(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is not None

    def _exit_note(self, wait_s: float = 0.0) -> str | None:
        """None while OPA runs; else its exit code and stderr tail.

        ``wait_s`` lets a dying process finish: a killed Go process shows as a zombie in
        ``/proc`` while its threads still exit, and cannot be reaped until they have.
        """
        proc = self._proc
        if proc is None:
            return None
        if wait_s > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait_s)
        if proc.poll() is None:
            return None
        return f"exit code {proc.returncode}; stderr: {self.stderr_tail() or '(empty)'}"

    def _with_exit_note(self, exc: EngineUnavailableError) -> EngineUnavailableError:
        # a refused or reset connection, or a socket OPA removed as it exited, may mean OPA just
        # died: give it a moment to be reaped
        dropped = isinstance(exc.__cause__, ConnectionError | FileNotFoundError)
        note = self._exit_note(wait_s=0.2 if dropped else 0.0)
        if note is None:
            return exc
        return EngineUnavailableError(f"{exc.message}: the OPA process died ({note})", hint=exc.hint)

    def _kill_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            # OPA leads a process group of its own (start_new_session): signalling the group also
            # stops an opa that a wrapper AGOV_OPA_BIN forked, which would otherwise outlive it.
            # The group is signalled only while its leader is not reaped: until then no other
            # process can be given its id.
            _signal_group(proc.pid, signal.SIGTERM)
            if _exited_unreaped(proc.pid, self.managed.stop_grace_s) is not None:
                _signal_group(proc.pid, signal.SIGKILL)  # whatever of the group is left
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self._keeper_release.set()
        if self._keeper is not None:
            self._keeper.join(timeout=1)
            self._keeper = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def _stop_locked(self) -> None:
        try:
            try:
                self._kill_process()
            finally:  # also after a Ctrl-C while waiting for OPA to exit: it was signalled
                self._active = None
                if self._server is not None:
                    self._server.close()
                    self._server = None
                if self._stderr is not None:
                    self._stderr.close()
                    self._stderr = None
                if self._tmp is not None:
                    shutil.rmtree(self._tmp, ignore_errors=True)
                    self._tmp = None
        finally:  # the descriptors whatever failed above: a next start() must not leak them
            for fd in (self._owner_fd, self._dir_fd):
                if fd is not None:
                    os.close(fd)
            self._owner_fd = self._dir_fd = None
            self._socket = self._socket_address = None
            self._port = 0
            atexit.unregister(self._atexit_stop)

    def _atexit_stop(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    # gone: none of it is left; not permitted: none of it is ours any more
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _exited_unreaped(pid: int, wait_s: float) -> bool | None:
    """Wait up to ``wait_s`` for child ``pid`` to exit, leaving it unreaped (so its pid, and the
    id of the group it leads, stay taken). True: it exited; False: it still runs; None: it was
    reaped already (elsewhere), and its ids may belong to another process by now."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return None
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def sweep_orphaned_dirs(tmp_root: Path) -> list[Path]:
    """Remove the working directories that agov processes killed outright (SIGKILL, OOM) left:
    each managed sidecar claims its own for as long as it runs (:mod:`agov.tempdirs`). Never
    raises.

    Returns:
        The directories removed.
    """
    return sweep_orphaned(tmp_root, _TMP_PREFIX)


def _check_es256_public_key(pem: str | bytes) -> str:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyMaterialError(f"the bundle verification key is not a PEM public key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyMaterialError(
            "the bundle verification key must be an ECDSA P-256 public key (ES256)",
            hint="OPA bundles have no EdDSA; sign them with an ES256 key",
        )
    return data.decode("ascii")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
