"""A store that cannot be opened says why in the hint: a read-only workspace is not a damaged one.

SQLite's WAL mode creates agov.db-wal and agov.db-shm beside the database even to read, so a
workspace on a read-only mount failed every command with "unable to open database file" and the
hint "check the path and its permissions", though the file itself was readable.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agov.errors import StoreError
from agov.store import sqlite as store_sqlite


def _open_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> sqlite3.Connection:
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(store_sqlite.sqlite3, "connect", refuse)


def _hint(path: Path) -> str:
    with pytest.raises(StoreError) as info:
        store_sqlite.Store(path).query("SELECT 1")
    assert info.value.message.startswith(f"cannot open the store {path}: unable to open database file")
    return info.value.hint


def test_a_read_only_file_system_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _open_fails(monkeypatch)
    real = os.statvfs
    monkeypatch.setattr(
        store_sqlite.os,
        "statvfs",
        lambda p: SimpleNamespace(f_flag=os.ST_RDONLY) if Path(p) == tmp_path else real(p),
    )
    hint = _hint(tmp_path / "agov.db")
    assert hint.startswith(f"{tmp_path} is on a read-only file system: agov writes agov.db and its -wal")
    assert hint.endswith("mount it read-write")


def test_a_directory_this_user_may_not_write_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _open_fails(monkeypatch)
    monkeypatch.setattr(store_sqlite.os, "access", lambda p, mode: Path(p) != tmp_path)
    assert _hint(tmp_path / "agov.db").startswith(f"this user may not write in {tmp_path}: ")


def test_otherwise_the_hint_is_the_general_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _open_fails(monkeypatch)
    assert _hint(tmp_path / "agov.db") == "check the path and its permissions"
