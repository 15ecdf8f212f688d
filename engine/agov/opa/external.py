"""An OPA sidecar that someone else runs (a deployment), reached by URL."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from agov.decisions import Evaluation
from agov.errors import UsageError
from agov.opa.evaluator import EncodedInput, EvaluatorConfig
from agov.opa.http import ConnectionConfig, DecisionClient

ENV_OPA_URL = "AGOV_OPA_URL"
ENV_OPA_TOKEN = "AGOV_OPA_TOKEN"
ENV_OPA_CA_FILE = "AGOV_OPA_CA_FILE"
ENV_OPA_CLIENT_CERT = "AGOV_OPA_CLIENT_CERT"
ENV_OPA_CLIENT_KEY = "AGOV_OPA_CLIENT_KEY"


class OpaSettings(Protocol):
    """The OPA connection fields of a workspace config (``agov.config.Config`` has them)."""

    @property
    def opa_url(self) -> str | None: ...

    @property
    def opa_token(self) -> str | None: ...

    @property
    def opa_ca_file(self) -> str | None: ...

    @property
    def opa_client_cert(self) -> str | None: ...

    @property
    def opa_client_key(self) -> str | None: ...


class ExternalSidecar:
    """Implements :class:`~agov.opa.evaluator.Evaluator` for a user-run OPA.

    The OPA must load the agov bundle under the configured bundle name, with signature
    verification on (``keys:`` and ``bundles.<name>.signing.keyid``), and should enable
    decision logging so that answers carry a ``decision_id``. If it runs with
    ``--authorization=basic``, its ``system.authz`` policy must allow the data paths agov
    queries and ``system/agov_revision_probe`` (the revision probe).
    """

    def __init__(self, connection: ConnectionConfig, config: EvaluatorConfig | None = None) -> None:
        """Prepare the client; nothing is contacted until the first call.

        Args:
            connection: URL, bearer token and TLS material.
            config: Deadlines and limits.

        Raises:
            EngineUnavailableError: TLS material could not be loaded.
        """
        self.connection = connection
        self.config = config or EvaluatorConfig()
        self._client = DecisionClient(connection, self.config)

    @classmethod
    def from_config(
        cls,
        settings: OpaSettings,
        config: EvaluatorConfig | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> ExternalSidecar:
        """Build from a workspace config; each ``AGOV_OPA_*`` variable that is set wins.

        Args:
            settings: ``opa_url``, ``opa_token``, ``opa_ca_file``, ``opa_client_cert``,
                ``opa_client_key``.
            config: Deadlines and limits.
            environ: The environment to read (``os.environ`` when not given).

        Returns:
            The sidecar client.

        Raises:
            UsageError: No URL in either place, or inconsistent settings.
            EngineUnavailableError: TLS material could not be loaded.
        """
        env = dict(os.environ if environ is None else environ)
        for name, value in (
            (ENV_OPA_URL, settings.opa_url),
            (ENV_OPA_TOKEN, settings.opa_token),
            (ENV_OPA_CA_FILE, settings.opa_ca_file),
            (ENV_OPA_CLIENT_CERT, settings.opa_client_cert),
            (ENV_OPA_CLIENT_KEY, settings.opa_client_key),
        ):
            if value and not env.get(name):
                env[name] = value
        return cls.from_env(config, env)

    @classmethod
    def from_env(
        cls, config: EvaluatorConfig | None = None, environ: Mapping[str, str] | None = None
    ) -> ExternalSidecar:
        """Build from ``AGOV_OPA_URL``, ``AGOV_OPA_TOKEN``, ``AGOV_OPA_CA_FILE``,
        ``AGOV_OPA_CLIENT_CERT`` and ``AGOV_OPA_CLIENT_KEY``.

        Args:
            config: Deadlines and limits.
            environ: The environment to read (``os.environ`` when not given).

        Returns:
            The sidecar client.

        Raises:
            UsageError: ``AGOV_OPA_URL`` is missing, or the settings are inconsistent.
            EngineUnavailableError: TLS material could not be loaded.
        """
        env = os.environ if environ is None else environ
        url = env.get(ENV_OPA_URL, "").strip()
        if not url:
            raise UsageError(
                f"{ENV_OPA_URL} is not set",
                hint="set it to the sidecar's URL, e.g. http://127.0.0.1:8181 or unix:///run/opa/opa.sock",
            )
        unix_socket: Path | None = None
        if url.startswith("unix:"):  # OPA's own notation: `opa run --server --addr unix:///path`
            unix_socket = _socket_path(url)
            url = "http://localhost"  # only the Host header of the requests

        def path(name: str) -> Path | None:
            value = env.get(name, "").strip()
            return Path(value).expanduser() if value else None

        try:
            connection = ConnectionConfig(
                url=url,
                token=env.get(ENV_OPA_TOKEN) or None,
                ca_file=path(ENV_OPA_CA_FILE),
                client_cert=path(ENV_OPA_CLIENT_CERT),
                client_key=path(ENV_OPA_CLIENT_KEY),
                unix_socket=unix_socket,
            )
        except ValueError as exc:
            raise UsageError(f"bad OPA connection settings: {exc}") from exc
        return cls(connection, config)

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
            EngineUnavailableError: Unreachable, slow, broken, or auth refused.
            DecisionError: The answer was unusable (undefined, malformed, wrong revision).
        """
        return self._client.evaluate(path, input, expected_revision=expected_revision, timeout_s=timeout_s)

    def health(self) -> None:
        """Check ``GET /health?bundles``.

        Raises:
            EngineUnavailableError: Not 200, or unreachable.
        """
        self._client.health()

    def revision(self) -> str | None:
        """The active revision of the configured bundle (``?provenance=true``).

        Raises:
            EngineUnavailableError: Unreachable, or the probe was refused.
            DecisionError: Malformed answer.
        """
        return self._client.revision()

    def close(self) -> None:
        """Close pooled connections. Idempotent."""
        self._client.close()

    def __enter__(self) -> ExternalSidecar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _socket_path(url: str) -> Path:
    """The socket path of a ``unix:///path`` URL, read as OPA reads its ``--addr``: the path
    percent-decoded.

    Raises:
        UsageError: no absolute path, or a host, query or fragment (OPA would drop those and
            bind another path than the one written).
    """
    parts = urllib.parse.urlsplit(url)
    path = urllib.parse.unquote(parts.path)
    if parts.netloc or parts.query or parts.fragment or not path.startswith("/") or path.endswith("/"):
        raise UsageError(
            f"bad OPA connection settings: {url!r} is not unix:// and an absolute socket path",
            hint="write it as OPA's --addr takes it, e.g. unix:///run/opa/opa.sock",
        )
    return Path(path)
