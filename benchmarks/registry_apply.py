"""Registry apply benchmark: 10,000 devices + 100 groups + 20 models, both backends.

    .venv/bin/python benchmarks/registry_apply.py [--pg URL] [--devices N]

Prints: first apply, specs() of head, no-op re-apply, 1 %-changed re-apply, specs(old rev),
and the same 1 %-changed apply with runtime overrides on 10 % of the devices.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from twin.registry import DesiredOverride, open_registry

Specs = dict[tuple[str, str], dict[str, Any]]


def make_specs(n_devices: int, n_groups: int = 100, n_models: int = 20) -> Specs:
    docs: list[dict[str, Any]] = []
    for g in range(n_groups):
        parent = None if g < 10 else f"group-{g % 10:03d}"
        spec: dict[str, Any] = {"description": f"group {g}"}
        if parent:
            spec["parent"] = parent
        docs.append(
            {
                "apiVersion": "flux.iot/v1",
                "kind": "DeviceGroup",
                "metadata": {"name": f"group-{g:03d}", "site": "plant-a"},
                "spec": spec,
            }
        )
    for m in range(n_models):
        docs.append(
            {
                "apiVersion": "flux.iot/v1",
                "kind": "DeviceModel",
                "metadata": {"name": f"model-{m:02d}"},
                "spec": {
                    "properties": {
                        "temperature": {"type": "number", "unit": "°C", "min": -40, "max": 125},
                        "sampling_rate": {"type": "integer", "access": "write"},
                    }
                },
            }
        )
    for i in range(n_devices):
        docs.append(
            {
                "apiVersion": "flux.iot/v1",
                "kind": "Device",
                "metadata": {
                    "name": f"dev_{i:05d}",
                    "site": "plant-a",
                    "group": f"group-{i % n_groups:03d}",
                    "tags": ["hvac", "critical"] if i % 3 == 0 else ["hvac"],
                    "labels": {"floor": str(i % 5)},
                },
                "spec": {
                    "type": "sensor",
                    "model": f"model-{i % n_models:02d}",
                    "binding": {
                        "modbus": {
                            "host": f"10.0.{i // 250}.{i % 250}",
                            "port": 502,
                            "unit": 1,
                            "poll": "2s",
                            "points": {"temperature": {"register": 30001, "type": "int16"}},
                        }
                    },
                    "heartbeat": {"interval": "10s", "timeout": "30s"},
                    "desired": {"sampling_rate": 5},
                },
            }
        )
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def timed(label: str, fn: Any) -> Any:
    t0 = time.perf_counter()
    out = fn()
    print(f"  {label:<34} {time.perf_counter() - t0:7.3f} s")
    return out


def run(url: str, n: int) -> None:
    print(f"{url.split('?')[0]}  ({n} devices)")
    specs = make_specs(n)
    reg = timed("open + migrate", lambda: open_registry(url))
    try:
        timed("apply (empty registry)", lambda: reg.apply(specs, base=0, author="bench"))
        timed("specs() of head", reg.specs)
        timed("head()", reg.head)
        timed("apply (no change)", lambda: reg.apply(specs, base=1, author="bench"))
        changed = dict(specs)
        devs = [k for k in specs if k[0] == "Device"]
        for k in devs[::100]:
            doc = dict(changed[k])
            doc["spec"] = {**doc["spec"], "desired": {"sampling_rate": 10}}
            changed[k] = doc
        timed("apply (1 % changed)", lambda: reg.apply(changed, base=1, author="bench"))
        timed("specs(1) of an old revision", lambda: reg.specs(1))
        timed("device_rows()", reg.device_rows)
        timed("apply (rollback to rev 1)", lambda: reg.apply(reg.specs(1), base=2, author="b"))
        # runtime desired-state overrides on 10 % of the devices (twin/registry/overrides.py):
        # an apply checks each against the new specs and drops those whose spec value changed
        ovs = [DesiredOverride(k[1], "sampling_rate", 7, "bench", 0.0, "5") for k in devs[::10]]
        timed(f"set_override x {len(ovs)}", lambda: [reg.set_override(o) for o in ovs])
        timed("overrides()", reg.overrides)
        timed("apply (1 % changed, overrides)", lambda: reg.apply(changed, base=3, author="bench"))
        print(f"  {'overrides dropped by that apply':<34} {len(ovs) - len(reg.overrides()):7d}")
    finally:
        reg.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--devices", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(f"sqlite:///{Path(tmp) / 'registry.db'}", args.devices)
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    sep = "&" if "?" in args.pg else "?"
    try:
        run(f"{args.pg}{sep}schema={schema}", args.devices)
    finally:
        import psycopg

        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


if __name__ == "__main__":
    main()
