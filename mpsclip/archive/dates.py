"""Item dates and the date intervals searches filter on, written as RFC 3339 (as STAC and OGC API - Features do).

A datetime has a time offset: ``2024-05-01T10:20:30Z``, ``2024-05-01T12:20:30.25+02:00`` (``t``, ``z`` and a space
for ``T`` are accepted, as RFC 3339 allows). A date alone, ``2024-05-01``, means that whole day in UTC.
An interval is ``START/END``, either end open as ``..`` or left empty (``2024-05-01/..``, ``../2024-06-30``), or a
single datetime or date (that instant, that day). Both ends are inclusive, and a date as END includes its whole day.
:class:`Interval` holds it half-open, ``[start, stop)`` in UTC, to the microsecond: the resolution of the stores'
``datetime`` column. Only the standard library is used, so CLI parsers can take these types without loading more.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

DATETIME = re.compile(
    r"(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})[Tt ](?P<h>\d{2}):(?P<mi>\d{2}):(?P<s>\d{2})(?P<frac>\.\d+)?"
    r"(?P<offset>[Zz]|[+-]\d{2}:\d{2})?"
)
DATE = re.compile(r"(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})")
OPEN = ("..", "")
EXAMPLES = "a datetime such as 2024-05-01T10:20:30Z or a date such as 2024-05-01"
MICROSECOND = timedelta(microseconds=1)
UTC = timezone.utc  # noqa: UP017 - datetime.UTC is Python 3.11+


class DateError(ValueError):
    """A date, datetime or interval that is not RFC 3339; the message says what is wrong and how it should look."""


def _offset(text: str) -> timezone:
    if text in ("Z", "z"):
        return UTC
    hours, minutes = int(text[1:3]), int(text[4:6])
    if hours > 23 or minutes > 59:
        raise DateError(f"time offset {text}: hours must be 00..23 and minutes 00..59")
    sign = -1 if text[0] == "-" else 1
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def parse_datetime(text: str) -> datetime:
    """An RFC 3339 datetime with a time offset, as an aware datetime in UTC (digits past microseconds dropped)."""
    match = DATETIME.fullmatch(text.strip())
    if match is None:
        raise DateError(f"{text!r}: not an RFC 3339 datetime; expected for example 2024-05-01T10:20:30Z")
    if match["offset"] is None:
        raise DateError(f"{text!r}: no time offset; add Z for UTC (2024-05-01T10:20:30Z) or +hh:mm")
    if match["s"] == "60":
        raise DateError(f"{text!r}: leap seconds (second 60) are not supported; use second 59")
    micro = int((match["frac"] or ".0")[1:7].ljust(6, "0"))
    try:
        local = datetime(int(match["y"]), int(match["mo"]), int(match["d"]), int(match["h"]), int(match["mi"]),
                         int(match["s"]), micro, tzinfo=_offset(match["offset"]))
    except ValueError as err:
        raise DateError(f"{text!r}: {err}") from err
    return local.astimezone(UTC)


def format_datetime(value: datetime) -> str:
    """``value`` in UTC as RFC 3339 with ``Z``: seconds, and microseconds only when there are some."""
    utc = value.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S") + (f".{utc.microsecond:06d}" if utc.microsecond else "") + "Z"


def _day(text: str) -> datetime | None:
    """Midnight UTC of a date-only ``text``, or None if ``text`` is not a bare date."""
    match = DATE.fullmatch(text.strip())
    if match is None:
        return None
    try:
        day = date(int(match["y"]), int(match["mo"]), int(match["d"]))
    except ValueError as err:
        raise DateError(f"{text!r}: {err}") from err
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _bounds(text: str) -> tuple[datetime, datetime]:
    """``[start, stop)`` of one datetime (that microsecond) or date (that day)."""
    day = _day(text)
    if day is not None:
        return day, day + timedelta(days=1)
    try:
        instant = parse_datetime(text)
    except DateError as err:
        if DATETIME.fullmatch(text.strip()) is None:
            raise DateError(f"{text!r}: not {EXAMPLES}") from err
        raise
    return instant, instant + MICROSECOND


@dataclass(frozen=True)
class Interval:
    """Datetimes ``start <= t < stop`` (UTC); None: open on that side."""

    start: datetime | None
    stop: datetime | None


def parse_interval(text: str) -> Interval:
    """``START/END`` (``..`` or nothing for an open end), a datetime or a date; see the module's docstring."""
    parts = text.strip().split("/")
    if len(parts) > 2:
        raise DateError(f"{text!r}: expected START/END, a datetime or a date, got {len(parts) - 1} slashes")
    if len(parts) == 1:
        if parts[0] in OPEN:
            raise DateError(f"{text!r}: expected START/END, {EXAMPLES}")
        start, stop = _bounds(parts[0])
        return Interval(start, stop)
    start = None if parts[0].strip() in OPEN else _bounds(parts[0])[0]
    stop = None if parts[1].strip() in OPEN else _bounds(parts[1])[1]
    if start is not None and stop is not None and start >= stop:
        raise DateError(f"{text!r}: START {parts[0]} is after END {parts[1]}")
    return Interval(start, stop)


def interval_arg(text: str) -> Interval:
    """:func:`parse_interval` as an argparse type (its error becomes a usage error naming the option)."""
    try:
        return parse_interval(text)
    except DateError as err:
        raise argparse.ArgumentTypeError(str(err)) from err

