"""Persistence: the SQLite store (Postgres later, behind the same methods)."""

from agov.store.sqlite import AuditEvent, Store, Tx

__all__ = ["AuditEvent", "Store", "Tx"]
