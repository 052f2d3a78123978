"""The modbus binding's Trio-native Modbus TCP path and the asyncio↔Trio bridge, against
plain asyncio pymodbus, in one run; and polling at scale.

    python benchmarks/protocols/modbus.py [--slices 100] [--slice 0.1] [--devices 500] [--poll-seconds 20]

1. Requests/s: ``read_holding_registers(0, count=10)`` in a loop on 1 and on 10 connections,
   (a) plain asyncio (``asyncio.run``, the pymodbus client awaited directly), (b) the same
   client driven from Trio through ``twin.bindings.aio.run`` (one call per request: the
   bridge OPC UA, CoAP and serial Modbus use), (c) the binding's request path (``Line.call``:
   one request PDU through the line's fair lock, timeout and metrics, over the Trio-native
   transport, ``twin/bindings/modbus_transport.py``), (d) the binding's poll path
   (``Line.exchange``: a device's cycle of two requests, as ``ModbusBinding.poll`` reads).
   The binding's modes build a fresh request PDU per request, as the binding does. The server is
   a plain pymodbus server in another process (pinned to the other core when there are two).
   Each mode is set up once (its own connections), then they take turns in short slices
   (bridge, binding, plain, bridge, ...; ``rounds.py``): pooled rates, their ratio to plain,
   per-slice ratios, and process CPU time per request.
2. Scale: ``--devices`` ModbusBinding devices x 30 points (20 in input registers: 10 float32
   + 10 int16; 10 holding-register uint16; two coalesced requests per device) polled every
   second through 50 simulated gateways (10 units each, one shared connection per gateway),
   in this process pinned to one core. Prints the share of late polls (a poll that starts
   more than 10 % of its interval late, or a scheduled poll skipped after an overrun),
   readings/s and the CPU the process used.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import PlainLoop, Round, interleave, report  # noqa: E402

from twin.bindings import aio  # noqa: E402
from twin.bindings.modbus import Line, ModbusBinding, _request  # noqa: E402
from twin.bindings.modbus_codec import Block  # noqa: E402


# -- the peer (another process) ----------------------------------------------------------------
def serve(ports: list[int], units: int) -> None:
    import logging

    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    logging.basicConfig(level=logging.CRITICAL)

    async def main() -> None:
        servers = []
        for port in ports:
            devices = [
                SimDevice(
                    u,
                    simdata=(
                        [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                        [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                        [SimData(0, count=64, values=list(range(64)), datatype=DataType.REGISTERS)],
                        [SimData(0, count=64, values=list(range(64)), datatype=DataType.REGISTERS)],
                    ),
                )
                for u in range(1, units + 1)
            ]
            s = ModbusTcpServer(devices, address=("127.0.0.1", port))
            await s.serve_forever(background=True)
            servers.append(s)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [int(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


def start_server(ports: list[int], units: int, cpu: int | None) -> subprocess.Popen[str]:
    cmd = [sys.executable, __file__, "--serve", ",".join(map(str, ports)), "--units", str(units)]
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("modbus server did not start")
    return proc


def make_client(port: int) -> Any:
    from pymodbus.client import AsyncModbusTcpClient

    return AsyncModbusTcpClient("127.0.0.1", port=port, timeout=5, retries=0, reconnect_delay=0)


CYCLE = 2
"""Requests per poll cycle in the "binding cycle" mode: the scale test's devices (30 points)
coalesce into two requests, read in one ``Line.exchange``."""
BLOCK = Block(3, 0, 10, [])
"""What every mode reads: holding registers 0-9 of unit 1."""


# -- 1. requests/s -------------------------------------------------------------------------------
def load_aio(path: str) -> Any:
    """Another tree's ``twin/bindings/aio.py`` as a module of its own (A/B in one run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("aio_other", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def measure(port: int, conns: int, slices: int, slice_s: float, other: Any = None) -> list[list[Round]]:
    """The modes set up once (their own connections each), then interleaved slices."""
    plain_loop = PlainLoop()

    async def main() -> list[list[Round]]:
        async def p_connect() -> list[Any]:
            clients = [make_client(port) for _ in range(conns)]
            for c in clients:
                await c.connect()
            return clients

        pclients = await plain_loop.run(p_connect)
        bclients = [await aio.run(lambda: make_client(port)) for _ in range(conns)]
        for c in bclients:
            await aio.run(c.connect)
        # one Line (the binding's shared connection to a gateway) per connection
        lines = [Line(("tcp", "127.0.0.1", str(port), f"bench{i}"),
                      {"host": "127.0.0.1", "port": port, "timeout": "5s"}) for i in range(conns)]
        for line in lines:
            async with line.lock:
                await line._ensure()

        oclients = []
        if other is not None:
            oclients = [await other.run(lambda: make_client(port)) for _ in range(conns)]
            for c in oclients:
                await other.run(c.connect)

        async def bridged_slice(run: Any, clients: list[Any], secs: float) -> Round:
            """Each client reads in a loop through ``run`` (a bridge's ``run``) for ``secs``."""
            async def worker(c: Any, stop: float) -> None:
                while (t := time.perf_counter()) < stop:
                    await run(lambda: c.read_holding_registers(0, count=10, device_id=1))
                    r.count(t)

            r = Round()
            r.start()
            stop = time.perf_counter() + secs
            async with trio.open_nursery() as n:
                for c in clients:
                    n.start_soon(worker, c, stop)
            r.stop()
            return r

        async def other_slice(secs: float) -> Round:
            assert other is not None
            return await bridged_slice(other.run, oclients, secs)

        async def plain_slice(secs: float) -> Round:
            async def worker(c: Any, stop: float, r: Round) -> None:
                while (t := time.perf_counter()) < stop:
                    await c.read_holding_registers(0, count=10, device_id=1)
                    r.count(t)

            async def go() -> Round:
                r = Round()
                r.start()
                stop = time.perf_counter() + secs
                await asyncio.gather(*(worker(c, stop, r) for c in pclients))
                r.stop()
                return r

            return await plain_loop.run(go)  # type: ignore[no-any-return]

        async def bridge_slice(secs: float) -> Round:
            return await bridged_slice(aio.run, bclients, secs)

        async def binding_slice(secs: float) -> Round:
            async def worker(line: Line, stop: float) -> None:
                while (t := time.perf_counter()) < stop:
                    await line.call("bench", _request(BLOCK, 1), 5.0, 0)
                    r.count(t)

            r = Round()
            r.start()
            stop = time.perf_counter() + secs
            async with trio.open_nursery() as n:
                for line in lines:
                    n.start_soon(worker, line, stop)
            r.stop()
            return r

        async def cycle_slice(secs: float) -> Round:
            """The binding's poll path: a device's cycle of CYCLE requests (``Line.exchange``)."""
            async def worker(line: Line, stop: float) -> None:
                while (t := time.perf_counter()) < stop:
                    cycle = [_request(BLOCK, 1) for _ in range(CYCLE)]
                    for res in await line.exchange("bench", cycle, 5.0, 0):
                        assert not isinstance(res, Exception), res
                        r.count(t)

            r = Round()
            r.start()
            stop = time.perf_counter() + secs
            async with trio.open_nursery() as n:
                for line in lines:
                    n.start_soon(worker, line, stop)
            r.stop()
            return r

        modes = [bridge_slice, binding_slice, cycle_slice, plain_slice]
        if other is not None:
            modes.insert(3, other_slice)
        await interleave(modes, 3, slice_s)  # warm-up
        rounds = await interleave(modes, slices, slice_s)
        for line in lines:
            await line._drop()
        for c in bclients:
            await aio.run(c.close)
        for c in oclients:
            await other.run(c.close)

        async def p_close() -> None:
            for c in pclients:
                c.close()

        await plain_loop.run(p_close)
        return rounds

    try:
        return trio.run(main)
    finally:
        aio.shutdown()
        if other is not None:
            other.shutdown()
        plain_loop.close()


# -- 2. polling at scale -----------------------------------------------------------------------
def points30() -> dict[str, Any]:
    pts: dict[str, Any] = {}
    for i in range(10):
        pts[f"f{i}"] = {"register": 30001 + 2 * i, "type": "float32"}
        pts[f"s{i}"] = {"register": 30021 + i, "type": "int16"}
        pts[f"h{i}"] = {"register": 40001 + i, "type": "uint16"}
    return pts


def scale(ports: list[int], devices: int, seconds: float) -> dict[str, float]:
    per_gw = max(1, devices // len(ports))

    async def main() -> dict[str, float]:
        bindings = []
        for i in range(devices):
            port = ports[(i // per_gw) % len(ports)]
            unit = i % per_gw + 1
            bindings.append(ModbusBinding(f"dev{i}", {"host": "127.0.0.1", "port": port, "unit": unit,
                                                      "poll": "1s", "timeout": "1s", "retries": 1,
                                                      "points": points30()}))
        send, receive = trio.open_memory_channel[Any](10000)
        readings = 0

        async def consume() -> None:
            nonlocal readings
            async for _ in receive:
                readings += 1

        for b in bindings:
            await b.connect()
        t0, c0 = time.perf_counter(), time.process_time()
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as n:
                n.start_soon(consume)
                for k, b in enumerate(bindings):
                    # spread the phases over the second, as a real fleet started over time is
                    n.start_soon(_delayed, b, send, k / devices)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        polls = sum(g.polls for b in bindings for g in b.groups)
        late = sum(g.late for b in bindings for g in b.groups)
        missed = sum(g.missed for b in bindings for g in b.groups)
        for b in bindings:
            await b.close()
        return {"polls": polls, "late": late, "missed": missed, "readings_s": readings / wall, "cpu": cpu / wall,
                "requests": sum(1 for b in bindings for g in b.groups for _ in g.blocks)}

    try:
        return trio.run(main)
    finally:
        aio.shutdown()


async def _delayed(b: ModbusBinding, send: Any, delay: float) -> None:
    await trio.sleep(delay)
    await b.subscribe(send)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve")
    ap.add_argument("--units", type=int, default=1)
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--slice", type=float, default=0.1, help="seconds per slice")
    ap.add_argument("--devices", type=int, default=500)
    ap.add_argument("--poll-seconds", type=float, default=20.0)
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--ab", metavar="AIO_PY", help="also run another tree's twin/bindings/aio.py "
                    "(e.g. main's) as a mode of its own, interleaved: A/B in one run")
    args = ap.parse_args()
    if args.serve:
        serve([int(p) for p in args.serve.split(",")], args.units)
        return
    two_cores = (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity")
    if two_cores:
        os.sched_setaffinity(0, {0})  # this process (the engine side) on one core
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    (port,) = free_ports(1)
    server = start_server([port], 1, 1 if two_cores else None)
    try:
        other = load_aio(args.ab) if args.ab else None
        names = ["bridge (aio.run)", "binding Trio (Line.call)", f"binding Trio cycle ({CYCLE} req)", "plain asyncio"]
        if other is not None:
            names.insert(3, "bridge (--ab aio.run)")
        for conns in (1, 10):
            rounds = measure(port, conns, args.slices, args.slice, other)
            report(f"pymodbus read_holding_registers(0, count=10), {conns} connection(s), "
                   f"{args.slice * 1000:g} ms slices", names, rounds)
    finally:
        server.terminate()
        server.wait()
    if args.skip_scale:
        return
    ports = free_ports(50)
    server = start_server(ports, 10, 1 if two_cores else None)
    try:
        r = scale(ports, args.devices, args.poll_seconds)
    finally:
        server.terminate()
        server.wait()
    pct = 100.0 * (r["late"] + r["missed"]) / max(1, r["polls"] + r["missed"])
    print(f"\n{args.devices} devices x 30 points every 1 s ({r['requests']:.0f} coalesced requests "
          f"per round, 50 gateways x 10 units), {args.poll_seconds:.0f} s:")
    print(f"  polls {r['polls']:.0f}, late {r['late']:.0f} + missed {r['missed']:.0f} ({pct:.2f} %), readings/s {r['readings_s']:,.0f}, "
          f"CPU {100 * r['cpu']:.0f} % of one core")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
