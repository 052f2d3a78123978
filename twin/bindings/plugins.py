"""Plugins at the ingest edge: codecs (payload bytes -> readings) and transforms on readings.

What a plugin outputs is a peer's data like any other: every point name and value is checked
with :mod:`twin.bindings.values` before it becomes a :class:`Reading`. A value that is refused
there, and every reading of a batch whose plugin failed (trap, fuel, timeout, memory, ...),
becomes a reading of quality ``bad`` — the data path never stops for a plugin.

A device's transform is ``spec.transform`` of the Device, else of its DeviceModel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import trio

from twin.bindings.base import Quality, Reading
from twin.bindings.values import ValueRefused, check_reading, check_ts
from twin.plugins import registry as plugins

BAD_POINT = "payload"
"""Point of the bad reading a failed decode leaves (when the codec named none)."""


def transform_of(device_doc: Mapping[str, Any] | None, model_spec: Mapping[str, Any] | None) -> str | None:
    """The transform plugin of a device: its own ``spec.transform``, else its model's
    (``model_spec`` is the DeviceModel's ``spec``)."""
    spec = (device_doc or {}).get("spec") or {}
    name = spec.get("transform")
    if isinstance(name, str):
        return name
    name = (model_spec or {}).get("transform")
    return name if isinstance(name, str) else None


def _reading(device: str, point: str, value: Any, ts: float, good: bool) -> Reading:
    if not good:
        try:
            point = check_reading(point or BAD_POINT, None)[0]
        except ValueRefused:
            point = BAD_POINT
        return Reading(device, point, None, ts, Quality.BAD)
    try:
        point, value, _ = check_reading(point, value)
    except ValueRefused:
        try:
            point = check_reading(point, None)[0]
        except ValueRefused:
            point = BAD_POINT
        return Reading(device, point, None, ts, Quality.BAD)
    return Reading(device, point, value, ts)


def decode(codec: str, device: str, payloads: Sequence[bytes], now: float | Sequence[float]
           ) -> list[list[Reading]]:
    """Each payload's readings (a payload the codec could not decode: one bad reading).
    ``now``: the timestamp of readings the codec gives none — one for all, or per payload."""
    out: list[list[Reading]] = [[] for _ in payloads]
    for index, point, value, ts, good in plugins.decode_batch(codec, payloads):
        if 0 <= index < len(out):
            default = now if isinstance(now, float | int) else now[index]
            out[index].append(_reading(device, point, value, _ts(ts, default), good))
    return out


def readings_of(device: str, rows: Sequence[tuple[str, Any, float, bool]], now: float) -> list[Reading]:
    """One payload's decoded rows ``(point, value, ts, good)`` as checked readings of
    ``device`` (what :func:`decode` makes of them; for a caller that decoded the payloads of
    several devices in one call)."""
    return [_reading(device, point, value, _ts(ts, now), good) for point, value, ts, good in rows]


def can_encode(codec: str) -> bool:
    plugin = plugins.host().get(codec)
    return plugin is not None and plugin.module.has("encode")


def encode(codec: str, command: Mapping[str, Any]) -> bytes | None:
    """A command ``{"id", "name", "params"}`` as the codec's frame; None when it failed."""
    return plugins.encode_command(codec, command)


async def decode_off_loop(codec: str, device: str, payloads: Sequence[bytes],
                          now: float | Sequence[float]) -> list[list[Reading]]:
    """:func:`decode` from a Trio task: a Starlark codec's worker round trip leaves the event
    loop (a thread); a Wasm codec runs inline, bounded by its fuel and time limits."""
    if plugins.host().uses_thread(codec):
        return await trio.to_thread.run_sync(decode, codec, device, payloads, now)
    return decode(codec, device, payloads, now)


async def encode_off_loop(codec: str, command: Mapping[str, Any]) -> bytes | None:
    """:func:`encode` from a Trio task (Starlark in a thread, like :func:`decode_off_loop`)."""
    if plugins.host().uses_thread(codec):
        return await trio.to_thread.run_sync(encode, codec, command)
    return encode(codec, command)


async def transform_off_loop(name: str, readings: Sequence[Reading]) -> list[Reading]:
    if plugins.host().uses_thread(name):
        return await trio.to_thread.run_sync(transform, name, readings)
    return transform(name, readings)


def frame_quality(decoded: Sequence[Reading], quality: Quality) -> list[Reading]:
    """Readings a codec decoded from a frame the peer flagged ``quality`` (e.g. an OPC UA
    Uncertain status): good ones take that quality, bad ones stay bad."""
    if quality is Quality.GOOD:
        return list(decoded)
    return [Reading(r.device, r.point, r.value, r.ts, quality) if r.quality is Quality.GOOD else r
            for r in decoded]


def transform(name: str, readings: Sequence[Reading]) -> list[Reading]:
    """Run the transform over one device's readings. On failure the readings pass on with
    quality ``bad`` (their values kept, so nothing is lost)."""
    if not readings:
        return []
    result = plugins.transform_batch(name, [(r.point, r.value, r.ts) for r in readings])
    if result is None:
        return [Reading(r.device, r.point, r.value, r.ts, Quality.BAD, r.logged) for r in readings]
    out = []
    for index, point, value, ts, good in result:
        src = readings[index] if 0 <= index < len(readings) else readings[0]
        r = _reading(src.device, point, value, _ts(ts, src.ts), good)
        if good and src.quality is not Quality.GOOD and r.quality is Quality.GOOD:
            r = Reading(r.device, r.point, r.value, r.ts, src.quality)
        out.append(r)
    return out


def _ts(ts: float, default: float) -> float:
    if not ts:
        return default
    try:
        return check_ts(ts)
    except ValueRefused:
        return default
