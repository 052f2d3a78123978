"""Benchmark: logins under attack (issue 11 §4).

    .venv/bin/python benchmarks/api/login.py [--flood 300] [--samples 20]

The engine runs in this process with the API (a temporary state dir, default settings: 5 free
failures per user, 20 per address). It prints:

1. user enumeration by timing: median wall time of a wrong-password login for a known user
   vs an unknown one (both run argon2: the unknown one against a dummy hash);
2. a flood: ``--flood`` concurrent wrong-password logins from 127.0.0.1 over 50 user names,
   sent by another process (as an attacker would), while a legitimate user logs in from
   127.0.0.2: the flood's answers by status, how many reached argon2 (401s), and the
   legitimate login's latency;
3. the audit rows the flood left (one per user/address/window, written at the window's end).

Prints figures; no thresholds. The machine is shared: read the printed load average.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

PASSWORD = "correct horse battery"


async def main(args: argparse.Namespace) -> None:
    from runtime.helpers import apply, fast_config, model, site

    from twin.api import auth
    from twin.api.server import ApiService
    from twin.api.state import ApiSettings
    from twin.registry import open_registry
    from twin.runtime.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        reg = open_registry(None, state)
        apply(reg, site(), model())
        for name in ("alice", "bob", "carol"):
            reg.put_user(auth.make_user(name, PASSWORD, "viewer"))
        engine = Engine(reg, fast_config(state_dir=state),
                        [ApiService("127.0.0.1", 0, ApiSettings(state_dir=state))])
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            url = engine.service_info["api"]["url"]

            async def login(c: httpx.AsyncClient, user: str, pw: str) -> tuple[int, float]:
                t = time.perf_counter()
                r = await c.post("/api/v1/auth/login", json={"username": user, "password": pw})
                return r.status_code, time.perf_counter() - t

            # 1. timing of known vs unknown user names (a fresh address each, no lock-outs)
            known: list[float] = []
            unknown: list[float] = []
            for i in range(args.samples):
                tr = httpx.AsyncHTTPTransport(local_address=f"127.0.1.{i % 250 + 1}")
                async with httpx.AsyncClient(base_url=url, transport=tr, timeout=60) as c:
                    user = ("alice", "bob", "carol")[i % 3]
                    if i % 5 == 4:  # stay under the per-user free failures
                        await login(c, user, PASSWORD)
                    known.append((await login(c, user, "wrong"))[1])
                    unknown.append((await login(c, f"nobody{i}", "wrong"))[1])
            print(f"wrong password, known user:   median {statistics.median(known) * 1000:.1f} ms"
                  f" ({args.samples} samples)")
            print(f"wrong password, unknown user: median {statistics.median(unknown) * 1000:.1f} ms")

            # 2. a flood from one address (another process) while a legitimate user logs in
            ctx = mp.get_context("spawn")
            q: Any = ctx.Queue()
            proc = ctx.Process(target=flood, args=(url, args.flood, q))
            proc.start()
            async with httpx.AsyncClient(
                base_url=url, timeout=120,
                transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2"),
            ) as user_c:
                await trio.to_thread.run_sync(q.get)  # the flood is under way
                await trio.sleep(0.2)
                legit = await login(user_c, "carol", PASSWORD)
                codes, took = await trio.to_thread.run_sync(q.get)
            await trio.to_thread.run_sync(proc.join)
            by = {s: codes.count(s) for s in sorted(set(codes))}
            print(f"flood of {args.flood} wrong logins from one address: {by} in {took:.1f} s "
                  f"({by.get(401, 0)} reached argon2)")
            print(f"legitimate login from another address during the flood: "
                  f"{legit[0]} in {legit[1] * 1000:.0f} ms")
            st = engine.service_info["api"]["app"].state
            st.flush_login_audit(all=True)
            await engine.writer.flushed()
            rows = [a for a in reg.audit_log(limit=1000) if a.result == "failed"]
            print(f"audit rows for {args.flood + 2 * args.samples} failed logins: {len(rows)}")
            print(f"load average {os.getloadavg()[0]:.2f}")
            nursery.cancel_scope.cancel()
        reg.close()


def flood(url: str, n: int, q: Any) -> None:
    """In another process: ``n`` concurrent wrong-password logins; puts "started", then
    (status codes, seconds)."""

    async def run() -> None:
        codes: list[int] = []
        async with httpx.AsyncClient(
            base_url=url, timeout=120, limits=httpx.Limits(max_connections=n + 10)
        ) as c:

            async def attack(i: int) -> None:
                r = await c.post(
                    "/api/v1/auth/login", json={"username": f"user{i % 50}", "password": "w"}
                )
                codes.append(r.status_code)

            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(attack, i)
                q.put("started")
            q.put((codes, time.perf_counter() - started))

    trio.run(run)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--flood", type=int, default=300)
    p.add_argument("--samples", type=int, default=20)
    args: Any = p.parse_args()
    trio.run(main, args)
