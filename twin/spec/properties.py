"""A DeviceModel's property declarations: does a value fit one (type, enum, range)?

Asked by the reference checks (desired values), scene steps (set_desired), the ledger and the
control service (a command's value), the Modbus server (a register write).
"""

from __future__ import annotations

import math
from typing import Any


def value_problem(value: Any, decl: dict[str, Any]) -> str | None:
    """Why ``value`` does not fit a property declaration (type, enum, range), or None."""
    t = decl.get("type")
    ok = {
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "string": isinstance(value, str),
    }.get(str(t), True)
    if not ok:
        return f"{value!r} is not of type {t}"
    if "enum" in decl and value not in decl["enum"]:
        return f"{value!r} is not one of {', '.join(map(repr, decl['enum']))}"
    if isinstance(value, int | float) and not isinstance(value, bool):
        lo, hi = decl.get("min"), decl.get("max")
        if lo is not None and value < lo:
            return f"{value!r} is below the minimum {lo}"
        if hi is not None and value > hi:
            return f"{value!r} is above the maximum {hi}"
        if isinstance(value, float) and math.isnan(value):
            return "NaN is not a value"
    return None
