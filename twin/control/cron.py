"""Cron next-fire times in a site's time zone, with defined behaviour across DST changes.

Cron fields are matched against *local wall time*. Two cases need a rule:

* **Spring forward** (a local time that does not exist, e.g. 02:30 in Berlin on the last
  Sunday of March): it fires at the instant the wall time maps to with the offset before the
  change (02:30 CET → 03:30 CEST). Times that collapse onto one instant fire once.
* **Fall back** (a local time that happens twice): it fires on the first occurrence only —
  unless the hour field is ``*`` (the expression is periodic in real time, "every 15 minutes"),
  in which case it fires on both.

Fire times are strictly increasing; a daily job fires exactly once per local day.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from functools import lru_cache

from croniter import croniter

UTC = dt.UTC


@lru_cache(maxsize=256)
def tzinfo(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)


def valid_cron(expr: str) -> bool:
    return isinstance(expr, str) and len(expr.split()) == 5 and croniter.is_valid(expr)


def _hour_wildcard(expr: str) -> bool:
    return expr.split()[1] == "*"


def local_instants(naive: dt.datetime, tz: dt.tzinfo, both_folds: bool) -> list[float]:
    """The unix instants at which a matching local wall time ``naive`` fires."""
    a0 = naive.replace(tzinfo=tz, fold=0)
    back = a0.astimezone(UTC).astimezone(tz).replace(tzinfo=None)
    if back != naive:  # does not exist (spring forward)
        return [a0.timestamp()]
    a1 = naive.replace(tzinfo=tz, fold=1)
    if a1.utcoffset() != a0.utcoffset():  # happens twice (fall back)
        return [a0.timestamp(), a1.timestamp()] if both_folds else [a0.timestamp()]
    return [a0.timestamp()]


def next_fire(expr: str, after: float, tz: str | dt.tzinfo) -> float:
    """The first fire time of ``expr`` strictly after ``after`` (unix seconds)."""
    zone = tzinfo(tz) if isinstance(tz, str) else tz
    both = _hour_wildcard(expr)
    local_after = dt.datetime.fromtimestamp(after, zone).replace(tzinfo=None)
    # start a few hours back: after a fall-back, wall times repeat
    it = croniter(expr, local_after - dt.timedelta(hours=3))
    best: float | None = None
    best_naive: dt.datetime | None = None
    for _ in range(100_000):
        naive = it.get_next(dt.datetime)
        if best_naive is not None and naive > best_naive + dt.timedelta(hours=3):
            break
        for instant in local_instants(naive, zone, both):
            if instant > after and (best is None or instant < best):
                best, best_naive = instant, naive
    if best is None:  # pragma: no cover - cron expressions always fire again
        raise ValueError(f"cron {expr!r} never fires after {after}")
    return best


def fires_between(expr: str, start: float, end: float, tz: str) -> list[float]:
    out: list[float] = []
    t = start
    while True:
        t = next_fire(expr, t, tz)
        if t > end:
            return out
        out.append(t)
