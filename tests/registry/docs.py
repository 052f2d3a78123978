"""Builders of normalised spec documents for the registry tests."""

from __future__ import annotations

from typing import Any


def device(
    name: str,
    *,
    group: str | None = "line-1",
    site: str = "plant-a",
    tags: list[str] | None = None,
    labels: dict[str, Any] | None = None,
    type: str = "sensor",
    model: str = "th-sensor-v2",
    binding: dict[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "site": site}
    if group is not None:
        meta["group"] = group
    meta["tags"] = ["hvac"] if tags is None else tags
    meta["labels"] = {"floor": "2"} if labels is None else labels
    return {
        "apiVersion": "flux.iot/v1",
        "kind": "Device",
        "metadata": meta,
        "spec": {
            "type": type,
            "model": model,
            "binding": {"sim": {}} if binding is None else binding,
            **spec,
        },
    }


def group(name: str, parent: str | None = None, description: str = "") -> dict[str, Any]:
    spec: dict[str, Any] = {"description": description or f"group {name}"}
    if parent is not None:
        spec["parent"] = parent
    return {
        "apiVersion": "flux.iot/v1",
        "kind": "DeviceGroup",
        "metadata": {"name": name, "site": "plant-a"},
        "spec": spec,
    }


def model(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "flux.iot/v1",
        "kind": "DeviceModel",
        "metadata": {"name": name},
        "spec": {"properties": {"temperature": {"type": "number", "unit": "°C"}}},
    }


def specset(*docs: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def demo_specs(n_devices: int = 3) -> dict[tuple[str, str], dict[str, Any]]:
    docs = [group("plant"), group("line-1", parent="plant"), model("th-sensor-v2")]
    docs += [device(f"temp_sensor_{i:02d}") for i in range(1, n_devices + 1)]
    return specset(*docs)
