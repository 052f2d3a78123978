"""MQTT ingest through a Wasm codec: messages per second from devices' TCP connections through
the embedded broker, the hub and the MQTT bindings' codec (the demo's ACME TH-8 decoder) into
the device channels — one plugin call per message, against one call per what arrived together
(``Broker.prefetch``: the publishes of one socket read decoded in one call per codec).

    python benchmarks/plugins/mqtt_codec.py [--seconds 5] [--devices 8] [--qos 0] [--rounds 3]

The publishers run in another process (raw MQTT 3.1.1 frames, written out here, sent in
blocks of ``--chunk`` publishes per ``sendall`` per device, as fast as TCP takes them): the
engine side is the bottleneck. Rounds alternate (per message, batched, per message, ...) so the
load from other jobs on the shared machine hits both alike; each round reports messages/s
(wall) and per CPU second of the engine process. No write-ahead log here (QoS 1 acks are not
held): what is measured is the decode path of the broker.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.plugins.modules import acme_wasm, plugin  # noqa: E402


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def connect_frame(client_id: str) -> bytes:
    body = _str("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 0) + _str(client_id)
    return bytes([0x10]) + _varint(len(body)) + body


def publish_frame(topic: str, payload: bytes, qos: int, pid: int) -> bytes:
    body = _str(topic) + (struct.pack("!H", pid) if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + _varint(len(body)) + body


def frame(i: int) -> bytes:
    return b"\xa5\x01" + struct.pack(">hHH", 2000 + i % 500, 4000 + i % 3000, 3000)


# -- the publishers (their own process) -------------------------------------------------------
def publish(port: int, devices: int, seconds: float, qos: int, chunk: int) -> None:
    stop = time.monotonic() + seconds

    def one(d: int) -> None:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(connect_frame(f"bench-d{d}"))
        assert s.recv(4)[:1] == b"\x20"
        if qos:  # drain the PUBACKs (until the socket closes)
            def drain() -> None:
                with contextlib.suppress(OSError):
                    while s.recv(65536):
                        pass

            threading.Thread(target=drain, daemon=True).start()
        topic = f"flux/s/d{d}/telemetry"
        blocks = [b"".join(publish_frame(topic, frame(i + k), qos, 1 + (i + k) % 60000)
                           for k in range(chunk)) for i in range(0, 20 * chunk, chunk)]
        n = 0
        while time.monotonic() < stop:
            s.sendall(blocks[n % len(blocks)])
            n += 1
        s.shutdown(socket.SHUT_WR)
        time.sleep(0.5)
        s.close()

    threads = [threading.Thread(target=one, args=(d,)) for d in range(devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- the engine side ----------------------------------------------------------------------------
def engine_round(batched: bool, devices: int, seconds: float, qos: int, chunk: int) -> dict[str, float]:
    import trio

    from twin.bindings.base import BindingContext, Message, Reading
    from twin.bindings.mqtt import MqttBinding
    from twin.mqtt.broker import Broker, BrokerConfig
    from twin.mqtt.hub import EmbeddedTransport, MqttHub
    from twin.plugins import registry

    out: dict[str, float] = {}

    async def main() -> None:
        host = registry.host()
        host.sync({("Plugin", "acme"): plugin("acme", acme_wasm())})
        broker = Broker(BrokerConfig(listen=[("127.0.0.1", 0)]))
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(broker.run)
            transport = EmbeddedTransport(broker)
            hub = MqttHub(transport)
            transport.hub = hub
            await nursery.start(transport.run)
            if batched:
                from twin.runtime.mqtt_service import prefetch_hook

                # the QoS >= 1 path before a write-ahead log: none here, so off (as in an
                # engine without one); delivery-side batching (LocalClient.on_batch) is on
                broker.prefetch = prefetch_hook(broker, hub, lambda: False)
            elif hasattr(transport.client, "on_batch"):
                transport.client.on_batch = None  # one codec call per message, as before
            counts = [0]
            bindings = []
            for d in range(devices):
                b = MqttBinding(f"d{d}", {"codec": "acme", "qos": qos},
                                {"metadata": {"name": f"d{d}", "site": "s"}}, BindingContext(), hub=hub)
                send, recv = trio.open_memory_channel[Message](100_000)
                bindings.append(b)
                nursery.start_soon(b.subscribe, send)

                async def consume(recv: Any = recv) -> None:
                    async for first in recv:  # then what is queued, in one turn (a device task)
                        batch = [first]
                        while len(batch) < 4096:
                            try:
                                batch.append(recv.receive_nowait())
                            except trio.WouldBlock:
                                break
                        counts[0] += sum(1 for m in batch
                                         if isinstance(m, Reading) and m.point == "temperature")

                nursery.start_soon(consume)
            with trio.fail_after(10):
                while not all(b.subscribed for b in bindings):  # noqa: ASYNC110
                    await trio.sleep(0.01)
            pub = await trio.lowlevel.open_process(
                [sys.executable, __file__, "--publish", str(addrs[0][1]), "--devices", str(devices),
                 "--seconds", str(seconds + 1.0), "--qos", str(qos), "--chunk", str(chunk)])
            await trio.sleep(0.5)  # connected and sending
            c0, w0, n0 = time.process_time(), time.perf_counter(), counts[0]
            await trio.sleep(seconds)
            c1, w1, n1 = time.process_time(), time.perf_counter(), counts[0]
            await pub.wait()
            out["msgs_wall"] = (n1 - n0) / (w1 - w0)
            out["msgs_cpu"] = (n1 - n0) / (c1 - c0)
            out["cpu_share"] = (c1 - c0) / (w1 - w0)
            out["dropped"] = sum(b.dropped for b in bindings)
            stats = host.stats["acme"]
            out["per_call"] = stats.items / max(1, stats.calls)
            nursery.cancel_scope.cancel()
        host.sync({})
        host.stats.clear()

    trio.run(main)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--qos", type=int, default=0, choices=(0, 1))
    ap.add_argument("--chunk", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="single,batched")
    ap.add_argument("--publish", type=int)
    args = ap.parse_args()
    if args.publish:
        publish(args.publish, args.devices, args.seconds, args.qos, args.chunk)
        return
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {args.devices} devices, "
          f"QoS {args.qos}, {args.chunk} publishes per send, {args.seconds:g} s rounds")
    modes = args.modes.split(",")
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            r = engine_round(mode == "batched", args.devices, args.seconds, args.qos, args.chunk)
            results[mode].append(r)
            print(f"  {mode:<8}: {r['msgs_wall']:>9,.0f} msgs/s wall, {r['msgs_cpu']:>9,.0f} per CPU s "
                  f"(engine CPU {r['cpu_share'] * 100:.0f} %), {r['per_call']:.1f} msgs per codec call, "
                  f"dropped {r['dropped']:.0f}", flush=True)
    for mode, rs in results.items():
        wall = sorted(r["msgs_wall"] for r in rs)[len(rs) // 2]
        cpu = sorted(r["msgs_cpu"] for r in rs)[len(rs) // 2]
        print(f"median {mode:<8}: {wall:,.0f} msgs/s wall, {cpu:,.0f} msgs per CPU s")
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
