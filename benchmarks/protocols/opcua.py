"""OPC UA data-change notifications/s: the opcua binding through the asyncio↔Trio bridge vs a
plain asyncio asyncua client, against the same server, in one run.

    python benchmarks/protocols/opcua.py [--vars 100] [--hz 10] [--seconds 10] [--rounds 2]

The server (asyncua, another process) changes ``--vars`` Double variables ``--hz`` times a
second. Each client subscribes to all of them (publishing and sampling interval = 1/hz) and
counts the notifications it gets during ``--seconds``:

* plain: ``asyncua.Client`` + a subscription handler in ``asyncio.run`` (the library's own way);
* bridge: :class:`twin.bindings.opcua.OpcUaBinding` in Trio (asyncua on the bridge's asyncio
  thread, every notification turned into a checked Reading and handed to a Trio channel: what
  the engine's device task receives).

Rounds alternate plain/bridge; the figures are the mean of the rounds, with the client process's
CPU seconds per 1000 notifications (the bridge's cost shows there, not in the rate, which the
server sets).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import socket
import subprocess
import sys
import time
from typing import Any


def serve(port: int, nvars: int, hz: float) -> None:
    from asyncua import Server, ua

    async def main() -> None:
        s = Server()
        await s.init()
        s.set_endpoint(f"opc.tcp://127.0.0.1:{port}/bench/")
        idx = await s.register_namespace("urn:bench")
        obj = await s.nodes.objects.add_object(f"ns={idx};s=B", ua.QualifiedName("B", idx))
        nodes = [
            await obj.add_variable(f"ns={idx};s=v{i}", ua.QualifiedName(f"v{i}", idx), 0.0)
            for i in range(nvars)
        ]
        async with s:
            print("ready", flush=True)
            k = 0
            period = 1.0 / hz
            nxt = time.monotonic()
            while True:
                k += 1
                for i, n in enumerate(nodes):
                    await n.write_value(ua.Variant(k + i / 1000.0, ua.VariantType.Double))
                nxt += period
                await asyncio.sleep(max(0.0, nxt - time.monotonic()))

    asyncio.run(main())


def plain(endpoint: str, nvars: int, hz: float, seconds: float) -> tuple[int, float]:
    from asyncua import Client, ua

    async def main() -> tuple[int, float]:
        count = 0

        class Handler:
            def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
                nonlocal count
                count += 1

        async with Client(endpoint) as c:
            params = ua.CreateSubscriptionParameters()
            params.RequestedPublishingInterval = 1000.0 / hz
            params.RequestedLifetimeCount = 10_000
            params.RequestedMaxKeepAliveCount = 10
            params.MaxNotificationsPerPublish = 10_000
            params.PublishingEnabled = True
            params.Priority = 0
            sub = await c.create_subscription(params, Handler())
            nodes = [c.get_node(f"ns=2;s=v{i}") for i in range(nvars)]
            await sub.subscribe_data_change(nodes, sampling_interval=1000.0 / hz)
            await asyncio.sleep(1.0)  # warm-up: initial values
            count = 0
            cpu0, t0 = time.process_time(), time.perf_counter()
            await asyncio.sleep(seconds)
            n, cpu = count, time.process_time() - cpu0
            rate = n / (time.perf_counter() - t0)
            return int(rate * seconds), cpu

    return asyncio.run(main())


def bridged(endpoint: str, nvars: int, hz: float, seconds: float) -> tuple[int, float]:
    import trio

    from twin.bindings import aio
    from twin.bindings.base import Message, Reading
    from twin.bindings.opcua import OpcUaBinding

    async def main() -> tuple[int, float]:
        opts = {
            "endpoint": endpoint,
            "publishing_interval": f"{1000.0 / hz:g}ms",
            "sampling_interval": f"{1000.0 / hz:g}ms",
            "heartbeat": "5s",
            "history": {"backfill": False},
            "points": {f"v{i}": {"node": f"ns=2;s=v{i}"} for i in range(nvars)},
        }
        b = OpcUaBinding("bench", opts)
        await b.connect()
        count = 0
        send, recv = trio.open_memory_channel[Message](256)  # the engine's channel size
        result: tuple[int, float] = (0, 0.0)
        async with trio.open_nursery() as n:
            n.start_soon(b.subscribe, send)

            async def consume() -> None:
                nonlocal count
                async for m in recv:
                    if isinstance(m, Reading):
                        count += 1

            n.start_soon(consume)
            await trio.sleep(1.0)
            count = 0
            cpu0, t0 = time.process_time(), time.perf_counter()
            await trio.sleep(seconds)
            c, cpu = count, time.process_time() - cpu0
            result = (int(c / (time.perf_counter() - t0) * seconds), cpu)
            n.cancel_scope.cancel()
        await b.close()
        return result

    try:
        return trio.run(main)
    finally:
        aio.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vars", type=int, default=100)
    ap.add_argument("--hz", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(a.serve, a.vars, a.hz)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--vars", str(a.vars), "--hz", str(a.hz)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("ready")
        endpoint = f"opc.tcp://127.0.0.1:{port}/bench/"
        expected = a.vars * a.hz * a.seconds
        res: dict[str, list[tuple[int, float]]] = {"plain asyncio": [], "bridge (Trio)": []}
        for _ in range(a.rounds):
            res["plain asyncio"].append(plain(endpoint, a.vars, a.hz, a.seconds))
            res["bridge (Trio)"].append(bridged(endpoint, a.vars, a.hz, a.seconds))
        print(f"{a.vars} variables x {a.hz:g} Hz = {a.vars * a.hz:,.0f} changes/s offered, "
              f"{a.seconds:g} s x {a.rounds} rounds")
        print(f"{'client':<16}{'notif/s':>10}{'of offered':>12}{'CPU s/1000':>12}")
        rates = {}
        for name, rows in res.items():
            n = sum(r[0] for r in rows) / len(rows)
            cpu = sum(r[1] for r in rows) / len(rows)
            rates[name] = n / a.seconds
            per_k = cpu / max(n, 1) * 1000
            print(f"{name:<16}{n / a.seconds:>10,.0f}{n / expected:>12.1%}{per_k:>12.3f}")
        base = rates["plain asyncio"]
        ratio = rates["bridge (Trio)"] / base if base else math.nan
        print(f"bridge / plain: {ratio:.2f}x (goal >= 0.8x)")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
