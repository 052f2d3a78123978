"""The value check every ingest edge runs before a device's data enters the engine.

Whatever a peer sends (an HTTP ingest body, an MQTT payload, a CoAP or Modbus frame, a
plugin's output) is checked here, at the edge, and refused there with a message that names the
point; nothing that fails these checks is passed inward::

    from twin.bindings.values import ValueRefused, check_reading

    try:
        point, value, ts = check_reading(point, value, ts)
    except ValueRefused as exc:  # HTTP: 422 {"detail": str(exc)}; MQTT 5: PUBACK 0x99
        ...

Rules (:class:`Limits` holds the bounds):

* **numbers** are finite (no NaN, no ±Infinity) and fit their machine type: a float is a finite
  float64, an int fits int64 (``1`` followed by 400 zeros is refused, not turned into ``inf``
  or an ``OverflowError`` deep inside the time-series writer); ``bool`` is a bool;
* **strings** are at most ``max_string`` characters and valid Unicode (a lone surrogate such as
  JSON's ``"\\ud800"`` cannot be encoded as UTF-8 and is refused);
* **lists and objects** (structured values, event data) nest at most ``max_depth`` deep and
  hold at most ``max_items`` elements in all; object keys are bounded strings;
* **point names** match :data:`POINT_RE` (letters, digits, ``_ . - : /``, up to
  ``max_point`` characters);
* **timestamps** are finite unix seconds between year 1 and 9999 (``datetime`` can hold them).

The functions are pure (no I/O, no state), cheap on the hot path (a float costs one type check
and one ``isfinite``) and raise :class:`ValueRefused` (a ``ValueError``) with one readable line.
The engine's device task runs :func:`is_safe` again on every message as a last line of defence
(a binding that forgot to check must not let a bad value through).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
TS_MIN = -62_135_596_800.0  # 0001-01-01T00:00:00Z
TS_MAX = 253_402_300_799.0  # 9999-12-31T23:59:59Z
POINT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]*")


@dataclass(frozen=True)
class Limits:
    max_string: int = 16_384  # characters in one string value
    max_depth: int = 16  # nesting of lists/objects inside one value
    max_items: int = 1_000  # elements of all lists/objects inside one value
    max_point: int = 128  # characters of a point name
    max_key: int = 256  # characters of an object key inside a value


DEFAULT_LIMITS = Limits()


class ValueRefused(ValueError):
    """A value (or point name, or timestamp) a peer sent is not acceptable.

    ``point`` names what was refused, ``reason`` says why; ``str()`` is one line for an HTTP
    422 ``detail``, an MQTT reason string or a log line."""

    def __init__(self, point: str, reason: str, what: str = "") -> None:
        self.point = point
        self.reason = reason
        super().__init__(f"point {point!r}: {what + ' ' if what else ''}{reason}")


def _printable(text: str, limit: int = 80) -> str:
    """``text`` safe to put in a message (lone surrogates escaped, cut to ``limit``)."""
    out = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return out if len(out) <= limit else out[:limit] + "..."


_GOOD_POINTS: set[str] = set()
"""Point names :func:`check_point` accepted under ``DEFAULT_LIMITS`` (a device sends the same
few names in every message: a set lookup instead of the regular expression each time);
emptied when it reaches ``_GOOD_POINTS_MAX`` (names come from peers)."""
_GOOD_POINTS_MAX = 100_000


def check_point(point: Any, limits: Limits = DEFAULT_LIMITS) -> str:
    """A valid point name, or ValueRefused."""
    if type(point) is str and point in _GOOD_POINTS and limits is DEFAULT_LIMITS:
        return point
    if not isinstance(point, str):
        raise ValueRefused(str(point)[:80], "a point name must be a string")
    if not point or len(point) > limits.max_point or not POINT_RE.fullmatch(point):
        raise ValueRefused(
            _printable(point),
            f"invalid point name (1-{limits.max_point} characters: letters, digits, _ . - : /)",
        )
    if limits is DEFAULT_LIMITS and type(point) is str:
        if len(_GOOD_POINTS) >= _GOOD_POINTS_MAX:
            _GOOD_POINTS.clear()
        _GOOD_POINTS.add(point)
    return point


def check_ts(ts: Any, point: str = "ts") -> float:
    """Unix seconds as a float, or ValueRefused (non-numbers, NaN/±Inf, out of range); its
    ``reason`` reads after the field's name: ``ts must be a number (unix seconds), got str``."""
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise ValueRefused(point, f"must be a number (unix seconds), got {_kind(ts)}", "timestamp")
    if isinstance(ts, int) and not INT64_MIN <= ts <= INT64_MAX:
        raise ValueRefused(point, "must be unix seconds in years 1-9999", "timestamp")
    f = float(ts)
    if not math.isfinite(f):
        raise ValueRefused(point, f"must be a number (unix seconds), got {f!r}", "timestamp")
    if not TS_MIN <= f <= TS_MAX:
        raise ValueRefused(point, f"must be unix seconds in years 1-9999, got {f!r}", "timestamp")
    return f


def check_value(value: Any, point: str = "value", limits: Limits = DEFAULT_LIMITS) -> Any:
    """``value`` itself when acceptable (see the module docstring), else ValueRefused naming
    ``point``. ``None`` is accepted (a reading without a value, e.g. of quality ``bad``)."""
    t = type(value)
    if t is float:
        if math.isfinite(value):
            return value
        raise ValueRefused(point, f"number {value!r} is not finite")
    if t is bool or value is None:
        return value
    if t is int:
        if INT64_MIN <= value <= INT64_MAX:
            return value
        raise ValueRefused(point, f"integer {_number_text(value)} does not fit in 64 bits")
    if t is str:
        _check_str(value, point, limits.max_string)
        return value
    _check_nested(value, point, limits, 0, [0])
    return value


def check_reading(
    point: Any, value: Any, ts: Any = None, limits: Limits = DEFAULT_LIMITS
) -> tuple[str, Any, float | None]:
    """Point name, value and (optional) timestamp of one reading: ``(point, value, ts)``."""
    name = check_point(point, limits)
    return name, check_value(value, name, limits), None if ts is None else check_ts(ts, name)


def check_data(data: Mapping[str, Any], what: str, limits: Limits = DEFAULT_LIMITS) -> None:
    """Free structured data (an event's ``data``): bounded nesting, sizes and strings."""
    _check_nested(data, what, limits, 0, [0])


def check_shape(doc: Any, what: str, limits: Limits = DEFAULT_LIMITS) -> None:
    """Only the structure of a decoded document (nesting depth, element count, keys), not its
    leaf values: for a payload that is walked first and whose values are then checked one by
    one with :func:`check_reading`, so a refusal names the point the bad value belongs to."""
    _check_nested(doc, what, limits, 0, [0], leaves=False)


def is_safe(value: Any, limits: Limits = DEFAULT_LIMITS) -> bool:
    """True when :func:`check_value` accepts ``value`` (the inner layers' defensive check)."""
    t = type(value)
    if t is float:
        return math.isfinite(value)
    if t is bool or value is None:
        return True
    try:
        check_value(value, "value", limits)
    except ValueRefused:
        return False
    return True


# -- helpers -------------------------------------------------------------------------------------
def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _number_text(value: int | float) -> str:
    if isinstance(value, int) and value.bit_length() > 64:
        return f"of about {int(value.bit_length() * 0.30103) + 1} digits"
    return repr(value)


def _check_str(value: str, point: str, max_len: int) -> None:
    if len(value) > max_len:
        raise ValueRefused(point, f"string of {len(value)} characters (at most {max_len})")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueRefused(point, "string is not valid Unicode (lone surrogate)") from None


def _check_nested(
    value: Any, point: str, limits: Limits, depth: int, count: list[int], leaves: bool = True
) -> None:
    if not leaves and not isinstance(value, Mapping | list | tuple):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueRefused(point, f"number {value!r} is not finite")
        return
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise ValueRefused(point, f"integer {_number_text(value)} does not fit in 64 bits")
        return
    if isinstance(value, str):
        _check_str(value, point, limits.max_string)
        return
    if isinstance(value, Mapping):
        items: Any = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        raise ValueRefused(point, f"unsupported value type {_kind(value)}")
    if depth >= limits.max_depth:
        raise ValueRefused(point, f"nested more than {limits.max_depth} levels deep")
    count[0] += len(value)
    if count[0] > limits.max_items:
        raise ValueRefused(point, f"more than {limits.max_items} elements")
    for k, v in items:
        if isinstance(k, str):
            _check_str(k, point, limits.max_key)
        elif not isinstance(k, int):
            raise ValueRefused(point, f"object key of type {_kind(k)}")
        _check_nested(v, point, limits, depth + 1, count, leaves)


__all__ = [
    "DEFAULT_LIMITS",
    "INT64_MAX",
    "INT64_MIN",
    "POINT_RE",
    "Limits",
    "ValueRefused",
    "check_data",
    "check_point",
    "check_reading",
    "check_shape",
    "check_ts",
    "check_value",
    "is_safe",
]
