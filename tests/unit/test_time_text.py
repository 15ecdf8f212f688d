"""The text of a time, as the store and the proofs write it, is the same whether or not it was
cached: both caches take only plain UTC datetimes, because other datetimes can compare (and
hash) equal while they name other instants or print otherwise."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from agov import proofs
from agov.store.sqlite import iso


class _Stamp(datetime):
    """A datetime subclass: equal to a plain datetime of the same instant."""


def test_times_an_hour_apart_in_a_dst_fold_keep_their_own_text() -> None:
    # 2024-11-03 01:30 happens twice in New York; fold picks the second one. The two compare
    # equal and hash alike, so a cache keyed by them would give both the first one's text.
    first = datetime(2024, 11, 3, 1, 30, tzinfo=ZoneInfo("America/New_York"))
    second = first.replace(fold=1)
    assert first == second and hash(first) == hash(second)
    for _ in range(2):  # the second round would be answered from a cache
        assert iso(first) == "2024-11-03T05:30:00.000000+00:00"
        assert iso(second) == "2024-11-03T06:30:00.000000+00:00"
        assert proofs._format_time(first) == "2024-11-03T05:30:00Z"
        assert proofs._format_time(second) == "2024-11-03T06:30:00Z"


def test_equal_times_in_other_zones_and_types_print_their_utc_instant() -> None:
    utc = datetime(2025, 3, 1, 12, 0, 0, 250, tzinfo=UTC)
    same_instant = [
        utc.astimezone(timezone(timedelta(hours=2))),
        _Stamp(2025, 3, 1, 12, 0, 0, 250, tzinfo=UTC),
        utc,
    ]
    for when in same_instant + same_instant:
        assert iso(when) == "2025-03-01T12:00:00.000250+00:00"
        assert proofs._format_time(when) == "2025-03-01T12:00:00.000250Z"
    assert iso(None) is None
    assert proofs._format_time(utc.replace(microsecond=0)) == "2025-03-01T12:00:00Z"
