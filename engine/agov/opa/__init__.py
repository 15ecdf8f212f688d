"""OPA adapters: the ``Evaluator`` port, a managed sidecar, an external one, and the pieces.

Every evaluation fails closed: faults raise ``EngineUnavailableError`` or ``DecisionError``.
"""

from __future__ import annotations

from agov.opa.binary import ENV_OPA_BIN, find_opa, opa_version
from agov.opa.bundle_server import BUNDLE_CONTENT_TYPE, BundleServer, BundleServerConfig, PublishedBundle
from agov.opa.evaluator import Evaluator, EvaluatorConfig
from agov.opa.external import ENV_OPA_TOKEN, ENV_OPA_URL, ExternalSidecar
from agov.opa.http import ConnectionConfig, DecisionClient, Reply, require_bool
from agov.opa.managed import ManagedConfig, ManagedSidecar

__all__ = [
    "BUNDLE_CONTENT_TYPE",
    "ENV_OPA_BIN",
    "ENV_OPA_TOKEN",
    "ENV_OPA_URL",
    "BundleServer",
    "BundleServerConfig",
    "ConnectionConfig",
    "DecisionClient",
    "Evaluator",
    "EvaluatorConfig",
    "ExternalSidecar",
    "ManagedConfig",
    "ManagedSidecar",
    "PublishedBundle",
    "Reply",
    "find_opa",
    "opa_version",
    "require_bool",
]
