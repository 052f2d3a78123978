"""Durations, sizes and other small value syntaxes, parsed in one place.

Durations: ``500ms``, ``10s``, ``5m``, ``2h``, ``7d``, ``1w``, compound ``1h30m``, a bare number
(seconds), or ``inf`` (forever, returned as ``math.inf``).
"""

from __future__ import annotations

import math
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_WHOLE = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+$")

DURATION_PATTERN = r"^(inf|(\d+(\.\d+)?(ms|s|m|h|d|w))+|\d+(\.\d+)?)$"
"""The JSON Schema ``pattern`` for a duration string (numbers are also accepted by schemas)."""


def parse_duration(value: str | int | float, *, allow_inf: bool = False) -> float:
    """Return seconds for a duration; raise ``ValueError`` with a readable message."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        if value < 0 or math.isnan(value):
            raise ValueError(f"{value!r} is not a duration (must be >= 0)")
        return float(value)
    text = value.strip()
    if text in ("inf", "forever"):
        if allow_inf:
            return math.inf
        raise ValueError(f"{value!r} is not allowed here (a finite duration is needed)")
    try:
        return float(text)
    except ValueError:
        pass
    if not _WHOLE.match(text):
        raise ValueError(f"{value!r} is not a duration (use e.g. 500ms, 10s, 5m, 2h, 7d)")
    return sum(float(n) * _UNITS[u] for n, u in _PART.findall(text))


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of a duration (``90`` → ``1m30s``)."""
    if math.isinf(seconds):
        return "inf"
    ms_total = round(seconds * 1000)
    if ms_total == 0:
        return "0s"
    out = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        n, ms_total = divmod(ms_total, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)
