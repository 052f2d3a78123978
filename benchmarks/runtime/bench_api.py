"""Benchmark: HTTP ingest, heartbeat timeouts, ingest->WebSocket latency, GET /devices.

    .venv/bin/python benchmarks/runtime/bench_api.py [--devices 10000] [--seconds 15] \
        [--procs 2] [--conns 16] [--rate 0]

The engine + API run in this process (a temporary state dir, N push-mode http devices, one
device key each). Load comes from ``--procs`` separate processes (raw keep-alive HTTP/1.1 over
non-blocking sockets, so the load generator does not eat the engine's CPU); the engine's CPU is
measured with getrusage(RUSAGE_SELF), which excludes those child processes. Phases:

1. warm-up: every device posts once (argon2 once per key, then the in-memory key cache);
2. ingest: every request carries ``--batch`` readings (default 1) stamped with the sender's
   clock;
   a WebSocket client in another process subscribed to 1% of the devices measures
   receive time - reading ts (ingest -> WebSocket, end to end);
3. heartbeat: load stops; every device must go offline at last_seen + timeout; reports how late
   the engine noticed (max and p99 over all devices);
4. GET /api/v1/devices?limit=100 from ``--procs`` processes (requests/s and p99).

Prints figures; no thresholds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import selectors
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))] if s else float("nan")


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- load generator (child processes) -------------------------------------------------------------
def _response_done(buf: bytes) -> int:
    """Length of the first complete response in buf (0: incomplete)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return 0
    head = buf[:end].lower()
    i = head.find(b"content-length:")
    n = (
        int(head[i + 15 : head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None])
        if i >= 0
        else 0
    )
    total = end + 4 + n
    return total if len(buf) >= total else 0


def load_worker(
    host: str,
    port: int,
    jobs: list[tuple[str, str]],
    conns: int,
    start_at: float,
    seconds: float,
    mode: str,
    rate: float,
    out: Any,
    batch: int = 1,
) -> None:
    """mode 'ingest': jobs = (path, device key); 'get': jobs = (path, bearer token)."""
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(conns):
        s = socket.create_connection((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        socks.append(s)
    while time.time() < start_at:
        time.sleep(0.001)
    deadline = time.time() + seconds
    lat: list[float] = []
    codes: dict[int, int] = {}
    nxt = [0]
    interval = conns / rate if rate > 0 else 0.0

    def build() -> bytes:
        path, auth = jobs[nxt[0] % len(jobs)]
        nxt[0] += 1
        if mode == "get":
            return (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Authorization: Bearer {auth}\r\n\r\n"
            ).encode()
        if batch == 1:
            doc: dict[str, Any] = {"values": {"temperature": 21.5}, "ts": time.time()}
        else:
            now = time.time()
            doc = {
                "readings": [{"point": f"p{i}", "value": 21.5 + i, "ts": now} for i in range(batch)]
            }
        body = json.dumps(doc).encode()
        return (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nX-Device-Key: {auth}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    state: dict[socket.socket, list[Any]] = {}
    for s in socks:
        s.sendall(build())
        state[s] = [b"", time.perf_counter()]
        sel.register(s, selectors.EVENT_READ)
    busy = len(socks)
    while time.time() < deadline and busy:
        for key, _ in sel.select(timeout=0.1):
            s = key.fileobj  # type: ignore[assignment]
            st = state[s]
            data = s.recv(65536)
            if not data:
                sel.unregister(s)
                continue
            st[0] += data
            n = _response_done(st[0])
            if not n:
                continue
            code = int(st[0][9:12])
            codes[code] = codes.get(code, 0) + 1
            st[0] = st[0][n:]
            now = time.perf_counter()
            lat.append(now - st[1])
            if interval:
                time.sleep(max(0.0, st[1] + interval - now))
            st[1] = time.perf_counter()
            if mode == "warm" and nxt[0] >= len(jobs):  # one pass over the devices
                busy -= 1
                continue
            s.sendall(build())
    for s in socks:
        s.close()
    out.put({"lat": lat, "codes": codes})


def ws_worker(
    url: str, token: str, devices: list[str], ready: Any, out: Any, seconds: float
) -> None:
    from websockets.sync.client import connect

    lat: list[float] = []
    q = "&".join(f"devices={d}" for d in [",".join(devices)])
    with connect(f"{url}?kinds=reading&batch=500&{q}", subprotocols=["bearer", token]) as ws:  # type: ignore[list-item]
        json.loads(ws.recv())  # hello
        ready.set()
        end = time.time() + seconds
        while time.time() < end:
            try:
                frame = json.loads(ws.recv(timeout=max(0.01, end - time.time())))
            except TimeoutError:
                break
            now = time.time()
            for msg in frame if isinstance(frame, list) else [frame]:
                if msg.get("kind") == "reading":
                    lat.append(now - float(msg["ts"]))
    out.put({"ws": lat})


async def collect(procs: list[Any], q: Any) -> tuple[list[float], dict[int, int]]:
    """Latencies and status counts of the load processes started by ``run_load`` (joined)."""
    lat: list[float] = []
    codes: dict[int, int] = {}
    for _ in procs:
        r = await trio.to_thread.run_sync(q.get)
        lat += r["lat"]
        for c, n in r["codes"].items():
            codes[c] = codes.get(c, 0) + n
    for p in procs:
        await trio.to_thread.run_sync(p.join)
    return lat, codes


def run_load(
    host: str,
    port: int,
    jobs: list[tuple[str, str]],
    args: argparse.Namespace,
    mode: str,
    seconds: float,
) -> tuple[list[float], dict[int, int], float]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start_at = time.time() + 1.5
    procs = []
    for k in range(args.procs):
        part = jobs[k :: args.procs]
        p = ctx.Process(
            target=load_worker,
            args=(
                host,
                port,
                part,
                args.conns,
                start_at,
                seconds,
                mode,
                args.rate / args.procs,
                q,
                args.batch if mode == "ingest" else 1,
            ),
        )
        p.start()
        procs.append(p)
    return procs, q, start_at  # type: ignore[return-value]


# -- the engine side ---------------------------------------------------------------------------
def make_keys(names: list[str]) -> list[tuple[str, str, str]]:
    import secrets as _s

    from twin.api.auth import DEVICE_KEY_HASHER

    out = []
    for name in names:
        kid, secret = _s.token_hex(6), _s.token_urlsafe(24)
        out.append((name, kid, secret, DEVICE_KEY_HASHER.hash(secret)))  # type: ignore[arg-type]
    return out  # type: ignore[return-value]


async def main(args: argparse.Namespace) -> None:
    from runtime.helpers import apply, fast_config, model, sim_device, site

    from twin.api import auth
    from twin.api.app import ApiSettings
    from twin.api.ratelimit import Rate
    from twin.api.server import ApiService
    from twin.registry import open_registry
    from twin.registry.base import DeviceKey
    from twin.runtime.bus import Filter
    from twin.runtime.engine import Engine

    state = Path(tempfile.mkdtemp(prefix="twin-bench-"))
    reg = open_registry(None, state)
    names = [f"d{i:05d}" for i in range(args.devices)]
    hb = {"interval": "10s", "timeout": f"{args.timeout:g}s"}
    devs = [sim_device(n, binding={"http": {}}, heartbeat=hb) for n in names]
    t0 = time.perf_counter()
    apply(reg, site(), model(), *devs)
    print(f"apply {args.devices} devices: {time.perf_counter() - t0:.2f}s")
    reg.put_user(auth.make_user("bench", "benchmark-pw", "admin"))
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(2) as pool:
        made = pool.map(make_keys, [names[i::8] for i in range(8)])
    keys: dict[str, str] = {}
    for part in made:
        for name, kid, secret, hashed in part:  # type: ignore[misc]
            reg.add_device_key(DeviceKey(kid, name, hashed, time.time()))
            keys[name] = f"{auth.KEY_PREFIX}{kid}_{secret}"
    print(f"device keys for {len(keys)} devices: {time.perf_counter() - t0:.2f}s")

    big = Rate(1e9, 1e9)
    settings = ApiSettings(
        state_dir=state,
        rate_per_token=big,
        rate_per_client=big,
        rate_ingest_per_device=big,
        ws_buffer=100_000,
    )
    engine = Engine(
        reg,
        fast_config(state_dir=state, metrics_interval=3600, reload_interval=0.25),
        [ApiService("127.0.0.1", 0, settings)],
    )
    async with trio.open_nursery() as nursery:
        t0 = time.perf_counter()
        await nursery.start(engine.run)
        print(f"engine start with {args.devices} devices: {time.perf_counter() - t0:.2f}s")
        info = engine.service_info["api"]
        host, port = "127.0.0.1", int(info["port"])
        token = auth.issue_access_token(
            auth.load_secret(state),
            reg.get_user("bench"),
            ttl=3600,  # type: ignore[arg-type]
        )
        jobs = [(f"/api/v1/ingest/{n}", keys[n]) for n in names]

        # 1. warm-up: each key once (argon2), in parallel from the load processes
        t0, c0 = time.perf_counter(), cpu_self()
        saved_rate, args.rate = args.rate, 0.0
        procs, q, start_at = run_load(host, port, jobs, args, "warm", 600)  # type: ignore[misc]
        lat, codes = await collect(procs, q)
        args.rate = saved_rate
        print(
            f"warm-up: {len(st_keys(info))} keys verified (argon2 once each) in "
            f"{time.perf_counter() - t0:.1f}s, engine CPU {cpu_self() - c0:.1f}s; codes {codes}"
        )

        # 2. ingest + WebSocket latency
        ctx = mp.get_context("spawn")
        wq, ready = ctx.Queue(), ctx.Event()
        watched = names[:: max(1, args.devices // 100)]
        wp = ctx.Process(
            target=ws_worker,
            args=(info["ws"], token, watched, ready, wq, args.seconds + 3),
        )
        wp.start()
        await trio.to_thread.run_sync(ready.wait, 30)
        m0 = sum(t.metrics.messages_in for t in engine.twins.all())
        procs, q, start_at = run_load(host, port, jobs, args, "ingest", args.seconds)  # type: ignore[misc]
        await trio.sleep_until(trio.current_time() + (start_at - time.time()))
        c0 = cpu_self()
        lat, codes = await collect(procs, q)
        cpu = cpu_self() - c0
        m1 = sum(t.metrics.messages_in for t in engine.twins.all())
        ok = codes.get(200, 0)
        rate = ok * args.batch / args.seconds
        wsr = (await trio.to_thread.run_sync(wq.get))["ws"]
        await trio.to_thread.run_sync(wp.join)
        print(
            f"ingest: {ok} requests ({args.batch} reading(s) each) in {args.seconds:g}s = {rate:.0f} readings/s "
            f"({args.procs} load processes x {args.conns} connections, all {len(names)} devices "
            f"round-robin); codes {codes}; request p50 {pct(lat, 0.5) * 1000:.1f} ms, "
            f"p99 {pct(lat, 0.99) * 1000:.1f} ms; engine messages {m1 - m0}"
        )
        print(
            f"engine CPU: {cpu:.1f}s over {args.seconds:g}s = {cpu / args.seconds * 100:.0f}% of "
            f"one core = {cpu / args.seconds / max(rate / 1000, 1e-9):.3f} core-seconds per "
            f"1,000 readings/s"
        )
        print(
            f"ingest -> WebSocket ({len(watched)} devices watched, {len(wsr)} readings received):"
            f" p50 {pct(wsr, 0.5) * 1000:.1f} ms, p99 {pct(wsr, 0.99) * 1000:.1f} ms, "
            f"max {max(wsr, default=float('nan')) * 1000:.1f} ms"
        )

        # 3. heartbeat timeouts: load stopped; every device goes offline at last_seen + timeout
        late: list[float] = []
        with engine.bus.subscribe(Filter.of(kinds=["status"]), buffer=args.devices * 2) as sub:
            pending = {t.name: t.last_seen for t in engine.twins.all() if t.last_seen}
            with trio.move_on_after(args.timeout + 15):
                async for ev in sub.receive:
                    seen = pending.pop(ev["device"], None)
                    if ev["status"] == "offline" and seen is not None:
                        late.append(ev["ts"] - (seen + args.timeout))
                    if not pending:
                        break
        print(
            f"heartbeat timeout ({args.timeout:g}s) of {len(late)}/{len(names)} devices detected "
            f"late by p50 {pct(late, 0.5) * 1000:.0f} ms, p99 {pct(late, 0.99) * 1000:.0f} ms, "
            f"max {max(late, default=float('nan')) * 1000:.0f} ms"
        )

        # 4. GET /devices
        gets = [
            (f"/api/v1/devices?limit=100&offset={(i * 100) % args.devices}", token)
            for i in range(100)
        ] + [("/api/v1/devices?limit=100&sort=-status&site=plant-a", token)]
        saved = args.conns
        args.conns = 4
        procs, q, start_at = run_load(host, port, gets, args, "get", args.get_seconds)  # type: ignore[misc]
        await trio.sleep_until(trio.current_time() + (start_at - time.time()))
        c0 = cpu_self()
        lat, codes = await collect(procs, q)
        cpu = cpu_self() - c0
        args.conns = saved
        n = sum(codes.values())
        print(
            f"GET /api/v1/devices?limit=100 with {args.devices} devices: "
            f"{n / args.get_seconds:.0f} req/s ({args.procs} processes x 4 connections), "
            f"codes {codes}, p50 {pct(lat, 0.5) * 1000:.1f} ms, p99 {pct(lat, 0.99) * 1000:.1f} ms,"
            f" engine CPU {cpu / args.get_seconds * 100:.0f}%"
        )
        nursery.cancel_scope.cancel()
    reg.close()
    print(f"(pid {os.getpid()}, state {state})")


def st_keys(info: dict[str, Any]) -> Any:
    return info["app"].state.keys


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--get-seconds", type=float, default=5.0)
    ap.add_argument("--procs", type=int, default=2, help="load generator processes")
    ap.add_argument("--conns", type=int, default=16, help="keep-alive connections per process")
    ap.add_argument("--rate", type=float, default=0.0, help="total requests/s cap (0: max)")
    ap.add_argument("--batch", type=int, default=1, help="readings per ingest request")
    ap.add_argument("--timeout", type=float, default=20.0, help="heartbeat timeout, seconds")
    trio.run(main, ap.parse_args())
