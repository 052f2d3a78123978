"""Plugin benchmarks: Wasm codec and Starlark transform throughput, and what a hostile module
costs the ingest path.

    python benchmarks/plugins/run.py [--seconds 3]

1. Wasm codec (the demo's ACME TH-8 decoder, sites/demo/plugins/acme_th.wat): batches of 1,000
   payloads -> payloads/s and readings/s; peers from the same run: the same codec called one
   payload at a time, and the same frame decoded in plain Python (struct).
2. Starlark transform (sites/demo/plugins/derive.star): batches of 1,000 readings; peer: one
   reading per call.
3. Hostile module: the MQTT binding's ingest edge (payload -> codec -> checked readings -> the
   device channel) for a good device at full speed while a second device sends the same number
   of frames to a codec that loops forever; compared with the second device on the good codec.
   With the default failure policy (suspended after 5 failures in a row) and without it
   (every hostile frame burns its fuel budget).

Rates are per CPU second of this process (``time.process_time``): the machine is shared, and
wall-clock rates move with its load. Wall-clock rates are printed too.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.plugins.modules import DERIVE_STAR, HOSTILE_WASM, acme_wasm, plugin, wat  # noqa: E402
from twin.plugins import registry  # noqa: E402
from twin.plugins.host import PluginHost  # noqa: E402


def measure(fn: Callable[[], int], seconds: float) -> tuple[float, float]:
    """(items per CPU second, items per wall second) of ``fn`` (returns items done) run
    repeatedly for ``seconds`` of CPU."""
    fn()  # warm up
    items = 0
    c0, w0 = time.process_time(), time.perf_counter()
    while time.process_time() - c0 < seconds:
        items += fn()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return items / cpu, items / wall


def frame(i: int) -> bytes:
    return b"\xa5\x01" + struct.pack(">hHH", 2000 + i % 500, 4000 + i % 3000, 3000)


def python_decode(frames: list[bytes]) -> list[tuple[int, str, float]]:
    out = []
    for i, f in enumerate(frames):
        if len(f) == 8 and f[:2] == b"\xa5\x01":
            t, h, b = struct.unpack_from(">hHH", f, 2)
            out += [(i, "temperature", t / 100), (i, "humidity", h / 100), (i, "battery", b / 1000)]
        else:
            out.append((i, "payload", None))  # type: ignore[arg-type]
    return out


def bench_codec(host: PluginHost, seconds: float) -> None:
    frames = [frame(i) for i in range(1000)]
    per_batch = len(host.decode("acme", frames))
    cpu, wall = measure(lambda: len(host.decode("acme", frames)) and 1000, seconds)
    one = frames[:1]
    cpu1, wall1 = measure(lambda: len(host.decode("acme", one)), seconds)
    cpup, _ = measure(lambda: len(python_decode(frames)) and 1000, seconds)
    print("1. Wasm codec (ACME TH-8, 3 readings per payload)")
    print(f"   batches of 1,000 : {cpu:>12,.0f} payloads/s per CPU s ({cpu * per_batch / 1000:,.0f} "
          f"readings/s); wall {wall:,.0f}/s   goal >= 1,000,000")
    print(f"   one per call     : {cpu1:>12,.0f} payloads/s per CPU s (batching x{cpu / cpu1:.0f}); "
          f"wall {wall1:,.0f}/s")
    print(f"   peer: Python struct decode: {cpup:>8,.0f} payloads/s per CPU s "
          f"(Wasm batched / Python = {cpu / cpup:.2f})")


def _worker_cpu(host: PluginHost, name: str) -> float:
    """CPU seconds (user + system) of a Starlark plugin's worker process, from /proc."""
    proc = getattr(host.plugins[name].module, "_proc", None)
    if proc is None:
        return 0.0
    fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_transform(host: PluginHost, seconds: float) -> None:
    rows = []
    for i in range(500):
        rows += [("temperature", 20 + i % 10 / 10, float(i)), ("humidity", 60.0, float(i))]
    n_out = len(host.transform("derive", rows) or [])
    # the worker process does the work: its CPU (from /proc) counts with this process's
    t0, c0, w0 = time.perf_counter(), time.process_time(), _worker_cpu(host, "derive")
    done = 0
    while time.perf_counter() - t0 < seconds:
        host.transform("derive", rows)
        done += len(rows)
    wall = done / (time.perf_counter() - t0)
    cpu = done / ((time.process_time() - c0) + (_worker_cpu(host, "derive") - w0))
    t0 = time.perf_counter()
    done1 = 0
    while time.perf_counter() - t0 < seconds:
        host.transform("derive", rows[:1])
        done1 += 1
    wall1 = done1 / (time.perf_counter() - t0)
    # peer: the same script in this process (no memory containment: a script allocating without
    # bound would take the engine down), with the same JSON crossing and cancellation callback
    import json

    import starlark as sl

    from twin.plugins.starlark_worker import SHIM, Budget

    glb = sl.Globals.extended_by([sl.LibraryExtension.Json, sl.LibraryExtension.StructType])
    mod = sl.Module()
    sl.eval(mod, sl.parse("p.star", DERIVE_STAR.read_text() + SHIM % '"transform": transform'), glb)
    frozen = mod.freeze()
    text = json.dumps([{"point": p, "value": v, "ts": t} for p, v, t in rows])

    def inproc() -> int:
        opts = sl.EvalOptions(check_cancelled=Budget(10**9, 10.0).cancelled)
        json.loads(frozen.call_with(opts, "flux_shim_call", "transform", text, {}).value)
        return len(rows)

    cpu_in, _ = measure(inproc, seconds)
    print("2. Starlark transform (dew point, batches of 1,000 readings, worker process)")
    print(f"   batches of 1,000 : {cpu:>12,.0f} readings/s per CPU s (host + worker; {n_out} out "
          f"per 1,000 in); wall {wall:,.0f}/s   goal >= 50,000")
    print(f"   one per call     : {wall1:>12,.0f} readings/s wall (batching x{wall / wall1:.0f}; "
          "a worker round trip per call)")
    print(f"   peer: in-process starlark-pyo3, no memory cap: {cpu_in:,.0f} readings/s per CPU s "
          f"(the worker costs {(1 - cpu / cpu_in) * 100:.0f} %)")


def _ingest_round(good: Any, other: Any, msgs: list[Any], omsgs: list[Any], recvs: Any) -> int:
    import trio

    for i, m in enumerate(msgs):
        good._on_telemetry(m)
        if omsgs:
            other._on_telemetry(omsgs[i])
    for recv in recvs:  # drain like a device task would
        while True:
            try:
                recv.receive_nowait()
            except trio.WouldBlock:
                break
    return len(msgs)


def bench_hostile(seconds: float) -> None:
    import trio

    from twin.bindings.base import BindingContext
    from twin.bindings.mqtt import MqttBinding
    from twin.mqtt.hub import InMessage

    host = registry.host()

    def edge(codec: str, device: str) -> tuple[MqttBinding, Any]:
        b = MqttBinding(device, {"codec": codec}, {"metadata": {"name": device, "site": "s"}},
                        BindingContext())
        send, recv = trio.open_memory_channel[Any](10**9)
        b._send = send
        return b, recv

    results: dict[str, tuple[float, float]] = {}
    configs = (("good device alone", None, None),
               ("+ a neighbour on the good codec", "acme", None),
               ("+ a neighbour on a hostile codec", "evil", None),
               ("  same, never suspended", "evil", {"alarm_after": 10**9}))
    for label, codec, fails in configs * 3:  # alternating rounds, best of three each
        # a generous budget (10M fuel per frame, ~5 ms of spinning) makes the attack expensive
        spec = plugin("evil", wat(HOSTILE_WASM["infinite_loop"]), limits={"fuel": 10_000_000},
                      **({"failures": fails} if fails else {}))
        host.sync({("Plugin", "acme"): plugin("acme", acme_wasm()), ("Plugin", "evil"): spec})
        good, grecv = edge("acme", "good")
        other, orecv = edge(codec or "acme", "other")
        msgs = [InMessage("flux/s/good/telemetry", frame(i)) for i in range(200)]
        omsgs = [InMessage("flux/s/other/telemetry", frame(i)) for i in range(200)] if codec else []

        got = measure(partial(_ingest_round, good, other, msgs, omsgs, (grecv, orecv)), seconds)
        if got[0] > results.get(label, (0.0, 0.0))[0]:
            results[label] = got
        host.sync({})
    alone = results["good device alone"][0]
    neighbour = results["+ a neighbour on the good codec"][0]
    print("3. Hostile module vs ingest (MQTT edge: frame -> codec -> checked readings -> device"
          " channel, one frame per call; the neighbour sends as many frames as the good device)")
    for label, (cpu, wall) in results.items():
        note = ""
        if "hostile" in label or "never" in label:
            note = (f"   vs a good neighbour {(1 - cpu / neighbour) * 100:+.1f} %"
                    f" (goal < 5 %)" if "never" not in label else
                    f"   vs a good neighbour {(1 - cpu / neighbour) * 100:+.1f} % (no suspension)")
        elif label != "good device alone":
            note = f"   ({cpu / alone * 100:.0f} % of alone)"
        print(f"   {label:<34}: {cpu:>9,.0f} good frames/s per CPU s (wall {wall:,.0f}/s){note}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    host = PluginHost()
    host.sync({("Plugin", "acme"): plugin("acme", acme_wasm()),
               ("Plugin", "derive"): plugin("derive", DERIVE_STAR.read_bytes(), "transform",
                                            starlark=True)})
    try:
        bench_codec(host, args.seconds)
        bench_transform(host, args.seconds)
    finally:
        host.close()
    bench_hostile(args.seconds)
    registry.host().close()


if __name__ == "__main__":
    main()
