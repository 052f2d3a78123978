"""A Device's resolved configuration, and what changed between two sets of them (pure).

``device_configs(specs)`` resolves each Device document into a :class:`DeviceConfig` (model,
group chain, effective heartbeat); ``diff_devices(running, desired)`` is the pure "what changed"
function: a change to anything the binding depends on restarts the task, a change to desired
values, maintenance or metadata is applied in place, and untouched devices are left alone.
Below the device task (twin/runtime/device.py) and the controller that runs the tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twin.registry.base import canonical_json, doc_hash
from twin.spec.units import parse_duration

DEFAULT_INTERVAL = 10.0
DEFAULT_TIMEOUT_FACTOR = 3.0


@dataclass(frozen=True)
class Heartbeat:
    interval: float
    timeout: float


@dataclass(frozen=True)
class DeviceConfig:
    name: str
    doc: Mapping[str, Any]
    site: str
    groups: tuple[str, ...]
    model: Mapping[str, Any]  # the DeviceModel's spec ({} when unknown)
    heartbeat: Heartbeat
    desired: Mapping[str, Any]
    maintenance: bool
    restart_key: str  # changes => restart the task
    update_key: str  # changes => update in place
    protocol: str = ""
    writable: frozenset[str] | None = field(default=None)  # None = no model: try everything

    @property
    def spec(self) -> Mapping[str, Any]:
        return self.doc.get("spec") or {}


def _heartbeat(block: Any) -> Heartbeat | None:
    if not isinstance(block, Mapping) or not block:
        return None
    interval = parse_duration(block.get("interval", DEFAULT_INTERVAL))
    timeout = (
        parse_duration(block["timeout"])
        if "timeout" in block
        else interval * DEFAULT_TIMEOUT_FACTOR
    )
    return Heartbeat(interval, max(timeout, 0.001))


def _group_chain(group: str | None, groups: Mapping[str, Mapping[str, Any]]) -> tuple[str, ...]:
    chain: list[str] = []
    while group and group not in chain:
        chain.append(group)
        group = ((groups.get(group) or {}).get("spec") or {}).get("parent")
    return tuple(chain)


def _protocol(doc: Mapping[str, Any]) -> str:
    binding = (doc.get("spec") or {}).get("binding") or {}
    return next(iter(binding), "") if isinstance(binding, Mapping) else ""


def device_configs(
    specs: Mapping[tuple[str, str], Mapping[str, Any]],
    *,
    default: Heartbeat | None = None,
) -> dict[str, DeviceConfig]:
    default = default or Heartbeat(DEFAULT_INTERVAL, DEFAULT_INTERVAL * DEFAULT_TIMEOUT_FACTOR)
    models = {n: d for (k, n), d in specs.items() if k == "DeviceModel"}
    groups = {n: d for (k, n), d in specs.items() if k == "DeviceGroup"}
    out: dict[str, DeviceConfig] = {}
    for (kind, name), doc in specs.items():
        if kind != "Device":
            continue
        meta = doc.get("metadata") or {}
        spec = doc.get("spec") or {}
        model_doc = models.get(str(spec.get("model", "")))
        model = (model_doc or {}).get("spec") or {}
        chain = _group_chain(meta.get("group"), groups)
        hb = _heartbeat(spec.get("heartbeat")) or _heartbeat(model.get("heartbeat"))
        for g in chain:
            if hb is not None:
                break
            hb = _heartbeat(((groups.get(g) or {}).get("spec") or {}).get("heartbeat"))
        hb = hb or default
        writable: frozenset[str] | None = None
        if model_doc is not None:
            writable = frozenset(
                p
                for p, d in (model.get("properties") or {}).items()
                if (d or {}).get("access", "read") in ("write", "readwrite")
            )
        restart_key = canonical_json(
            {
                "binding": spec.get("binding"),
                "hb": [hb.interval, hb.timeout],
                "model": model,
                "type": spec.get("type"),
            }
        )
        group_docs = [groups.get(g) for g in chain]
        update_key = doc_hash({"doc": doc, "groups": group_docs})
        out[name] = DeviceConfig(
            name=name,
            doc=doc,
            site=str(meta.get("site", "")),
            groups=chain,
            model=model,
            heartbeat=hb,
            desired=dict(spec.get("desired") or {}),
            maintenance=bool(spec.get("maintenance", False)),
            restart_key=restart_key,
            update_key=update_key,
            protocol=_protocol(doc),
            writable=writable,
        )
    return out


@dataclass(frozen=True)
class Changes:
    start: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()
    update: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.start or self.restart or self.update or self.stop)

    def summary(self) -> str:
        return (
            f"{len(self.start)} started, {len(self.restart)} restarted, "
            f"{len(self.update)} updated, {len(self.stop)} stopped"
        )


def diff_devices(
    running: Mapping[str, DeviceConfig], desired: Mapping[str, DeviceConfig]
) -> Changes:
    """Pure: what to do to go from ``running`` to ``desired``."""
    start, restart, update = [], [], []
    for name in sorted(desired):
        new = desired[name]
        old = running.get(name)
        if old is None:
            start.append(name)
        elif old.restart_key != new.restart_key:
            restart.append(name)
        elif old.update_key != new.update_key:
            update.append(name)
    stop = sorted(set(running) - set(desired))
    return Changes(tuple(start), tuple(restart), tuple(update), tuple(stop))
