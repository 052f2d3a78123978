"""``kind: EdgeNode``: which devices an edge owns, and the checks ``twin validate`` runs.

An edge owns the devices its ``spec.devices`` selector matches: a device named in ``names``
always; otherwise every other criterion given (``group``, ``tag`` — all listed tags —,
``labels`` — all listed pairs) must match, and the device must be in the edge's site when the
edge names one. The cloud engine does not run owned devices (the edge does); the edge runs
only those. Pure functions over spec documents (no I/O), shared by both sides.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from twin.errors import Problem
from twin.spec.documents import Document, LoadedSpecs

RECORD_KINDS = ("telemetry", "status", "command_result", "alarm", "scene_trace")
DEFAULT_DROP = ("telemetry", "scene_trace", "status")
DEFAULT_NEVER = ("command_result", "alarm")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$")
_UNITS = {None: 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
          "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}  # fmt: skip


def parse_size(value: str | int) -> int:
    """``64MB`` → 64_000_000, ``2GiB`` → 2·2³⁰, ``1000`` → 1000 (ValueError otherwise)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"{value!r} is not a positive size")
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a size (bytes, or e.g. 64MB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _many(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, str)}
    return set()


def owns(edge: Mapping[str, Any], device: Mapping[str, Any]) -> bool:
    """Whether the EdgeNode document ``edge`` owns the Device document ``device``."""
    sel = (edge.get("spec") or {}).get("devices") or {}
    meta = device.get("metadata") or {}
    name = meta.get("name")
    if name in _many(sel.get("names")):
        return True
    criteria = {k for k in ("group", "tag", "labels") if k in sel}
    if not criteria:
        return False
    edge_site = (edge.get("metadata") or {}).get("site")
    if edge_site and meta.get("site") and meta.get("site") != edge_site:
        return False
    if "group" in sel and meta.get("group") not in _many(sel["group"]):
        return False
    if "tag" in sel and not _many(sel["tag"]) <= set(meta.get("tags") or []):
        return False
    labels = meta.get("labels") or {}
    return all(str(labels.get(k)) == str(v) for k, v in (sel.get("labels") or {}).items())


def owned_devices(
    edge: Mapping[str, Any], specs: Mapping[tuple[str, str], Mapping[str, Any]]
) -> set[str]:
    """Names of the devices (``Device`` documents in ``specs``) the edge owns."""
    return {name for (kind, name), doc in specs.items() if kind == "Device" and owns(edge, doc)}


def edge_owned(specs: Mapping[tuple[str, str], Mapping[str, Any]]) -> dict[str, str]:
    """device → the EdgeNode that owns it, over every EdgeNode in ``specs``."""
    out: dict[str, str] = {}
    for (kind, name), doc in specs.items():
        if kind == "EdgeNode":
            for dev in owned_devices(doc, specs):
                out.setdefault(dev, name)
    return out


def overflow_policy(spec: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(kinds that may be dropped in order of preference, kinds never dropped)."""
    overflow = ((spec.get("buffer") or {}).get("overflow")) or {}
    never = tuple(overflow.get("never") or ())
    drop = tuple(overflow.get("drop") or ())
    if not drop:
        drop = tuple(k for k in DEFAULT_DROP if k not in never)
    if not never:
        never = tuple(k for k in RECORD_KINDS if k not in drop)
    return drop, never


def edge_problems(loaded: LoadedSpecs) -> list[Problem]:
    """Located problems of every EdgeNode: unknown devices, groups and models, overflow kinds
    both dropped and kept, sizes, and devices owned by two edges."""
    problems: list[Problem] = []
    edges = loaded.of_kind("EdgeNode")
    devices = loaded.of_kind("Device")
    groups = loaded.of_kind("DeviceGroup")
    models = loaded.of_kind("Model")
    owner: dict[str, str] = {}
    for doc in edges.values():
        spec = doc.body.get("spec")
        if not isinstance(spec, dict):
            continue
        sel: dict[str, Any] = spec["devices"] if isinstance(spec.get("devices"), dict) else {}
        _names(doc, sel.get("names"), ("spec", "devices", "names"), "Device", devices, problems)
        _names(doc, sel.get("group"), ("spec", "devices", "group"), "DeviceGroup", groups, problems)
        _names(doc, spec.get("models"), ("spec", "models"), "Model", models, problems)
        buf: dict[str, Any] = spec["buffer"] if isinstance(spec.get("buffer"), dict) else {}
        if "max_bytes" in buf:
            try:
                parse_size(buf["max_bytes"])
            except ValueError as exc:
                problems.append(doc.problem(("spec", "buffer", "max_bytes"), str(exc)))
        overflow: dict[str, Any] = (
            buf["overflow"] if isinstance(buf.get("overflow"), dict) else {}
        )
        both = _many(overflow.get("drop")) & _many(overflow.get("never"))
        for kind in sorted(both):
            problems.append(doc.problem(
                ("spec", "buffer", "overflow", "never"),
                f"record kind {kind!r} is both dropped and never dropped",
                "list each kind in at most one of overflow.drop and overflow.never"))
        up: dict[str, Any] = spec["uplink"] if isinstance(spec.get("uplink"), dict) else {}
        url: str = up["url"] if isinstance(up.get("url"), str) else ""
        transport = up.get("transport", "mqtt" if url.startswith("mqtt") else "https")
        if url and (transport == "mqtt") != url.startswith("mqtt"):
            problems.append(doc.problem(
                ("spec", "uplink", "url"), f"uplink url {url!r} does not fit transport {transport!r}",
                "transport: mqtt takes mqtt://BROKER:1883 or mqtts://BROKER:8883; https the "
                "cloud engine's API URL"))  # fmt: skip
        listed = _many(spec.get("models"))
        owned = owned_devices(doc.body, {d.key: d.body for d in devices.values()})
        visions: list[Any] = spec["vision"] if isinstance(spec.get("vision"), list) else []
        for i, v in enumerate(visions):
            if not isinstance(v, dict):
                continue
            cam, model = v.get("camera"), v.get("model")
            if isinstance(cam, str) and cam not in owned:
                problems.append(doc.problem(("spec", "vision", i, "camera"),
                                            f"camera {cam!r} is not a device this edge owns"))
            if isinstance(model, str) and model not in listed:
                problems.append(doc.problem(("spec", "vision", i, "model"),
                                            f"model {model!r} is not in spec.models",
                                            "list the Model in spec.models to deploy it here"))
        docs = {d.key: d.body for d in devices.values()}
        for dev in sorted(owned_devices(doc.body, docs)):
            other = owner.setdefault(dev, doc.name)
            if other != doc.name:
                problems.append(doc.problem(
                    ("spec", "devices"),
                    f"device {dev!r} is owned by EdgeNode {other!r} too",
                    "a device belongs to at most one edge: narrow one of the selectors"))
    return problems


def _names(doc: Document, value: Any, path: tuple[str | int, ...], kind: str,
           targets: Mapping[str, Document], problems: list[Problem]) -> None:
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    for i, name in enumerate(items):
        if isinstance(name, str) and name not in targets:
            where = path if isinstance(value, str) else (*path, i)
            problems.append(doc.problem(where, f"unknown {kind} {name!r}"))


__all__ = [
    "RECORD_KINDS",
    "edge_owned",
    "edge_problems",
    "overflow_policy",
    "owned_devices",
    "owns",
    "parse_size",
]
