"""CoAP GET/s with aiocoap's client: through the asyncio↔Trio bridge vs plain asyncio, against
the same aiocoap server, in one run; and POST/s into the engine's CoAP server (readings to the
write-ahead-log-less device path, device key checked).

    python benchmarks/protocols/coap.py [--slices 100] [--slice 0.1] [--concurrency 1 10]

* server: an aiocoap server in another process with one resource (``GET /v`` -> 8 bytes);
* plain: ``--concurrency`` asyncio tasks each awaiting ``ctx.request(GET).response`` in a loop;
* bridge: the same number of Trio tasks each doing ``await aio.run(lambda:
  ctx.request(GET).response)`` (what :class:`twin.bindings.coap.CoapBinding` does when it
  polls a device);
* engine server: ``--concurrency`` plain aiocoap clients POSTing ``{"t": 1.5}`` to
  ``/d/{device}?k=KEY`` of :class:`twin.runtime.coap_service.CoapService` in an engine in this
  process (every request crosses the bridge twice and checks the key): requests/s.

Both clients are set up once and take turns in short slices (bridge, plain, bridge, ...;
``rounds.py``): pooled rates, their ratio, per-slice ratios, process CPU time per GET. The
engine-server figure runs ``--seconds`` per client count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import PlainLoop, Round, interleave, report


def free_udp() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(port: int) -> None:
    import aiocoap
    from aiocoap import resource

    class V(resource.Resource):
        async def render_get(self, request: Any) -> Any:
            return aiocoap.Message(payload=b"12345678")

    async def main() -> None:
        site = resource.Site()
        site.add_resource(["v"], V())
        await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", port))
        print("ready", flush=True)
        await asyncio.get_running_loop().create_future()

    asyncio.run(main())


def _get(remote: Any) -> Any:
    """``GET /v`` to an already resolved remote. With ``uri=`` aiocoap resolves the host on
    every request through ``loop.getaddrinfo``, i.e. a hop to asyncio's executor thread and
    back: a thread wake-up per request in the *plain* baseline too, which on a loaded machine
    waits for a core as long as the bridge's own hops and drowned the comparison."""
    from aiocoap import GET, Message

    msg = Message(code=GET, uri_path=("v",))
    msg.remote = remote
    return msg


async def _loop(ctx: Any, remote: Any, deadline: float, r: Round) -> None:
    while (t := time.perf_counter()) < deadline:
        await ctx.request(_get(remote)).response
        r.count(t)


def measure(uri: str, conc: int, slices: int, slice_s: float) -> list[list[Round]]:
    """Bridge and plain clients set up once, then interleaved slices (rounds.py)."""
    import trio

    from twin.bindings import aio

    plain_loop = PlainLoop()

    async def main() -> list[list[Round]]:
        from aiocoap import GET, Context, Message

        create: Any = Context.create_client_context
        pctx = await plain_loop.run(create)
        bctx = await aio.run(create)

        async def first(ctx: Any) -> Any:
            return (await ctx.request(Message(code=GET, uri=uri)).response).remote

        premote = await plain_loop.run(lambda: first(pctx))
        bremote = await aio.run(lambda: first(bctx))

        async def plain_slice(secs: float) -> Round:
            async def go() -> Round:
                r = Round()
                r.start()
                deadline = time.perf_counter() + secs
                await asyncio.gather(*(_loop(pctx, premote, deadline, r) for _ in range(conc)))
                r.stop()
                return r

            return await plain_loop.run(go)  # type: ignore[no-any-return]

        async def bridge_slice(secs: float) -> Round:
            async def worker(deadline: float) -> None:
                while (t := time.perf_counter()) < deadline:
                    req: Any = lambda: bctx.request(_get(bremote)).response  # noqa: E731
                    await aio.run(req)
                    r.count(t)

            r = Round()
            r.start()
            deadline = time.perf_counter() + secs
            async with trio.open_nursery() as n:
                for _ in range(conc):
                    n.start_soon(worker, deadline)
            r.stop()
            return r

        await interleave([bridge_slice, plain_slice], 3, slice_s)  # warm-up
        rounds = await interleave([bridge_slice, plain_slice], slices, slice_s)
        await plain_loop.run(pctx.shutdown)
        shutdown: Any = bctx.shutdown
        await aio.run(shutdown)
        return rounds

    try:
        return trio.run(main)
    finally:
        aio.shutdown()
        plain_loop.close()


def engine_server(conc: int, seconds: float) -> float:
    """POST/s into the engine's CoAP server (aiocoap clients in a thread of their own)."""
    import threading

    import trio

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from runtime.helpers import apply, fast_config, model, running_engine, site

    from twin.registry import open_registry
    from twin.registry.credentials import create_device_key
    from twin.runtime.coap_service import CoapService

    tmp = Path(tempfile.mkdtemp())
    reg = open_registry(None, tmp / "state")
    dev = {"apiVersion": "flux.iot/v1", "kind": "Device",
           "metadata": {"name": "m1", "site": "plant-a"},
           "spec": {"type": "sensor", "model": "th-sensor", "binding": {"coap": {}},
                    "heartbeat": {"interval": "1s", "timeout": "60s"}}}
    apply(reg, site(), model(), dev)
    _, key = create_device_key(reg, "m1")
    port = free_udp()
    svc = CoapService(("127.0.0.1", port))
    uri = f"coap://127.0.0.1:{port}/d/m1?k={key}"
    out: list[float] = []

    def clients() -> None:
        from aiocoap import POST, Context, Message

        async def loop(ctx: Any, deadline: float) -> int:
            n = 0
            while time.perf_counter() < deadline:
                msg = Message(code=POST, uri=uri, payload=b'{"temperature": 1.5}')
                msg.opt.content_format = 50
                resp = await ctx.request(msg).response
                assert resp.code.is_successful(), resp
                n += 1
            return n

        async def main() -> None:
            ctx = await Context.create_client_context()
            await loop(ctx, time.perf_counter() + 0.5)
            t0 = time.perf_counter()
            counts = await asyncio.gather(*(loop(ctx, t0 + seconds) for _ in range(conc)))
            out.append(sum(counts) / (time.perf_counter() - t0))
            await ctx.shutdown()

        asyncio.run(main())

    async def main() -> None:
        async with running_engine(reg, fast_config(state_dir=tmp), [svc]):
            with trio.fail_after(10):
                while not svc.hub.running("m1"):  # noqa: ASYNC110
                    await trio.sleep(0.02)
            t = threading.Thread(target=clients)
            t.start()
            await trio.to_thread.run_sync(t.join)

    trio.run(main)
    reg.close()
    return out[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--slice", type=float, default=0.1, help="seconds per slice")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(a.serve)
        return
    port = free_udp()
    # like modbus.py: this process on one core, the server on the other (a wake-up of the
    # server then does not preempt the client on its own core)
    two_cores = (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity")
    cmd = [sys.executable, __file__, "--serve", str(port)]
    if two_cores:
        os.sched_setaffinity(0, {0})
        cmd = ["taskset", "-c", "1", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("ready")
        uri = f"coap://127.0.0.1:{port}/v"
        print(f"aiocoap GET /v, {a.slices} slices of {a.slice * 1000:g} ms per mode, "
              f"interleaved; load average {os.getloadavg()[0]:.2f}")
        for conc in a.concurrency:
            rounds = measure(uri, conc, a.slices, a.slice)
            report(f"GET /v, {conc} caller(s)", ("bridge (Trio, aio.run)", "plain asyncio"),
                   rounds, "GET")
    finally:
        proc.terminate()
        proc.wait(10)
    for conc in a.concurrency:
        rate = engine_server(conc, a.seconds)
        print(f"{f'engine server POST, {conc} client(s)':<34}{rate:>10,.0f} POST/s (key checked, "
              "device task)")


if __name__ == "__main__":
    main()
