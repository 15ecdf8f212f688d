"""Shared fixtures for tests that need no OPA."""

from __future__ import annotations

import copy
from typing import Any

import pytest

VALID_SPEC: dict[str, Any] = {
    "apiVersion": "agov/v1",
    "kind": "Agent",
    "metadata": {
        "id": "finance-reconciler-prod",
        "name": "Finance Reconciler",
        "workspace": "finance",
        "version": "1.0.0",
        "owner": "finance@example.com",
        "tags": ["finance"],
    },
    "spec": {
        "agent_type": "supervised",
        "role_class": "compliance",
        "anatomy": {
            "reasoning": {"model": "some-model", "temperature": 0.2},
            "inputs": [{"name": "ledger", "classification": "internal"}],
            "actions": [{"type": "database.query", "resource": "postgresql"}],
            "memory": {"kind": "none"},
        },
        "capabilities": ["database.query", "api.read"],
        "containment": {"external_calls": False, "persistent_writes": False},
        "economics": {"monthly_budget_usd": 200},
    },
}


@pytest.fixture
def valid_spec() -> dict[str, Any]:
    return copy.deepcopy(VALID_SPEC)
