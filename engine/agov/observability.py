"""Prometheus metrics (one registry per engine, no global state) and JSON decision log lines."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

decision_log = logging.getLogger("agov.decisions")
engine_log = logging.getLogger("agov.engine")


class Metrics:
    """The metrics of ARCHITECTURE.md, registered on a registry this engine owns."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.starts_allowed = Counter("agent_starts_allowed_total", "Admissions allowed.", registry=r)
        self.starts_denied = Counter(
            "agent_starts_denied_total", "Admissions denied.", ["reason"], registry=r
        )
        self.invalidations = Counter(
            "agent_invalidation_events_total", "Agents invalidated by revalidation.", registry=r
        )
        self.reload_success = Counter(
            "policy_reload_success_total",
            "Policy reloads that took effect: a new policy, or new org limits, now judges every agent.",
            registry=r,
        )
        self.reload_failure = Counter("policy_reload_failure_total", "Policy reloads refused.", registry=r)
        self.revalidation_stopped = Counter(
            "revalidation_stopped_total",
            "Revalidation runs stopped by an error before every agent was judged: an agent not yet"
            " judged is judged when it starts, until the next reload, serve or revalidate finishes"
            " the run.",
            registry=r,
        )
        self.starts_renewed = Counter(
            "agent_starts_renewed_total",
            "Starts of agents a revalidation run had not reached yet, judged at the start and"
            " re-signed under the active policy, which restores an invalidated one (each is also"
            " counted as allowed or denied).",
            registry=r,
        )
        self.promotion_attempts = Counter("promotion_attempts_total", "Promotion attempts.", registry=r)
        self.promotion_denies = Counter(
            "promotion_denies_total", "Promotions denied.", ["reason"], registry=r
        )
        self.decision_latency = Histogram(
            "agov_decision_latency_seconds",
            "Decision latency, engine side, by kind.",
            ["kind"],
            registry=r,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5),
        )
        # looked up once: admission runs at every start
        self.admission_latency = self.decision_latency.labels("admission")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and any ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        return json.dumps(line, sort_keys=True, default=str)


def log_decision(kind: str, code: str, **fields: Any) -> None:
    if decision_log.isEnabledFor(logging.INFO):
        decision_log.info(kind, extra={"fields": {"kind": kind, "code": code, **fields}})


def configure_logging(level: str = "WARNING") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("agov")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def monotonic() -> float:
    return time.perf_counter()
