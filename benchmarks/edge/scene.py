"""Edge scene reaction with the uplink down: a reading reaches the edge engine → the local
scene fires → its command is dispatched to the actuator (ledger ``sent``).

    python benchmarks/edge/scene.py [--readings 2000] [--no-freeze]

An edge engine in this process (local registry, time-series store, control service, the edge
agent with its outbox) whose cloud URL goes nowhere (offline the whole run). Readings are
pushed into an http-binding device's task (the ingest hub, as the HTTP route does after its
write-ahead log); every 10th crosses the threshold of a scene that commands a simulated fan.
Latency: push → command ``sent``. Also: the outbox the run left to send, the cyclic garbage
collector's pauses during the run (a full collection stalls the event loop: the edge agent
freezes the long-lived heap once the engine is up, ``twin/runtime/gc_freeze.py``; the run
starts once it has; ``--no-freeze`` measures without) and the load average."""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from twin.bindings.base import Reading
from twin.control.service import ControlService
from twin.edge.agent import EdgeAgent
from twin.registry import open_registry
from twin.runtime.engine import Engine, EngineConfig
from twin.runtime.timeseries_service import TimeSeriesService
from twin.spec import load_site
from twin.spec.apply import apply_specs

SITE = """\
apiVersion: flux.iot/v1
kind: Site
metadata: {name: remote}
---
apiVersion: flux.iot/v1
kind: DeviceGroup
metadata: {name: edge-devs, site: remote}
---
apiVersion: flux.iot/v1
kind: DeviceModel
metadata: {name: fan}
spec:
  properties: {power: {type: boolean, access: readwrite, default: false}}
  telemetry: {current: {type: number}}
  commands:
    set_state:
      params: {type: object, required: [state], properties: {state: {type: boolean}}}
---
apiVersion: flux.iot/v1
kind: EdgeNode
metadata: {name: gw-b, site: remote}
spec:
  devices: {group: edge-devs}
  uplink: {url: "http://127.0.0.1:9"}
---
apiVersion: flux.iot/v1
kind: Device
metadata: {name: probe, site: remote, group: edge-devs}
spec: {type: sensor, binding: {http: {}}}
---
apiVersion: flux.iot/v1
kind: Device
metadata: {name: fan, site: remote, group: edge-devs}
spec:
  type: actuator
  model: fan
  binding: {sim: {interval: 10s, points: {current: {wave: constant, value: 1}}}}
---
apiVersion: flux.iot/v1
kind: Scene
metadata: {name: hot, site: remote}
spec:
  mode: parallel
  triggers: [{type: device_data, device: probe, point: t, operator: ">", value: 30}]
  actions: [{type: command, device: fan, command: set_state, params: {state: true}}]
"""


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def bench(n: int, tmp: Path, freeze: bool = True) -> dict[str, Any]:
    (tmp / "site").mkdir()
    (tmp / "site" / "s.yaml").write_text(SITE)
    reg = open_registry(None, tmp / "edge")
    apply_specs(reg, load_site(tmp / "site"), author="bench")
    agent = EdgeAgent("gw-b", "http://127.0.0.1:9", "dk_x_y", freeze_gc=freeze,
                      freeze_settle=0.5)  # fmt: skip
    control = ControlService()
    engine = Engine(reg, EngineConfig(state_dir=tmp / "edge", edge="gw-b"),
                    [control, TimeSeriesService(), agent])  # fmt: skip
    pushed: dict[int, float] = {}
    lat: list[float] = []
    waiting: list[float] = []

    def on_cmd(cmd: Any) -> None:
        if str(cmd.status) == "sent" and waiting:
            lat.append(time.perf_counter() - waiting.pop(0))

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        control.ledger.listeners.append(on_cmd)
        await trio.sleep(1.0)
        for _ in range(150):  # the agent freezes the heap 0.5 + 0.5 s after the engine is up
            if not freeze or gc.get_freeze_count():
                break
            await trio.sleep(0.1)
        frozen = gc.get_freeze_count()
        pauses: list[float] = []
        began: list[float] = []

        def on_gc(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                began[:] = [time.perf_counter()]
            elif began and info.get("generation") == 2:
                pauses.append((time.perf_counter() - began[0]) * 1000)

        gc.callbacks.append(on_gc)
        load = os.getloadavg()[0]
        for i in range(n):
            hot = i % 10 == 9
            t = time.perf_counter()
            if hot:
                waiting.append(t)
                pushed[i] = t
            await engine.hub.deliver("probe", [Reading("probe", "t", 35.0 if hot else 20.0, time.time())])
            await trio.sleep(0.002)
        await trio.sleep(1.0)
        gc.callbacks.remove(on_gc)
        box = agent.outbox.stats() if agent.outbox else {}
        online = bool(agent.uplink and agent.uplink.online)
        nursery.cancel_scope.cancel()
    reg.close()
    ms = [x * 1000 for x in lat]
    return {"fires": len(pushed), "measured": len(ms), "p50": pct(ms, 0.5), "p99": pct(ms, 0.99),
            "max": max(ms) if ms else float("nan"), "mean": statistics.fmean(ms) if ms else 0,
            "outbox_depth": box.get("depth"), "online": online, "frozen": frozen,
            "full_gc": len(pauses), "full_gc_max": max(pauses, default=0.0),
            "load": load}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--readings", type=int, default=2000)
    ap.add_argument("--no-freeze", action="store_true", help="leave the collector as it is")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = trio.run(bench, args.readings, Path(tmp), not args.no_freeze)
    print(f"edge scene reaction, uplink down (online={r['online']}): {r['measured']}/{r['fires']} "
          f"fires: reading → command sent p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms "
          f"(goal < 10 ms), max {r['max']:.2f} ms; outbox left to send: {r['outbox_depth']} records; "
          f"heap frozen: {r['frozen']} objects; full collections during the run: {r['full_gc']} "
          f"(longest {r['full_gc_max']:.1f} ms); load average {r['load']:.2f}")


if __name__ == "__main__":
    main()
