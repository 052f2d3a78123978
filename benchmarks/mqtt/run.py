"""MQTT broker benchmark: our broker vs a private Mosquitto, same load generator, one run.

    .venv/bin/python benchmarks/mqtt/run.py [--seconds 3] [--idle 10000] [--scenario drain]

The load generator is deliberately cheap: raw sockets, packets pre-encoded once, fixed-size
messages so receivers count bytes instead of parsing, one process per publisher.
Scenarios (MQTT 3.1.1, 127.0.0.1 only):

* qos0 fan-in   10 publishers (10 processes, ``--batch`` messages per write) -> 1 subscriber
                on ``bench/#``, delivered messages/s
* qos1 fan-in   same with QoS 1 both ways (publishers pipeline ``--window`` un-acked,
                subscriber acks)
* fan-out       1 publisher -> 100 subscribers, delivered messages/s (sum over subscribers)
* latency       publish -> receive p50/p99 at a fixed 5,000 msg/s
* idle          broker RSS growth with N idle connections
* drain         1,000 QoS 1 messages queued for an offline persistent ``mosquitto_sub``
                (3.1.1 and 5.0), the time the reconnecting client takes to receive them all

The broker's CPU (user+sys seconds per wall second, from /proc) is reported for each run, and
for fan-in the generator's own CPU in the window (``gen``): the broker is the bottleneck when
the generator's processes sit blocked on full sockets (low ``gen``) while the broker is busy.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from twin.mqtt import codec as c  # noqa: E402

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def connect(port: int, cid: str) -> socket.socket:
    s = socket.create_connection((HOST, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(c.encode(c.Connect(cid, keep_alive=0), 4))
    _read_exact(s, 4)  # CONNACK
    return s


def _read_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        d = s.recv(n - len(buf))
        if not d:
            raise ConnectionError("closed")
        buf += d
    return buf


def subscribe(s: socket.socket, flt: str, qos: int) -> None:
    s.sendall(c.encode(c.Subscribe(1, (c.Subscription(flt, qos),)), 4))
    _read_exact(s, 5)  # SUBACK with one code


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---------------------------------------------------------------------------- brokers


class BrokerProc:
    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=cwd
        )
        for _ in range(200):  # bounded wait for the port to accept
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"{name} did not start")

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_ours(root: Path = ROOT) -> BrokerProc:
    """Our broker, from the tree at ``root`` (``--base`` runs another tree's for A/B)."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "twin.mqtt",
        "--listen",
        f"{HOST}:{port}",
        "--sys-interval",
        "0",
        "--max-queued",
        "10000",
    ]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return BrokerProc("flux", argv, port, env=env, cwd=root)


def start_mosquitto(tmp: Path, inflight: int = 100) -> BrokerProc:
    """A private Mosquitto; ``inflight``: its ``max_inflight_messages`` (0: unlimited)."""
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        f"listener {port} {HOST}\nallow_anonymous true\nmax_queued_messages 10000\n"
        f"max_inflight_messages {inflight}\npersistence false\nlog_dest none\n"
    )
    return BrokerProc("mosquitto", ["mosquitto", "-c", str(conf)], port)


# ---------------------------------------------------------------------------- workers


def _await_start(start: Any) -> float:
    """``start`` is a time, or a shared ``mp.Value`` the parent sets once every worker is ready."""
    if isinstance(start, int | float):
        return float(start)
    while start.value == 0:
        time.sleep(0.001)
    return float(start.value)


def publisher(
    port: int,
    idx: int,
    qos: int,
    seconds: float,
    start: Any,
    payload: int,
    out: Any,
    ready: Any = None,
    batch: int = 1000,
    window: int = 1000,
) -> None:
    """One publishing connection in its own process: QoS 0 writes ``batch`` pre-encoded
    messages per ``sendall`` (pipelined: one syscall per batch); QoS 1 keeps up to ``window``
    un-acked messages in flight and tops the window up a quarter at a time, only once a whole
    quarter is free (topping up whatever trickled back cost a syscall pair per few messages:
    the generator, not the broker, was then the limit)."""
    s = connect(port, f"pub{idx}")
    # one encode, then patch the packet id in: 65,535 codec calls per process took seconds on a
    # busy 2-CPU machine and made publishers miss the whole measurement window
    tmpl = c.encode(c.Publish(f"bench/{idx}", b"x" * payload, qos, packet_id=1 if qos else None), 4)
    if qos:
        at = len(tmpl) - payload - 2
        head, tail = tmpl[:at], tmpl[at + 2 :]
        pkts = [head + pid.to_bytes(2, "big") + tail for pid in range(1, 65536)]
    else:
        pkts = [tmpl] * batch
    blob0 = b"".join(pkts[:batch]) if qos == 0 else b""
    if ready is not None:
        ready.put(1)
    start = _await_start(start)
    while time.time() < start:
        time.sleep(0.001)
    cpu0 = _own_cpu()
    end = start + seconds
    sent = 0
    acked = 0
    pid = 0
    step = max(1, window // 4)
    s.setblocking(True)
    while time.time() < end:
        if qos == 0:
            s.sendall(blob0)
            sent += batch
            continue
        if window - (sent - acked) >= step:
            if pid + step <= 65535:
                chunk = b"".join(pkts[pid : pid + step])
            else:
                chunk = b"".join(pkts[(pid + i) % 65535] for i in range(step))
            pid = (pid + step) % 65535
            s.sendall(chunk)
            sent += step
            continue
        data = s.recv(1 << 20)
        if not data:
            break
        acked += len(data) // 4  # PUBACK is 4 bytes
    s.close()
    out.put((sent, _own_cpu() - cpu0))


def _own_cpu() -> float:
    """This process's CPU seconds (user + sys): the generator's cost is reported too."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def subscriber(
    port: int,
    flt: str,
    qos: int,
    seconds: float,
    start: Any,
    pkt_len: int,
    out: Any,
    ready: Any,
    payload: int = 16,
) -> None:
    s = connect(port, f"sub-{flt}-{os.getpid()}")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    subscribe(s, flt, qos)
    ready.put(1)
    start = _await_start(start)
    cpu0 = _own_cpu()
    s.settimeout(0.2)
    end = start + seconds
    counted = 0
    pending = b""
    # Every message is acknowledged, also those that arrive outside the window (an unacked
    # QoS 1 message holds an in-flight slot forever: enough of them and the broker stops
    # sending, which used to zero this scenario at random); only the window is counted, by
    # the time a recv *returned* (not when it started waiting).
    while time.time() <= end + 0.5:
        try:
            data = s.recv(1 << 20)
        except TimeoutError:
            continue
        if not data:
            break
        now = time.time()
        if qos and pkt_len:
            pending += data
            k = len(pending) // pkt_len
            if k:
                # PUBACKs built by slicing (C speed), not a Python loop per message
                off = pkt_len - payload - 2
                body = pending[: k * pkt_len]
                acks = bytearray(4 * k)
                acks[0::4] = b"\x40" * k
                acks[1::4] = b"\x02" * k
                acks[2::4] = body[off::pkt_len]
                acks[3::4] = body[off + 1 :: pkt_len]
                s.sendall(acks)
                pending = pending[k * pkt_len :]
        if start <= now <= end:
            counted += len(data)
        if not qos and len(data) < 1 << 18:
            # QoS 0: let a few hundred microseconds of messages pile up in the socket before
            # the next recv. A broker that writes packet by packet (Mosquitto) otherwise wakes
            # this reader per few messages: ~0.4 of a core here, on a 2-core machine that is
            # CPU the broker under test does not get. (QoS 1 acks at once: the broker's
            # in-flight window waits on them.)
            time.sleep(0.0005)
    s.close()
    out.put((counted // pkt_len, _own_cpu() - cpu0))


def fanout_subs(
    port: int, n: int, base: int, seconds: float, start: float, pkt_len: int, out: Any, ready: Any
) -> None:
    socks = []
    sel = selectors.DefaultSelector()
    for i in range(n):
        s = connect(port, f"fo{base + i}")
        subscribe(s, "fan/out", 0)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    ready.put(1)
    end = start + seconds
    total = 0
    while time.time() < end:
        for key, _ in sel.select(0.1):
            try:
                data = key.fileobj.recv(1 << 20)  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            if time.time() >= start:
                total += len(data)
    for s in socks:
        s.close()
    out.put(total // pkt_len)


PAYLOAD = 16


def run_fanin(
    b: BrokerProc,
    qos: int,
    seconds: float,
    batch: int = 1000,
    window: int = 1000,
    payload: int = 64,
) -> dict[str, float]:
    qp: Any = mp.Queue()
    qs: Any = mp.Queue()
    ready: Any = mp.Queue()
    pkt_len = len(
        c.encode(c.Publish("bench/0", b"x" * payload, qos, packet_id=1 if qos else None), 4)
    )
    start: Any = mp.Value("d", 0.0)  # set once every worker is connected and ready
    sub = mp.Process(
        target=subscriber,
        args=(b.port, "bench/#", qos, seconds, start, pkt_len, qs, ready, payload),
    )
    sub.start()
    ready.get(timeout=60)
    pubs = [
        mp.Process(
            target=publisher,
            args=(b.port, i, qos, seconds, start, payload, qp, ready, batch, window),
        )
        for i in range(10)
    ]
    for p in pubs:
        p.start()
    for _ in pubs:
        ready.get(timeout=60)
    start.value = t0 = time.time() + 0.2
    while time.time() < t0:
        time.sleep(0.005)
    cpu0 = b.cpu()
    time.sleep(seconds)
    cpu = (b.cpu() - cpu0) / seconds
    pub_results = [qp.get(timeout=30) for _ in pubs]
    sent = sum(n for n, _ in pub_results)
    got, sub_cpu = qs.get(timeout=30)
    for p in [*pubs, sub]:
        p.join(10)
    # the generator's CPU in the window (publishers + subscriber) says whether the broker
    # or the generator was the limit
    pub_cpu = sum(cp for _, cp in pub_results) / seconds
    return {
        "msgs": got / seconds,
        "sent": sent / seconds,
        "cpu": cpu,
        "gen_cpu": pub_cpu + sub_cpu / seconds,
        "pub_cpu": pub_cpu,
        "sub_cpu": sub_cpu / seconds,
        "us_per_msg": cpu * 1e6 / (got / seconds) if got else float("nan"),
    }


def run_fanout(b: BrokerProc, seconds: float, nsubs: int = 100) -> dict[str, float]:
    q: Any = mp.Queue()
    ready: Any = mp.Queue()
    pkt_len = len(c.encode(c.Publish("fan/out", b"x" * PAYLOAD), 4))
    start = time.time() + 2.0
    procs = [
        mp.Process(
            target=fanout_subs,
            args=(b.port, nsubs // 2, i * nsubs, seconds, start, pkt_len, q, ready),
        )
        for i in range(2)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=30)
    pub = connect(b.port, "fanpub")
    blob = c.encode(c.Publish("fan/out", b"x" * PAYLOAD), 4) * 20
    while time.time() < start:
        time.sleep(0.005)
    cpu0 = b.cpu()
    end = start + seconds
    sent = 0
    # paced just enough to keep the broker busy without unbounded socket backlog
    while time.time() < end:
        pub.sendall(blob)
        sent += 20
        time.sleep(0.001)
    cpu = (b.cpu() - cpu0) / seconds
    got = sum(q.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(10)
    pub.close()
    return {"msgs": got / seconds, "sent": sent / seconds, "cpu": cpu}


def run_latency(b: BrokerProc, rate: int = 5000, seconds: float = 3.0) -> dict[str, float]:
    sub = connect(b.port, "lat-sub")
    subscribe(sub, "lat/t", 0)
    pub = connect(b.port, "lat-pub")
    pkt_len = len(c.encode(c.Publish("lat/t", b"\0" * 8), 4))
    sub.setblocking(False)
    lat: list[float] = []
    pending = b""
    interval = 1.0 / rate
    t0 = time.perf_counter()
    n_total = int(rate * seconds)
    sent = 0
    cpu0 = b.cpu()
    deadline = t0 + seconds + 2
    while (sent < n_total or len(lat) < sent) and time.perf_counter() < deadline:
        now = time.perf_counter()
        due = min(n_total, int((now - t0) / interval) + 1)
        if sent < due:
            buf = b"".join(
                c.encode(c.Publish("lat/t", struct.pack("!d", now)), 4) for _ in range(due - sent)
            )
            pub.sendall(buf)
            sent = due
        try:
            data = sub.recv(1 << 16)
            pending += data
            k = len(pending) // pkt_len
            t = time.perf_counter()
            for i in range(k):
                (ts,) = struct.unpack_from("!d", pending, i * pkt_len + pkt_len - 8)
                lat.append(t - ts)
            pending = pending[k * pkt_len :]
        except BlockingIOError:
            time.sleep(interval / 4)
    cpu = (b.cpu() - cpu0) / (time.perf_counter() - t0)
    sub.close()
    pub.close()
    lat.sort()
    if not lat:
        return {"p50": float("nan"), "p99": float("nan"), "cpu": cpu}
    return {
        "p50": lat[len(lat) // 2] * 1000,
        "p99": lat[int(len(lat) * 0.99)] * 1000,
        "lost": n_total - len(lat),
        "cpu": cpu,
    }


def idle_worker(port: int, n: int, base: int, ready: Any, stop: Any) -> None:
    raise_fd_limit()
    socks = []
    for i in range(n):
        s = socket.create_connection((HOST, port))
        s.sendall(c.encode(c.Connect(f"idle{base + i}", keep_alive=0), 4))
        socks.append(s)
    for s in socks:
        _read_exact(s, 4)
    ready.put(n)
    stop.get()
    for s in socks:
        s.close()


def run_idle(b: BrokerProc, n: int) -> dict[str, float]:
    rss0 = b.rss_mb()
    ready: Any = mp.Queue()
    stop: Any = mp.Queue()
    k = 4
    procs = [
        mp.Process(target=idle_worker, args=(b.port, n // k, i * n, ready, stop)) for i in range(k)
    ]
    for p in procs:
        p.start()
    total = sum(ready.get(timeout=120) for _ in procs)
    time.sleep(0.5)
    rss = b.rss_mb()
    for _ in procs:
        stop.put(1)
    for p in procs:
        p.join(30)
    return {"conns": total, "rss": rss, "delta": rss - rss0}


def _mosquitto_sub(port: int, cid: str, version: str, *extra: str) -> list[str]:
    argv = ["mosquitto_sub", "-h", HOST, "-p", str(port), "-i", cid, "-c", "-q", "1",
            "-t", "drain/t", "-V", version, *extra]
    if version == "mqttv5":
        argv += ["-x", "3600"]  # a v5 session outlives the connection only with an expiry
    return argv


def run_drain(b: BrokerProc, version: str, n: int = 1000, reps: int = 5) -> dict[str, float]:
    """A persistent ``mosquitto_sub`` subscribes and leaves; ``n`` QoS 1 messages are queued
    for it; then the time a reconnecting ``mosquitto_sub -C n`` takes to receive them all
    (process start to exit, so a few ms of start-up are in both brokers' figures). The drain
    is latency-bound (a ping-pong of PUBLISH and PUBACK between two processes), so on a busy
    machine the spread is wide: the median and the best of ``reps`` runs, each with a session
    of its own."""
    if shutil.which("mosquitto_sub") is None:
        return {}
    times: list[float] = []
    cpus: list[float] = []
    got = n
    pkts = b"".join(c.encode(c.Publish("drain/t", b"x" * PAYLOAD, 1, packet_id=1 + i % 65535), 4)
                    for i in range(n))
    for rep in range(reps):
        cid = f"drain-{version}-{os.getpid()}-{rep}"
        subprocess.run(_mosquitto_sub(b.port, cid, version, "-E"), check=True, timeout=30,
                       stdout=subprocess.DEVNULL)
        pub = connect(b.port, f"drain-pub-{rep}")
        pub.sendall(pkts)
        _read_exact(pub, 4 * n)  # every PUBACK: all n are queued for the offline session
        pub.close()
        cpu0 = b.cpu()
        t0 = time.perf_counter()
        proc = subprocess.run(_mosquitto_sub(b.port, cid, version, "-C", str(n)), timeout=120,
                              stdout=subprocess.PIPE)
        elapsed = time.perf_counter() - t0
        times.append(elapsed)
        cpus.append((b.cpu() - cpu0) / elapsed)
        got = min(got, proc.stdout.count(b"\n"))
    order = sorted(range(reps), key=lambda i: times[i])
    best, mid = order[0], order[reps // 2]
    return {"median": times[mid], "best": times[best], "got": got, "cpu": cpus[mid]}


# ---------------------------------------------------------------------------- main


def _median(rs: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the median over rounds (the spread on a shared machine is wide)."""
    if not rs:
        return {}
    out: dict[str, float] = {}
    for k in rs[0]:
        vals = sorted(r[k] for r in rs if k in r)
        mid = len(vals) // 2
        out[k] = vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2
    return out


def _fmt(r: dict[str, float]) -> str:
    if not r:
        return "-"
    if "p50" in r:
        return f"p50 {r['p50']:.2f} p99 {r['p99']:.2f} ms cpu {r['cpu']:.2f}"
    if "rss" in r:
        return f"{int(r['conns'])} conns {r['rss']:.0f} MB"
    if "median" in r:
        return f"{r['median']:.3f} s (best {r['best']:.3f}, {int(r['got'])} got)"
    gen = f" gen {r['gen_cpu']:.2f}" if "gen_cpu" in r else ""
    per = f" {r['us_per_msg']:.1f}us/msg" if "us_per_msg" in r else ""
    return f"{r['msgs']:,.0f} msg/s cpu {r['cpu']:.2f}{per}{gen}"


def _ratio(f: dict[str, float], m: dict[str, float]) -> str:
    if "msgs" in f and "msgs" in m and m["msgs"]:
        return f"{f['msgs'] / m['msgs']:.2f}x"
    if "p99" in f and "p99" in m and f["p99"]:
        return f"{m['p99'] / f['p99']:.2f}x"
    if "rss" in f and "rss" in m and f["rss"]:
        return f"{m['rss'] / f['rss']:.2f}x"
    if "median" in f and "median" in m and f["median"]:
        return f"{m['median'] / f['median']:.2f}x"
    return "-"


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--idle", type=int, default=10_000)
    ap.add_argument("--only", choices=["flux", "mosquitto"], default=None)
    ap.add_argument("--scenario", help="run only the scenarios whose name contains this text")
    ap.add_argument("--batch", type=int, default=1000, help="fan-in QoS 0: messages per write")
    ap.add_argument("--window", type=int, default=1000, help="fan-in QoS 1: un-acked per publisher")
    ap.add_argument("--payload", type=int, default=64, help="fan-in payload bytes")
    ap.add_argument(
        "--base",
        type=Path,
        help="also run our broker from this tree (e.g. /work/main) as 'base': A/B in one run",
    )
    ap.add_argument(
        "--mosquitto-inflight",
        type=int,
        default=100,
        help="Mosquitto's max_inflight_messages (0: unlimited, like our 3.1.1 default)",
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="repeat, alternating the brokers' order; medians"
    )
    args = ap.parse_args()
    raise_fd_limit()
    if shutil.which("mosquitto") is None and args.only != "flux":
        print("mosquitto not found on PATH", file=sys.stderr)
        return 1
    scenarios: list[tuple[str, Callable[[BrokerProc], dict[str, float]]]] = [
        (
            "qos0 fan-in 10->1",
            lambda b: run_fanin(b, 0, args.seconds, batch=args.batch, payload=args.payload),
        ),
        (
            "qos1 fan-in 10->1",
            lambda b: run_fanin(b, 1, args.seconds, window=args.window, payload=args.payload),
        ),
        ("fan-out 1->100", lambda b: run_fanout(b, args.seconds)),
        ("latency @5k/s", lambda b: run_latency(b)),
        (f"idle x{args.idle}", lambda b: run_idle(b, args.idle)),
        ("drain 1000 q1 v3.1.1", lambda b: run_drain(b, "mqttv311")),
        ("drain 1000 q1 v5", lambda b: run_drain(b, "mqttv5")),
    ]
    if args.scenario:
        scenarios = [(sc, fn) for sc, fn in scenarios if args.scenario in sc]
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    print(f"load average at start: {_load()}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        starters: list[tuple[str, Callable[[], BrokerProc]]] = []
        if args.base is not None:
            base = args.base.resolve()
            starters.append(("base", lambda: start_ours(base)))
        starters += [("flux", start_ours), ("mosquitto", lambda: start_mosquitto(Path(tmp), args.mosquitto_inflight))]
        starters = [(n, st) for n, st in starters if not args.only or n in (args.only, "base")]
        for rnd in range(args.rounds):
            for sc, fn in scenarios:
                order = starters if rnd % 2 == 0 else starters[::-1]
                for name, starter in order:
                    b = starter()  # a fresh broker per scenario
                    try:
                        r = fn(b)
                    finally:
                        b.stop()
                    results.setdefault(sc, {}).setdefault(name, []).append(r)
                    print(f"  {name:9} {sc:20} {r} (load {_load()})", file=sys.stderr, flush=True)
    names = [n for n, _ in starters]
    print()
    print(f"medians of {args.rounds} round(s); load average at the end: {_load()}")
    print(f"{'scenario':22}" + "".join(f" {n:>44}" for n in names) + "   ratios")
    for sc, by in results.items():
        med = {n: _median(by.get(n, [])) for n in names}
        ratios = []
        if med.get("flux") and med.get("mosquitto"):
            ratios.append(f"flux/mosq {_ratio(med['flux'], med['mosquitto'])}")
        if med.get("base") and med.get("mosquitto"):
            ratios.append(f"base/mosq {_ratio(med['base'], med['mosquitto'])}")
        if med.get("flux") and med.get("base") and "msgs" in med["base"]:
            ratios.append(f"flux/base {med['flux']['msgs'] / med['base']['msgs']:.2f}x")
        print(f"{sc:22}" + "".join(f" {_fmt(med[n]):>44}" for n in names) + "   " + ", ".join(ratios))
    print(
        "\nratio = flux/mosquitto for msg/s; mosquitto/flux for latency, memory and drain time"
        " (drain: medians of 5 runs; higher is better); us/msg = broker CPU per delivered message"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
