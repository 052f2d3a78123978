"""Control benchmark: ``python benchmarks/control/run.py [--seconds 5]``.

1. 1,000 scenes (sensor d<i> above 30 → command actuator a<i>), 10,000 readings/s for
   ``--seconds``; 10 % of readings cross a threshold and fire a scene. Latency is measured from
   the reading entering the scene engine to the command reaching the transport (validated,
   in the ledger, dispatched by the device's queue). CPU is process time / wall time.
2. 10,000 commands queued at once over 100 devices: dispatch rate to an instant transport,
   with the ledger persisting to an in-memory store and to SQLite.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from twin.control.ledger import Catalog, DeviceCommand, Ledger, MemoryStore
from twin.control.scenes import SceneEngine

N_SCENES = 1000


def specs(n_devices: int, scenes: int) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {
        ("Site", "s"): {"kind": "Site", "metadata": {"name": "s"}, "spec": {"timezone": "UTC"}},
        ("DeviceModel", "m"): {
            "kind": "DeviceModel",
            "metadata": {"name": "m"},
            "spec": {
                "telemetry": {"temperature": {"type": "number"}},
                "commands": {
                    "set_state": {
                        "params": {
                            "type": "object",
                            "required": ["state"],
                            "properties": {"state": {"type": "boolean"}},
                        }
                    }
                },
            },
        },
    }
    for i in range(n_devices):
        for prefix in ("d", "a"):  # sensors d<i>, actuators a<i>
            out[("Device", f"{prefix}{i}")] = {
                "kind": "Device",
                "metadata": {"name": f"{prefix}{i}", "site": "s"},
                "spec": {"model": "m", "binding": {"sim": {}}},
            }
    for i in range(scenes):
        out[("Scene", f"sc{i}")] = {
            "kind": "Scene",
            "metadata": {"name": f"sc{i}", "site": "s"},
            "spec": {
                "mode": "parallel",
                "max": 100,
                "triggers": [
                    {
                        "type": "device_data",
                        "device": f"d{i}",
                        "point": "temperature",
                        "operator": ">",
                        "value": 30,
                    }
                ],
                "actions": [
                    {
                        "type": "command",
                        "device": f"a{i}",
                        "command": "set_state",
                        "params": {"state": True},
                    }
                ],
            },
        }
    return out


class InstantTransport:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.fed: dict[str, float] = {}
        self.sent = 0

    def mode(self, device: str) -> str:
        return "push"

    async def send(self, command: DeviceCommand) -> Any:
        t0 = self.fed.pop("d" + command.device[1:], None)
        if t0 is not None:
            self.latencies.append(time.perf_counter() - t0)
        self.sent += 1
        return {"ok": True}

    async def cancel(self, command: DeviceCommand) -> bool:
        return False


class LedgerEffects:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def command(
        self,
        device: str,
        command: str,
        params: Any,
        *,
        command_timeout: Any,
        wait: bool,
        source: str,
    ) -> dict[str, Any]:
        cmd = await self.ledger.submit(device, command, params, source=source, durable=False)
        return {"command": cmd.id}

    async def set_desired(self, *a: Any, **k: Any) -> dict[str, Any]:
        return {}

    async def alarm(self, *a: Any, **k: Any) -> dict[str, Any]:
        return {}

    async def webhook(self, *a: Any, **k: Any) -> dict[str, Any]:
        return {}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def scenes_bench(seconds: float, rate: int) -> dict[str, Any]:
    sp = specs(N_SCENES, N_SCENES)
    catalog = Catalog(sp)
    transport = InstantTransport()
    ledger = Ledger(MemoryStore(), transport, catalog, clock=time.time, threaded=False)
    engine = SceneEngine(LedgerEffects(ledger), keep_traces=2000)
    engine.load(sp)
    tick = 0.01
    per_tick = int(rate * tick)
    fed = 0
    async with trio.open_nursery() as n:
        await n.start(ledger.run)
        await n.start(engine.run)
        for i in range(N_SCENES):  # everyone below the threshold first
            engine.feed({"kind": "reading", "device": f"d{i}", "point": "temperature", "value": 20})
        cpu0, wall0 = time.process_time(), time.perf_counter()
        next_t = wall0
        k = 0
        while time.perf_counter() - wall0 < seconds:
            for _ in range(per_tick):
                dev = k % N_SCENES
                # each round over the devices, a different 10 % cross 30 (and fire); their
                # next reading drops below again: fires are spread evenly over time
                crossing = ((k // N_SCENES) + dev) % 10 == 9
                name = f"d{dev}"
                if crossing:
                    transport.fed[name] = time.perf_counter()
                engine.feed(
                    {
                        "kind": "reading",
                        "device": name,
                        "point": "temperature",
                        "value": 35 if crossing else 20,
                    }
                )
                k += 1
                fed += 1
                # the engine's bus delivers each reading through a memory channel: a
                # schedule point per reading, as here
                await trio.lowlevel.checkpoint()
            next_t += tick
            await trio.sleep(max(0.0, next_t - time.perf_counter()))
        await trio.sleep(0.2)
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        n.cancel_scope.cancel()
    lat = [x * 1000 for x in transport.latencies]
    return {
        "readings": fed,
        "readings_per_s": fed / wall,
        "scene_runs": engine.fired,
        "commands": transport.sent,
        "p50_ms": pct(lat, 0.50),
        "p99_ms": pct(lat, 0.99),
        "max_ms": max(lat) if lat else float("nan"),
        "mean_ms": statistics.fmean(lat) if lat else float("nan"),
        "cpu_percent": 100 * cpu / wall,
    }


async def dispatch_bench(
    n_commands: int, devices: int, store: Any, threaded: bool
) -> dict[str, Any]:
    sp = specs(devices, 0)
    transport = InstantTransport()
    ledger = Ledger(store, transport, Catalog(sp), clock=time.time, threaded=threaded)
    async with trio.open_nursery() as n:
        await n.start(ledger.run)
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        for i in range(n_commands):
            await ledger.submit(
                f"d{i % devices}", "set_state", {"state": bool(i % 2)}, durable=False
            )
        queued = time.perf_counter() - t0
        while transport.sent < n_commands:  # noqa: ASYNC110 - polling a counter
            await trio.sleep(0.001)
        dispatched = time.perf_counter() - t0
        await ledger.flushed()
        persisted = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        n.cancel_scope.cancel()
    return {
        "commands": n_commands,
        "queue_s": queued,
        "dispatch_s": dispatched,
        "dispatch_per_s": n_commands / dispatched,
        "persisted_s": persisted,
        "cpu_s": cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=int, default=10_000)
    args = ap.parse_args()
    for gc_mode in ("default", "tuned"):
        if gc_mode == "tuned":
            gc.collect()
            gc.freeze()  # long-lived objects (specs, scenes) out of the collector's way
            gc.set_threshold(100_000, 50, 1000)
        r = trio.run(scenes_bench, args.seconds, args.rate)
        report_scenes(r, args.seconds, gc_mode)
    gc.set_threshold(700, 10, 10)
    m = trio.run(dispatch_bench, 10_000, 100, MemoryStore(), False)
    print(
        f"ledger (memory store): 10000 commands over 100 devices: queued in {m['queue_s']:.2f}s, "
        f"dispatched in {m['dispatch_s']:.2f}s ({m['dispatch_per_s']:.0f}/s), "
        f"CPU {m['cpu_s']:.2f}s"
    )
    from twin.registry import open_registry

    with tempfile.TemporaryDirectory() as tmp:
        reg = open_registry(None, Path(tmp))
        s = trio.run(dispatch_bench, 10_000, 100, reg, True)
        reg.close()
    print(
        f"ledger (SQLite registry): 10000 commands over 100 devices: dispatched in "
        f"{s['dispatch_s']:.2f}s ({s['dispatch_per_s']:.0f}/s), every transition persisted "
        f"after {s['persisted_s']:.2f}s, CPU {s['cpu_s']:.2f}s"
    )


def report_scenes(r: dict[str, Any], seconds: float, gc_mode: str) -> None:
    print(
        f"scenes (GC {gc_mode}): {N_SCENES} scenes, {r['readings']} readings in {seconds:g}s "
        f"({r['readings_per_s']:.0f}/s), {r['scene_runs']} runs, {r['commands']} commands"
    )
    print(
        f"  trigger → command dispatched: p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, "
        f"max {r['max_ms']:.3f} ms, mean {r['mean_ms']:.3f} ms"
    )
    print(f"  CPU {r['cpu_percent']:.0f}% of one core")


if __name__ == "__main__":
    main()
