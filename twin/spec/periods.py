"""Report periods: named periods (``yesterday``, ``last_week``, ``month_to_date`` ...) and
explicit ``{start, end}`` resolved to ``[start, end)`` instants in a time zone.

Named periods are calendar periods of the *local* time zone, relative to "now": ``yesterday``
is local midnight to midnight (23 or 25 hours across a DST change), ``last_week`` is Monday
00:00 to Monday 00:00 of the previous ISO week, ``month_to_date`` runs from the 1st 00:00 to
now. ``last_24h`` and ``last_7d`` are rolling. Explicit dates are local midnights; an explicit
date-time without offset is local wall time.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from dataclasses import dataclass
from typing import Any

NAMED = (
    "today",
    "yesterday",
    "last_24h",
    "last_7d",
    "this_week",
    "last_week",
    "month_to_date",
    "last_month",
)
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True)
class Period:
    start: float  # unix seconds, inclusive
    end: float  # unix seconds, exclusive
    timezone: str
    label: str  # "yesterday", "2026-03-01..2026-03-08"

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def local(self, ts: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(ts, zoneinfo.ZoneInfo(self.timezone))

    def describe(self) -> str:
        """``2026-03-01 00:00 - 2026-03-02 00:00 (Europe/Berlin)`` (with an en dash)."""
        a, b = self.local(self.start), self.local(self.end)
        return f"{a:%Y-%m-%d %H:%M} \u2013 {b:%Y-%m-%d %H:%M} ({self.timezone})"

    def as_json(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "timezone": self.timezone,
            "label": self.label,
            "text": self.describe(),
        }


def _midnight(day: dt.date, tz: dt.tzinfo) -> float:
    return dt.datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()


def parse_instant(text: str, tz: str) -> float:
    """``2026-03-01`` (local midnight), ``2026-03-01T06:00`` (local) or with an offset."""
    zone = zoneinfo.ZoneInfo(tz)
    text = str(text).strip()
    if _DATE.match(text):
        return _midnight(dt.date.fromisoformat(text), zone)
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=zone)
    return value.timestamp()


def resolve_period(period: Any, tz: str, now: float) -> Period:
    """``period`` (a name, ``{start, end}`` or ``"START..END"``) as instants; ValueError when
    it is none of these."""
    zone = zoneinfo.ZoneInfo(tz)
    if isinstance(period, dict):
        start, end = parse_instant(period["start"], tz), parse_instant(period["end"], tz)
        label = f"{period['start']}..{period['end']}"
    elif isinstance(period, str) and ".." in period:
        a, b = period.split("..", 1)
        start, end = parse_instant(a, tz), parse_instant(b, tz)
        label = period
    else:
        name = str(period or "yesterday")
        today = dt.datetime.fromtimestamp(now, zone).date()
        monday = today - dt.timedelta(days=today.weekday())
        first = today.replace(day=1)
        if name == "today":
            start, end = _midnight(today, zone), now
        elif name == "yesterday":
            start, end = _midnight(today - dt.timedelta(days=1), zone), _midnight(today, zone)
        elif name == "last_24h":
            start, end = now - 86400, now
        elif name == "last_7d":
            start, end = now - 7 * 86400, now
        elif name == "this_week":
            start, end = _midnight(monday, zone), now
        elif name == "last_week":
            start = _midnight(monday - dt.timedelta(days=7), zone)
            end = _midnight(monday, zone)
        elif name == "month_to_date":
            start, end = _midnight(first, zone), now
        elif name == "last_month":
            prev = (first - dt.timedelta(days=1)).replace(day=1)
            start, end = _midnight(prev, zone), _midnight(first, zone)
        else:
            raise ValueError(
                f"unknown period {name!r}: use one of {', '.join(NAMED)} or START..END "
                "(2026-03-01..2026-03-08)"
            )
        label = name
    if end <= start:
        raise ValueError(f"period {label!r} is empty (it ends before it starts)")
    return Period(start, end, tz, label)


__all__ = ["NAMED", "Period", "parse_instant", "resolve_period"]
