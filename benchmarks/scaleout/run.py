"""Scale-out figures: failover, rebalance on join, exactly-once under faults, cross-engine feed.

    python benchmarks/scaleout/run.py [--engines 3] [--rounds 10] [--ttl 5] [--devices 60]

Runs real ``twin up --cluster`` processes on one PostgreSQL schema (TWIN_TEST_POSTGRES,
default postgresql://postgres@127.0.0.1:5432/test) and prints:

* failover: kill -9 of an engine → every device and scene it owned is owned again (seconds,
  per round; the lease TTL bounds it), then it restarts and rejoins (rebalance seconds);
* a fresh engine joining → it owns its share (rebalance seconds);
* duplicates after all rounds: scene runs per trigger event > 1, commands claimed twice,
  commands delivered without a claim (all must be 0);
* the cross-engine live feed: reading timestamp → WebSocket message on *another* engine
  (p50/p99 ms), beside the same engine's own feed;
* the transport choice: one 200-byte event through PostgreSQL NOTIFY→LISTEN vs through
  Mosquitto (127.0.0.1:1883) publish→subscribe with paho, round trip p50/p99 in the same run.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from cli.procs import wait_for
from cluster.harness import PG_URL, cluster


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def duplicates(c: Any) -> dict[str, int]:
    keys: Counter[tuple[Any, ...]] = Counter()
    for scene, trace in c.sql("SELECT scene, trace FROM scene_traces"):
        t = trace if isinstance(trace, dict) else json.loads(trace)
        trig = t["trigger"]
        keys[(scene, trig.get("device"), trig.get("point"), trig.get("ts"))] += 1
    claims = dict(c.sql("SELECT command, count(*) FROM cluster_command_claims GROUP BY command"))
    delivered = [
        cid
        for (cid,) in c.sql(
            "SELECT id FROM commands WHERE status IN ('sent', 'executing', 'success', 'failed')"
        )
    ]
    return {
        "scene_runs": sum(keys.values()),
        "scene_runs_twice": sum(1 for n in keys.values() if n > 1),
        "commands_delivered": len(delivered),
        "commands_claimed_twice": sum(1 for n in claims.values() if n > 1),
        "delivered_unclaimed": sum(1 for cid in delivered if cid not in claims),
    }


def feed_latency(c: Any, seconds: float) -> dict[str, Any]:
    from websockets.sync.client import connect

    ups = list(c.engines.values())
    names = c.engine_names()
    owners = c.owners()
    out: dict[str, Any] = {}
    for label, up in (("same engine", ups[0]), ("other engine", ups[1])):
        mine = names[ups[0].proc.pid]
        devs = sorted(n for (k, n), e in owners.items() if k == "Device" and e == mine)
        url = up.url.replace("http://", "ws://") + "/api/v1/ws?devices=" + ",".join(devs)
        lat: list[float] = []
        with connect(url, additional_headers={"Authorization": f"Bearer {c.token()}"}) as ws:
            end = time.time() + seconds
            while time.time() < end:
                msg = json.loads(ws.recv(timeout=10))
                if msg.get("kind") == "reading" and isinstance(msg.get("ts"), (int, float)):
                    lat.append((time.time() - float(msg["ts"])) * 1000)
        out[label] = {"n": len(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
    return out


def config_reload(c: Any) -> float:
    """``twin apply`` of a changed site → every engine's /health shows the new revision (ms,
    from the end of the apply)."""
    import httpx
    from cli.procs import run

    site = c.site / "site.yaml"
    site.write_text(site.read_text().replace("min: 0, max: 1000", "min: 0, max: 999", 1))
    res = run(c.env("apply"), "apply", str(c.site), "-m", "reload benchmark")
    assert res.returncode == 0, res.stdout + res.stderr
    t0 = time.monotonic()
    rev = max(int(r[0]) for r in c.sql("SELECT revision FROM registry_head"))
    pending = list(c.engines.values())
    with httpx.Client(timeout=5) as http:
        while pending:
            pending = [
                u for u in pending if http.get(f"{u.url}/api/v1/health").json()["revision"] < rev
            ]
            if time.monotonic() - t0 > 30:
                raise AssertionError("engines did not reload")
    return (time.monotonic() - t0) * 1000


def transport_choice(n: int = 500) -> dict[str, Any]:
    """Round trip of one 200-byte event: NOTIFY→LISTEN vs Mosquitto publish→subscribe."""
    import psycopg

    payload = "x" * 200
    out: dict[str, Any] = {}
    listener = psycopg.connect(PG_URL, autocommit=True)
    listener.execute("LISTEN bench_feed")
    sender = psycopg.connect(PG_URL, autocommit=True)
    lat: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        sender.execute("SELECT pg_notify('bench_feed', %s)", (payload,))
        for _note in listener.notifies(timeout=5, stop_after=1):
            pass
        lat.append((time.perf_counter() - t0) * 1000)
    listener.close()
    sender.close()
    out["postgresql NOTIFY"] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
    try:
        import paho.mqtt.client as mqtt

        got = threading.Event()
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        sub.on_message = lambda *_a: got.set()
        sub.connect("127.0.0.1", 1883)
        sub.subscribe("bench/feed", qos=0)
        sub.loop_start()
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        pub.connect("127.0.0.1", 1883)
        pub.loop_start()
        time.sleep(0.5)
        lat = []
        for _ in range(n):
            got.clear()
            t0 = time.perf_counter()
            pub.publish("bench/feed", payload, qos=0)
            if got.wait(5):
                lat.append((time.perf_counter() - t0) * 1000)
        sub.loop_stop()
        pub.loop_stop()
        out["mosquitto QoS 0"] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
    except Exception as exc:  # no broker on 1883: say so
        out["mosquitto QoS 0"] = {"error": str(exc)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--ttl", type=float, default=5.0)
    ap.add_argument("--devices", type=int, default=60)
    ap.add_argument("--scenes", type=int, default=20)
    ap.add_argument("--feed-seconds", type=float, default=10.0)
    args = ap.parse_args()
    keys = args.devices + args.scenes
    with tempfile.TemporaryDirectory() as tmp, cluster(
        Path(tmp), devices=args.devices, scenes=args.scenes, ttl=args.ttl
    ) as c:
        for i in range(args.engines):
            c.start(f"e{i}")
        wait_for(
            lambda: len(o := c.owners()) == keys and len(set(o.values())) == args.engines,
            "the engines to share the work",
        )
        failovers: list[float] = []
        rejoins: list[float] = []
        for r in range(args.rounds):
            victim = f"e{r % args.engines}"
            up = c.engines[victim]
            names = c.engine_names()
            gone = names[up.proc.pid]
            lost = {k for k, e in c.owners().items() if e == gone}
            t0 = time.monotonic()
            up.proc.send_signal(signal.SIGKILL)
            up.proc.wait()
            c.engines.pop(victim)
            wait_for(
                lambda lost=lost, gone=gone: all(
                    c.owners().get(k) not in (None, gone) for k in lost
                ),
                "failover",
                within=120,
            )
            failovers.append(time.monotonic() - t0)
            new = c.start(victim)
            wait_for(lambda pid=new.proc.pid: pid in c.engine_names(), "registered", within=120)
            t1 = time.monotonic()  # rebalance from its registration (process start excluded)
            wait_for(
                lambda pid=new.proc.pid: (n := c.engine_names().get(pid)) is not None
                and n in set(c.owners().values())
                and len(c.owners()) == keys,
                "rejoin",
                within=120,
            )
            rejoins.append(time.monotonic() - t1)
            print(
                f"round {r + 1}/{args.rounds}: killed {victim} ({len(lost)} keys): "
                f"failover {failovers[-1]:.2f} s, rejoin with a share {rejoins[-1]:.2f} s",
                flush=True,
            )
        j = c.start("join")
        wait_for(lambda: j.proc.pid in c.engine_names(), "registered", within=120)
        t2 = time.monotonic()
        wait_for(
            lambda: c.engine_names().get(j.proc.pid) in set(c.owners().values())
            and len(c.owners()) == keys,
            "join",
            within=120,
        )
        join = time.monotonic() - t2
        feed = feed_latency(c, args.feed_seconds)
        reload_ms = config_reload(c)
        c.stop_all()
        dup = duplicates(c)
    choice = transport_choice()
    print()
    print(f"engines {args.engines}, devices {args.devices}, scenes {args.scenes}, ttl {args.ttl} s")
    print(
        f"failover (kill -9 → all owned again): mean {statistics.mean(failovers):.2f} s, "
        f"max {max(failovers):.2f} s over {len(failovers)} rounds"
    )
    print(
        f"rejoin (registered → owns a share): mean {statistics.mean(rejoins):.2f} s, "
        f"max {max(rejoins):.2f} s; a new engine joining: {join:.2f} s"
    )
    print("exactly once after all rounds:", json.dumps(dup))
    print(f"config: twin apply → every engine runs the new revision: {reload_ms:.0f} ms")
    for label, f in feed.items():
        print(f"live feed, {label}: n={f['n']} p50 {f['p50_ms']:.1f} ms p99 {f['p99_ms']:.1f} ms")
    for label, f in choice.items():
        if "error" in f:
            print(f"transport {label}: {f['error']}")
        else:
            print(f"transport {label}: round trip p50 {f['p50_ms']:.2f} ms p99 {f['p99_ms']:.2f} ms")


if __name__ == "__main__":
    main()
