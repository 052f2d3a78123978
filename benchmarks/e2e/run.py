"""End to end: MQTT devices → embedded broker → binding → twin → scenes → time-series store.

    python benchmarks/e2e/run.py [--devices 200] [--points 10] [--seconds 10] [--procs 4]
                                 [--qos 1] [--rate 0] [--profile]

What a user of the embedded broker gets. ``twin up`` runs as its own process on a generated
site of N MQTT devices (real device keys, their own topics ``flux/e2e/{device}/telemetry``);
an external load generator — P processes of raw sockets, MQTT 3.1.1 frames encoded here (no
code of ours on the device side), QoS 1 pipelined with a window of un-acked messages or QoS 0
— publishes telemetry of ``--points`` readings per message, as fast as it can or at ``--rate``
messages/s in total. Printed:

* messages/s acknowledged by the broker (PUBACK: the readings are in the write-ahead log),
  readings/s stored (the store's own counter, ``twin_timeseries_points_written``);
* lag from publish to queryable: a probe device publishes a marked reading every 200 ms and
  the API is polled until ``/timeseries/query`` returns it (p50/p99);
* the engine's CPU (user+sys seconds per wall second, all its threads) and CPU seconds per
  1,000 readings/s;
* ``--profile``: py-spy samples the engine during the run and the shares of the stages
  (broker, binding, twin/device task, scenes, WAL, store, API, other) are printed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "twin.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- MQTT 3.1.1 frames, written out here (the device side shares no code with the broker) --------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def connect_frame(client_id: str, user: str, password: str) -> bytes:
    body = _str("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 0)  # user+password, clean
    body += _str(client_id) + _str(user) + _str(password)
    return bytes([0x10]) + _varint(len(body)) + body


def publish_frame(topic: str | bytes, payload: bytes, qos: int, pid: int) -> bytes:
    body = _str(topic) + (struct.pack("!H", pid) if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + _varint(len(body)) + body


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk
    return buf


def device_conn(port: int, device: str, key: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(connect_frame(f"e2e-{device}", device, key))
    ack = _recv_exact(s, 4)
    if ack[0] != 0x20 or ack[3] != 0:
        raise ConnectionError(f"{device}: CONNACK refused ({ack.hex()})")
    return s


def generator(
    port: int,
    devices: list[tuple[str, str]],
    points: int,
    qos: int,
    seconds: float,
    rate: float,
    window: int,
    out: Any,
    ready: Any = None,
) -> None:
    """One load process: its devices round-robin, QoS 1 with ``window`` un-acked in flight per
    connection (PUBACKs are 4 bytes: counted, not parsed)."""
    conns = [device_conn(port, d, k) for d, k in devices]  # blocking sends, polled acks
    if ready is not None:  # every process connected (key checks are slow): the load starts now
        ready.wait()
    head = ("{" + ",".join(f'"p{i}":{i}.5' for i in range(points)) + ',"ts":').encode()
    topics = [f"flux/e2e/{d}/telemetry".encode() for d, _ in devices]
    inflight = [0] * len(conns)
    pending = [b""] * len(conns)
    sent = acked = 0
    pid = 0
    start = time.monotonic()
    end = start + seconds
    sel = selectors.DefaultSelector()
    for k, s in enumerate(conns):
        sel.register(s, selectors.EVENT_READ, k)
    closed: set[int] = set()
    while True:
        now = time.monotonic()
        if now >= end:
            break
        sent_before = sent
        # one pass: every connection gets what its window allows (one message each pass)
        for k, s in enumerate(conns):
            if rate and sent >= (time.monotonic() - start) * rate:
                time.sleep(0.001)
                break
            if (qos and inflight[k] >= window) or k in closed:
                continue
            payload = head + b"%.6f}" % time.time()
            pid = pid % 65535 + 1
            s.sendall(publish_frame(topics[k], payload, qos, pid))
            sent += 1
            if qos:
                inflight[k] += 1
        if qos:  # then collect the PUBACKs that arrived (4 bytes each: counted)
            if sent == sent_before:
                # every window is full: sleep until an ack arrives (polling here would burn
                # the CPU the engine needs on a small machine, and measure that instead)
                sel.select(min(0.05, max(0.0, end - time.monotonic())))
            for k, s in enumerate(conns):
                if k in closed:
                    continue
                try:
                    got = s.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError:
                    got = b""
                if not got:  # the broker closed it (e.g. a refused publish in 3.1.1)
                    closed.add(k)
                    sel.unregister(s)
                    inflight[k] = window  # nothing more is sent on it
                    continue
                data = pending[k] + got
                n = len(data) // 4
                pending[k] = data[n * 4 :]
                inflight[k] -= n
                acked += n
    sel.close()
    # drain the acks still in flight (bounded)
    deadline = time.monotonic() + 10
    for k, s in enumerate(conns):
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            while inflight[k] > 0 and k not in closed:
                got = s.recv(65536)
                if not got:  # closed by the broker: its un-acked messages stay un-acked
                    break
                data = pending[k] + got
                n = len(data) // 4
                pending[k] = data[n * 4 :]
                inflight[k] -= n
                acked += n
        except (TimeoutError, OSError):
            pass
        s.close()
    if closed:
        print(f"generator: the broker closed {len(closed)} of {len(conns)} connections",
              file=sys.stderr, flush=True)  # fmt: skip
    out.put((sent, acked if qos else sent))


# -- the engine -------------------------------------------------------------------------------
def site_yaml(devices: int, points: int) -> str:
    tele = "\n".join(f"    p{i}: {{type: number}}" for i in range(points))
    text = f"""apiVersion: flux.iot/v1
kind: Site
metadata: {{name: e2e}}
spec: {{timezone: UTC}}
---
apiVersion: flux.iot/v1
kind: DeviceModel
metadata: {{name: meter}}
spec:
  telemetry:
{tele}
"""
    for d in [f"m{i:05d}" for i in range(devices)] + ["probe"]:
        text += f"""---
apiVersion: flux.iot/v1
kind: Device
metadata: {{name: {d}, site: e2e}}
spec:
  type: sensor
  model: meter
  binding: {{mqtt: {{qos: 1}}}}
"""
    # one scene on the probe, so the scenes stage is in the path as it is on a real site
    text += """---
apiVersion: flux.iot/v1
kind: Scene
metadata: {name: probe-watch, site: e2e}
spec:
  mode: single
  triggers:
    - {type: device_data, device: probe, point: p0, operator: ">", value: 1e9}
  actions:
    - {type: alarm, action: raise, device: probe, alarm: impossible, severity: info, message: x}
"""
    return text


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name}(?:_total)?(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


STAGES = (
    ("broker", ("twin/mqtt/",)),
    ("binding", ("twin/bindings/",)),
    ("WAL", ("twin/timeseries/wal",)),
    ("store", ("twin/timeseries/", "lancedb", "lance/", "pyarrow")),
    ("twin/device task", ("twin/runtime/device", "twin/runtime/state", "twin/runtime/monitor")),
    ("bus + scenes", ("twin/runtime/bus", "twin/control/")),
    ("time-series pump", ("twin/runtime/timeseries_service",)),
    ("API", ("twin/api/", "hypercorn", "fastapi", "starlette")),
    ("trio scheduler/IO", ("trio/",)),
)


def stage_shares(raw: str) -> dict[str, float]:
    """py-spy ``--format raw`` (collapsed stacks ``frame;frame;... count``): each sample goes
    to the innermost frame that names one of our stages."""
    totals: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        stage = "other"
        for frame in reversed(frames):
            hit = next((s for s, keys in STAGES if any(k in frame for k in keys)), None)
            if hit is not None:
                stage = hit
                break
        totals[stage] += int(n)
    total = sum(totals.values()) or 1
    return {k: v / total for k, v in totals.most_common()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--points", type=int, default=10, help="readings per message")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--procs", type=int, default=3, help="load generator processes")
    ap.add_argument("--qos", type=int, choices=(0, 1), default=1)
    ap.add_argument("--window", type=int, default=20, help="QoS 1: un-acked per connection")
    ap.add_argument("--rate", type=float, default=0.0, help="messages/s in total (0: max)")
    ap.add_argument("--profile", action="store_true", help="py-spy the engine (pip py-spy)")
    ap.add_argument("--warmup", type=float, default=12.0,
                    help="seconds after the engine is up before the load starts (at least)")
    ap.add_argument("--gil", action="store_true",
                    help="--profile: only samples of the thread holding the GIL (py-spy --gil)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="twin-e2e-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
    env.update({"TWIN_STATE_DIR": str(tmp / "state"), "TWIN_AUTHOR": "bench"})
    site = tmp / "site"
    site.mkdir()
    (site / "site.yaml").write_text(site_yaml(args.devices, args.points))
    subprocess.run([*CLI, "apply", str(site)], env=env, check=True, capture_output=True, cwd=ROOT)
    sys.path.insert(0, str(ROOT))
    from twin.registry import open_registry
    from twin.registry.credentials import create_device_key

    reg = open_registry(f"sqlite:///{tmp / 'state' / 'registry.db'}")
    keys = {
        d: create_device_key(reg, d)[1] for d in [f"m{i:05d}" for i in range(args.devices)]
    }
    keys["probe"] = create_device_key(reg, "probe")[1]
    reg.close()
    subprocess.run(
        [*CLI, "user", "add", "bench", "--role", "admin", "--password-stdin"],
        env=env, input="bench-password-1\n", text=True, check=True, capture_output=True, cwd=ROOT,
    )  # fmt: skip
    token = subprocess.run(
        [*CLI, "token", "create", "bench"], env=env, text=True, check=True, capture_output=True,
        cwd=ROOT,
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    port = free_port()
    up = subprocess.Popen(
        [*CLI, "up", "--listen", "127.0.0.1:0", "--mqtt-listen", f"127.0.0.1:{port}",
         "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )  # fmt: skip
    assert up.stdout is not None
    url = None
    for line in up.stdout:
        m = re.search(r"api\s+(http://[0-9.:]+)/api/v1", line)
        if m:
            url = m.group(1)
        if line.startswith("Ctrl-C to stop"):
            break
    if url is None:
        raise SystemExit("twin up did not start")
    started = time.monotonic()  # the engine is up
    threading.Thread(target=lambda: [None for _ in up.stdout or ()], daemon=True).start()
    import httpx

    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def written() -> float:
        return metric(api.get("/metrics").text, "twin_timeseries_points_written")

    # probe: marked readings, polled until queryable
    lags: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        s = device_conn(port, "probe", keys["probe"])
        n = 0
        while not stop.is_set():
            n += 1
            t0 = time.time()
            mark = 1_000_000 + n
            body = json.dumps({"p0": mark, "ts": t0}).encode()
            s.sendall(publish_frame(b"flux/e2e/probe/telemetry", body, 1, n % 65535 + 1))
            _recv_exact(s, 4)
            while not stop.is_set():
                r = api.get(
                    "/api/v1/timeseries/query",
                    params={"device": "probe", "metric": "p0", "from": str(t0 - 1)},
                )
                if r.status_code == 200 and any(mark in row for row in r.json().get("rows", [])):
                    lags.append(time.time() - t0)
                    break
                time.sleep(0.02)
            time.sleep(0.2)
        s.close()

    devs = sorted(keys.items())
    devs = [(d, k) for d, k in devs if d != "probe"]
    shares = [devs[i :: args.procs] for i in range(args.procs)]
    q: Any = mp.Queue()
    per_proc = args.rate / args.procs if args.rate else 0.0
    ready = mp.Barrier(sum(1 for share in shares if share) + 1)
    procs = [
        mp.Process(
            target=generator,
            args=(port, share, args.points, args.qos, args.seconds, per_proc, args.window, q,
                  ready),
        )
        for share in shares
        if share
    ]
    w0 = written()
    for p in procs:
        p.start()
    # the engine's long-lived heap is frozen ~10 s after start (twin/runtime/gc_freeze.py,
    # as a long-running engine has it): the measured window starts after that
    time.sleep(max(0.0, started + args.warmup - time.monotonic()))
    ready.wait()  # measured from when every device is connected
    spy = None
    if args.profile:
        if shutil.which("py-spy") is None:
            raise SystemExit("--profile needs py-spy: pip install py-spy")
        spy_out = tmp / "profile.txt"
        spy = subprocess.Popen(
            ["py-spy", "record", "--pid", str(up.pid), "--format", "raw", "--rate", "200",
             "--duration", str(int(args.seconds) + 1), "--nonblocking", "-o", str(spy_out),
             *(["--gil"] if args.gil else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    c0, t0 = cpu_seconds(up.pid), time.monotonic()
    th = threading.Thread(target=probe)
    th.start()
    results = [q.get(timeout=args.seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    t1, c1 = time.monotonic(), cpu_seconds(up.pid)
    w1 = written()
    stop.set()  # the probe's own readings would keep the count below moving
    th.join()
    # the store catches up on what was acknowledged
    target = w0 + sum(a for _, a in results) * args.points
    deadline = time.monotonic() + 120
    last, still = written(), time.monotonic()
    t2 = still
    while last < target and time.monotonic() < deadline and time.monotonic() - still < 5:
        time.sleep(0.2)
        now_w = written()
        if now_w != last:  # stops 5 s after the count stops moving (QoS 0 may lose some)
            last, still = now_w, time.monotonic()
            t2 = still
    w2 = last
    if os.environ.get("E2E_METRICS"):
        for line in api.get("/metrics").text.splitlines():
            if re.search(os.environ["E2E_METRICS"], line) and not line.startswith("#"):
                print("  metric", line)
    if spy is not None:
        spy.wait(timeout=60)
    up.terminate()
    up.wait(timeout=60)
    wall = t1 - t0
    sent = sum(s for s, _ in results)
    acked = sum(a for _, a in results)
    stored_rate = (w2 - w0) / (t2 - t0)
    cpu = (c1 - c0) / wall
    lag = sorted(lags)

    def p(q_: float) -> float:
        return lag[min(len(lag) - 1, int(q_ * len(lag)))] if lag else float("nan")

    print(
        f"devices {args.devices}, {args.points} readings/message, QoS {args.qos}, "
        f"{len(procs)} load processes, {wall:.1f} s"
    )
    print(f"published {sent / wall:,.0f} msg/s, acknowledged {acked / wall:,.0f} msg/s "
          f"= {acked * args.points / wall:,.0f} readings/s")  # fmt: skip
    print(f"stored during the load {(w1 - w0) / wall:,.0f} readings/s; until every "
          f"acknowledged reading was stored ({t2 - t0:.1f} s): {stored_rate:,.0f} readings/s")  # fmt: skip
    if w2 < target:
        print(f"NOT stored: {target - w2:,.0f} of {target - w0:,.0f} readings sent "
              f"({(target - w2) / max(target - w0, 1) * 100:.1f} %; QoS 0 may drop on overload)")
    print(f"publish → queryable: p50 {p(0.5) * 1000:.0f} ms, p99 {p(0.99) * 1000:.0f} ms "
          f"({len(lag)} probes)")  # fmt: skip
    per_k = cpu / max(stored_rate / 1000, 1e-9)
    print(f"engine CPU {cpu:.2f} cores; {per_k:.3f} core-seconds per 1,000 readings/s")
    if spy is not None and (tmp / "profile.txt").exists():
        print("stages (py-spy samples of the engine):")
        for stage, share in stage_shares((tmp / "profile.txt").read_text()).items():
            print(f"  {stage:18} {share * 100:5.1f} %")
        if os.environ.get("E2E_PROFILE_OUT"):  # the raw py-spy samples, for a closer look
            shutil.copy(tmp / "profile.txt", os.environ["E2E_PROFILE_OUT"])
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
