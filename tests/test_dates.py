"""RFC 3339 datetimes and intervals: one parser for 'mpsclip search --datetime', POST /search and the shards' column."""

from __future__ import annotations

import argparse
from datetime import datetime, timedelta, timezone

import pytest

from mpsclip.archive.dates import (
    DateError,
    format_datetime,
    interval_arg,
    parse_datetime,
    parse_interval,
)

UTC = timezone.utc  # noqa: UP017 - the project supports Python 3.10


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def test_datetimes_are_utc_and_round_trip() -> None:
    assert parse_datetime("2024-05-01T10:20:30Z") == utc(2024, 5, 1, 10, 20, 30)
    assert parse_datetime("2024-05-01t12:20:30.25+02:00") == utc(2024, 5, 1, 10, 20, 30, 250000)
    assert parse_datetime("2024-05-01 00:20:30-01:30") == utc(2024, 5, 1, 1, 50, 30)
    assert parse_datetime("2024-05-01T10:20:30.123456789Z") == utc(2024, 5, 1, 10, 20, 30, 123456)  # to the µs
    assert format_datetime(utc(2024, 5, 1, 10, 20, 30)) == "2024-05-01T10:20:30Z"
    assert format_datetime(parse_datetime("2024-05-01T12:20:30.25+02:00")) == "2024-05-01T10:20:30.250000Z"


@pytest.mark.parametrize(
    ("text", "start", "stop"),
    [
        ("2024-05-01/2024-05-31", utc(2024, 5, 1), utc(2024, 6, 1)),  # a date END includes its whole day
        ("2024-05-01", utc(2024, 5, 1), utc(2024, 5, 2)),
        ("2024-05-01T10:20:30Z", utc(2024, 5, 1, 10, 20, 30), utc(2024, 5, 1, 10, 20, 30, 1)),
        ("2024-05-01T10:00:00Z/..", utc(2024, 5, 1, 10), None),
        ("../2024-05-01T10:00:00+02:00", None, utc(2024, 5, 1, 8) + timedelta(microseconds=1)),
        ("/2024-12-31", None, utc(2025, 1, 1)),  # an empty end is open too (OGC API - Features)
        ("2024-05-01/", utc(2024, 5, 1), None),
        ("../..", None, None),  # every dated item
        ("2024-05-01T10:00:00Z/2024-05-01T10:00:00Z", utc(2024, 5, 1, 10), utc(2024, 5, 1, 10, 0, 0, 1)),
    ],
)
def test_intervals(text: str, start: datetime | None, stop: datetime | None) -> None:
    interval = parse_interval(text)
    assert (interval.start, interval.stop) == (start, stop)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("2024-13-01", "'2024-13-01': month must be in 1..12"),
        ("2024-02-30T00:00:00Z", "day is out of range for month"),
        ("2024-05-01T10:00:00", "no time offset; add Z for UTC"),
        ("2024-05-01T10:00:60Z", "leap seconds"),
        ("2024-05-01T10:00:00+25:00", "time offset +25:00: hours must be 00..23"),
        ("May 1st", "'May 1st': not a datetime such as 2024-05-01T10:20:30Z or a date such as 2024-05-01"),
        ("2024/05/01", "expected START/END, a datetime or a date, got 2 slashes"),
        ("2024-06-01/2024-05-01", "START 2024-06-01 is after END 2024-05-01"),
        ("..", "expected START/END"),
        ("", "expected START/END"),
    ],
)
def test_bad_intervals_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(DateError) as err:
        parse_interval(text)
    assert says in str(err.value)


def test_argparse_type() -> None:
    assert interval_arg("2024-05-01").start == utc(2024, 5, 1)
    with pytest.raises(argparse.ArgumentTypeError, match="month must be in 1..12"):
        interval_arg("2024-13-01")
