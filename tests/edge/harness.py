"""The edge fault harness: a TCP proxy on loopback that can cut, blackhole, slow and reset the
link between an edge and the cloud, the two engines as real processes (``twin up`` and
``twin edge``, killable with SIGKILL), a producer that pushes readings into the edge's local
ingest and remembers exactly which ones were acknowledged, and the accounting against the
cloud's store.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parents[2]
ADMIN_PASSWORD = "edge-harness-pw-1"

SITE = """\
apiVersion: flux.iot/v1
kind: Site
metadata: {{name: remote}}
---
apiVersion: flux.iot/v1
kind: DeviceGroup
metadata: {{name: edge-devs, site: remote}}
---
apiVersion: flux.iot/v1
kind: EdgeNode
metadata: {{name: gw-t, site: remote}}
spec:
  devices: {{group: edge-devs}}
  uplink:
    url: http://127.0.0.1:1
    batch: {batch}
    interval: 50ms
    timeout: 2s
    backoff: {{initial: 200ms, max: 1s}}
  buffer:
{buffer}
---
apiVersion: flux.iot/v1
kind: Device
metadata: {{name: meter, site: remote, group: edge-devs}}
spec:
  type: sensor
  binding: {{http: {{}}}}
---
apiVersion: flux.iot/v1
kind: Device
metadata: {{name: valve, site: remote, group: edge-devs}}
spec:
  type: sensor
  binding: {{http: {{}}}}
"""


def write_site(path: Path, *, batch: int = 500, buffer: str = "    max_bytes: 256MB") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "site.yaml").write_text(SITE.format(batch=batch, buffer=buffer))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TWIN_SECRETS_FILE": "/nonexistent"}


def twin(state: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run one CLI command against ``state``; its stdout."""
    out = subprocess.run([sys.executable, "-m", "twin.cli", "--state-dir", str(state), *args],
                         capture_output=True, text=True, env={**_env(), **(env or {})},
                         timeout=120)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"twin {' '.join(args)}: {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out.stdout


# --- the proxy ------------------------------------------------------------------------------
def _rst(stream: trio.SocketStream) -> None:
    """Close with a TCP RST (SO_LINGER 0)."""
    with suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with suppress(OSError):
        stream.socket.close()


@dataclass(eq=False)
class _Conn:
    client: trio.SocketStream
    upstream: trio.SocketStream | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def reset(self) -> None:
        _rst(self.client)
        if self.upstream is not None:
            _rst(self.upstream)
        self.scope.cancel()


class Proxy:
    """``pass`` (forward), ``cut`` (RST every connection, refuse new ones with RST),
    ``blackhole`` (accept, swallow every byte, answer nothing: no RST, no FIN), ``slow``
    (forward each chunk after ``delay`` s); :meth:`reset` sends RST on the open connections."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.mode = "pass"
        self.delay = 0.0
        self.port = 0
        self.conns: set[_Conn] = set()
        self.accepted = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)  # type: ignore[arg-type]

    def cut(self) -> None:
        self.mode = "cut"
        self.reset()

    def blackhole(self) -> None:
        self.mode = "blackhole"

    def slow(self, delay: float) -> None:
        self.mode, self.delay = "slow", delay

    def heal(self) -> None:
        self.mode = "pass"
        for c in list(self.conns):  # connections that were blackholed: gone for good
            if getattr(c, "holed", False):
                c.reset()

    def reset(self) -> None:
        for c in list(self.conns):
            c.reset()
        self.conns.clear()

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        conn = _Conn(client)
        if self.mode == "cut":
            _rst(client)
            return
        self.conns.add(conn)
        try:
            with conn.scope:
                if self.mode != "blackhole":
                    try:
                        conn.upstream = await trio.open_tcp_stream("127.0.0.1", self.target)
                    except OSError:
                        _rst(client)
                        return
                async with trio.open_nursery() as n:
                    n.start_soon(self._pump, conn, client, conn.upstream)
                    if conn.upstream is not None:
                        n.start_soon(self._pump, conn, conn.upstream, client)
        finally:
            self.conns.discard(conn)
            with suppress(Exception):
                await trio.aclose_forcefully(client)
            if conn.upstream is not None:
                with suppress(Exception):
                    await trio.aclose_forcefully(conn.upstream)

    async def _pump(self, conn: _Conn, src: trio.SocketStream, dst: trio.SocketStream | None) -> None:
        try:
            while True:
                data = await src.receive_some(65536)
                if not data:
                    if dst is not None:
                        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                            await dst.send_eof()
                    return
                if self.mode == "blackhole" or dst is None:
                    conn.holed = True  # type: ignore[attr-defined]
                    continue  # swallowed: the peer waits for an answer that never comes
                if self.mode == "slow":
                    await trio.sleep(self.delay)
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            conn.scope.cancel()


# --- the engines ----------------------------------------------------------------------------
class Proc:
    def __init__(self, args: list[str], log: Path) -> None:
        self.args, self.log = args, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        f = open(self.log, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(self.args, stdout=f, stderr=subprocess.STDOUT, env=_env())
        f.close()

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


async def wait_http(url: str, limit: float = 60.0, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + limit
    async with httpx.AsyncClient(timeout=2) as c:
        while time.monotonic() < deadline:
            with suppress(httpx.HTTPError):
                if (await c.get(url)).status_code == 200:
                    return
            if proc is not None and proc.proc is not None and proc.proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited:\n{proc.tail()}")
            await trio.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {limit}s\n{proc.tail() if proc else ''}")


async def until(pred: Callable[[], Any], what: str, limit: float = 30.0) -> None:
    """Poll ``pred`` (plain or async) every 0.1 s until it is true; after ``limit`` seconds an
    AssertionError says what did not happen."""
    with trio.move_on_after(limit):
        while True:
            ok = pred()
            if inspect.isawaitable(ok):
                ok = await ok
            if ok:
                return
            await trio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Rig:
    """A cloud and an edge on loopback, the proxy between them (edge → proxy → cloud).

    ``transport``: ``https`` (the cloud's API; plain HTTP on loopback), ``mqtt`` (the cloud's
    embedded broker: edge → proxy → broker → cloud) or ``mosquitto`` (an external Mosquitto
    the cloud engine is connected to: edge → proxy → Mosquitto ↔ cloud)."""

    tmp: Path
    batch: int = 500
    buffer: str = "    max_bytes: 256MB"
    transport: str = "https"
    site: Path = field(init=False)
    cloud_state: Path = field(init=False)
    edge_state: Path = field(init=False)
    cloud_port: int = field(init=False)
    edge_port: int = field(init=False)
    cloud: Proc = field(init=False)
    edge: Proc = field(init=False)
    proxy: Proxy = field(init=False)
    token: str = ""
    edge_key: str = ""
    device_keys: dict[str, str] = field(default_factory=dict)

    mqtt_port: int = field(init=False)
    mosquitto: Proc | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.site = write_site(self.tmp / "site", batch=self.batch, buffer=self.buffer)
        self.cloud_state = self.tmp / "cloud"
        self.edge_state = self.tmp / "edge"
        self.cloud_port, self.edge_port, self.mqtt_port = free_port(), free_port(), free_port()
        mqtt = ["--no-mqtt"]
        if self.transport == "mqtt":
            mqtt = ["--mqtt-listen", f"127.0.0.1:{self.mqtt_port}"]
        elif self.transport == "mosquitto":
            mqtt = ["--mqtt-broker", f"127.0.0.1:{self.mqtt_port}"]
            conf = self.tmp / "mosquitto.conf"
            conf.write_text(f"listener {self.mqtt_port} 127.0.0.1\nallow_anonymous true\n"
                            "persistence false\nmax_inflight_messages 0\n")  # fmt: skip
            self.mosquitto = Proc(["mosquitto", "-c", str(conf)], self.tmp / "mosquitto.log")
        self.proxy = Proxy(self.cloud_port if self.transport == "https" else self.mqtt_port)
        self.cloud = Proc([sys.executable, "-m", "twin.cli", "--state-dir", str(self.cloud_state),
                           "up", "--listen", f"127.0.0.1:{self.cloud_port}", *mqtt,
                           "--no-coap", "--log-level", "warning"],
                          self.tmp / "cloud.log")  # fmt: skip

    @property
    def uplink_url(self) -> str:
        scheme = "http" if self.transport == "https" else "mqtt"
        return f"{scheme}://127.0.0.1:{self.proxy.port}"

    async def start(self, nursery: trio.Nursery) -> None:
        twin(self.cloud_state, "apply", str(self.site))
        self.edge_key = twin(self.cloud_state, "edge-key", "gw-t").strip().splitlines()[-1]
        twin(self.cloud_state, "user", "add", "admin", "--role", "admin",
             "--password", ADMIN_PASSWORD)  # fmt: skip
        twin(self.edge_state, "apply", str(self.site))
        for dev in ("meter", "valve"):
            self.device_keys[dev] = twin(self.edge_state, "device-key", "create", dev).strip().splitlines()[-1]
        await nursery.start(self.proxy.serve)
        self.edge = Proc([sys.executable, "-m", "twin.cli", "edge", str(self.site),
                          "--cloud", self.uplink_url, "--name", "gw-t",
                          "--key", self.edge_key, "--listen", f"127.0.0.1:{self.edge_port}",
                          "--state-dir", str(self.edge_state), "--log-level", "warning"],
                         self.tmp / "edge.log")  # fmt: skip
        if self.mosquitto is not None:
            self.mosquitto.start()
        self.cloud.start()
        self.edge.start()
        await self.wait_cloud()
        await self.wait_edge()
        async with httpx.AsyncClient(timeout=10) as c:
            r = await c.post(f"{self.cloud_url}/api/v1/auth/login",
                             json={"username": "admin", "password": ADMIN_PASSWORD})  # fmt: skip
            self.token = r.json()["access_token"]

    @property
    def cloud_url(self) -> str:
        return f"http://127.0.0.1:{self.cloud_port}"

    @property
    def edge_url(self) -> str:
        return f"http://127.0.0.1:{self.edge_port}"

    async def wait_cloud(self) -> None:
        await wait_http(f"{self.cloud_url}/api/v1/health", proc=self.cloud)

    async def wait_edge(self) -> None:
        await wait_http(f"{self.edge_url}/api/v1/health", proc=self.edge)

    def close(self) -> None:
        for p in (getattr(self, "edge", None), getattr(self, "cloud", None), self.mosquitto):
            if p is not None:
                p.stop()

    async def link(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10) as c:
            r = await c.get(f"{self.cloud_url}/api/v1/edges/gw-t",
                            headers={"Authorization": f"Bearer {self.token}"})  # fmt: skip
            r.raise_for_status()
            return dict(r.json())

    async def stored(self, device: str = "meter", point: str = "n") -> list[tuple[Any, Any]]:
        """Every stored (ts, value) of one series in the cloud, in the store's order."""
        async with httpx.AsyncClient(timeout=60) as c:
            r = await c.get(f"{self.cloud_url}/api/v1/timeseries/query",
                            params={"device": device, "metric": point, "from": "0",
                                    "to": str(time.time() + 86400), "limit": "10000000"},
                            headers={"Authorization": f"Bearer {self.token}"})  # fmt: skip
            r.raise_for_status()
            return _points(r.json())

    async def drained(self, limit: float = 120.0) -> dict[str, Any]:
        """Wait until the edge's outbox is empty and the cloud acknowledged it."""
        deadline = time.monotonic() + limit
        link: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with suppress(httpx.HTTPError):
                link = await self.link()
                if link["online"] and link["outbox_depth"] == 0 and link["lag_s"] is None:
                    return link
            await trio.sleep(0.5)
        raise TimeoutError(f"not drained: {json.dumps(link)}\n{self.edge.tail()}")


def _points(body: Any) -> list[tuple[Any, Any]]:
    """(ts, value) rows of the query API's JSON (``{"columns": [...], "rows": [...]}``), in
    the order it returns them (by time)."""
    cols = list(body["columns"])
    ti, vi = cols.index("ts"), cols.index("value")
    return [(datetime.fromisoformat(str(row[ti]).replace("Z", "+00:00")), row[vi])
            for row in body["rows"]]  # fmt: skip


@dataclass
class Producer:
    """Pushes readings into the edge's HTTP ingest (``meter``/``n`` = 0, 1, 2 ...), ``per``
    readings a request, and remembers which values the edge acknowledged (2xx: in the
    outbox and the local log, fsynced) and which were in flight when something failed."""

    url: str
    key: str
    device: str = "meter"
    per: int = 10
    rate: float = 500.0  # readings per second
    acked: list[int] = field(default_factory=list)
    unknown: set[int] = field(default_factory=set)
    refused: int = 0
    next: int = 0
    t0: float = field(default_factory=lambda: float(int(time.time())))

    async def run(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        async with httpx.AsyncClient(timeout=5) as c:
            while time.monotonic() < end:
                t = time.monotonic()
                vals = list(range(self.next, self.next + self.per))
                self.next += self.per
                body = {"readings": [{"point": "n", "value": v, "ts": self.t0 + v / 1000}
                                     for v in vals]}  # fmt: skip
                try:
                    r = await c.post(f"{self.url}/api/v1/ingest/{self.device}", json=body,
                                     headers={"X-Device-Key": self.key})  # fmt: skip
                    if r.status_code < 300:
                        self.acked.extend(vals)
                    else:
                        self.refused += 1
                except httpx.HTTPError:
                    self.unknown.update(vals)  # in flight when the edge died: maybe stored
                await trio.sleep(max(0.0, self.per / self.rate - (time.monotonic() - t)))


def account(producer: Producer, stored: list[tuple[Any, Any]]) -> dict[str, int]:
    """Exactly once: every acknowledged value stored once, nothing twice, in order."""
    values = [int(v) for _, v in stored]
    seen: dict[int, int] = {}
    for v in values:
        seen[v] = seen.get(v, 0) + 1
    acked = set(producer.acked)
    missing = sorted(acked - set(seen))
    dups = sum(n - 1 for n in seen.values() if n > 1)
    extra = sorted(set(seen) - acked - producer.unknown)
    ts = [t for t, _ in stored]
    order = sum(1 for a, b in itertools.pairwise(ts) if b < a)
    return {"acked": len(acked), "stored": len(values), "missing": len(missing),
            "duplicates": dups, "unexpected": len(extra), "out_of_order": order,
            "in_flight_stored": len(set(seen) & producer.unknown)}  # fmt: skip


@contextmanager
def rig(tmp: Path, **kw: Any) -> Iterator[Rig]:
    r = Rig(tmp, **kw)
    try:
        yield r
    finally:
        r.close()
