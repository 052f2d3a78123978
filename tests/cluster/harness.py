"""Several ``twin up --cluster`` processes on one PostgreSQL schema, and a TCP proxy that can
blackhole an engine's PostgreSQL connection (a network partition without a RST)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from cli.procs import Up, cli_env, run, start_up

PG_URL = os.environ.get("TWIN_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def pg_unavailable() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"PostgreSQL unreachable at {PG_URL}: {str(exc).strip().splitlines()[0]}"
    return None


def with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


SITE = """\
apiVersion: flux.iot/v1
kind: Site
metadata: {name: cl}
spec: {timezone: UTC}
---
apiVersion: flux.iot/v1
kind: DeviceModel
metadata: {name: counter}
spec:
  telemetry:
    n: {type: number}
  commands:
    ping: {}
"""

DEVICE = """\
---
apiVersion: flux.iot/v1
kind: Device
metadata: {{name: {name}, site: cl}}
spec:
  type: sensor
  model: counter
  binding:
{binding}"""

SIM = """\
    sim:
      interval: {interval}
      points:
        n: {{wave: random_walk, min: 0, max: 1000}}
"""
HTTP = "    http: {}\n"
MQTT = """\
    mqtt: {{prefix: "{prefix}/{{device}}", qos: 1}}
"""

SCENE = """\
---
apiVersion: flux.iot/v1
kind: Scene
metadata: {{name: {name}, site: cl}}
spec:
  mode: parallel
  max: 100
  triggers:
    - {{type: device_data, device: {device}, point: n, operator: changed}}
  actions:
    - {{type: command, device: {target}, command: ping}}
"""


def write_site(
    root: Path, devices: int, scenes: int, interval: str = "500ms", http: int = 0,
    mqtt: int = 0, prefix: str = "cl",
) -> Path:  # fmt: skip
    site = root / "site"
    site.mkdir(parents=True, exist_ok=True)
    text = SITE
    for i in range(devices):
        text += DEVICE.format(name=f"dev{i:02d}", binding=SIM.format(interval=interval))
    for i in range(http):
        text += DEVICE.format(name=f"http{i:02d}", binding=HTTP)
    for i in range(mqtt):
        text += DEVICE.format(name=f"mq{i:02d}", binding=MQTT.format(prefix=prefix))
    for i in range(scenes):
        text += SCENE.format(
            name=f"scene{i:02d}", device=f"dev{i:02d}", target=f"dev{(i + 1) % devices:02d}"
        )
    (site / "site.yaml").write_text(text)
    return site


class Proxy:
    """A TCP proxy on loopback: ``blackhole()`` stops forwarding both ways and keeps every
    socket open (no RST, no FIN), ``heal()`` forwards again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = False
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while not self.flowing.is_set():
                    if self.closed:
                        return
                    time.sleep(0.05)  # blackholed: hold the bytes, send nothing
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def blackhole(self) -> None:
        self.flowing.clear()

    def heal(self) -> None:
        self.flowing.set()

    def close(self) -> None:
        self.closed = True
        self.flowing.set()
        with suppress(OSError):
            self.sock.close()
        for c in self.conns:
            with suppress(OSError):
                c.close()


class Cluster:
    def __init__(
        self, root: Path, devices: int = 12, scenes: int = 6, ttl: float = 3.0, http: int = 0,
        timeseries: bool = False, mqtt: int = 0, broker: str | None = None,
    ) -> None:  # fmt: skip
        import psycopg

        self.root = root
        self.schema = "cl_" + uuid.uuid4().hex[:10]
        self.name = "c" + uuid.uuid4().hex[:6]
        self.url = with_schema(PG_URL, self.schema)
        self.ttl = ttl
        self.prefix = f"twin-cluster-test/{uuid.uuid4().hex[:8]}"  # its own topics on a shared broker
        self.broker = broker
        self.site = write_site(root, devices, scenes, http=http, mqtt=mqtt, prefix=self.prefix)
        # the shared time-series store: the same database, the cluster's schema
        self.timeseries = (
            f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{self.schema}"
            if timeseries
            else None
        )
        self.secret = root / "jwt.secret"
        self.secret.write_text(os.urandom(32).hex())
        self.engines: dict[str, Up] = {}
        self.proxies: list[Proxy] = []
        self.psycopg = psycopg
        env = self.env("apply")
        res = run(env, "apply", str(self.site), "-m", "cluster test")
        assert res.returncode == 0, res.stdout + res.stderr

    def env(self, name: str) -> dict[str, str]:
        state = self.root / name
        state.mkdir(exist_ok=True)
        return cli_env(state, TWIN_JWT_SECRET_FILE=str(self.secret), TWIN_REGISTRY=self.url)

    def start(self, name: str, url: str | None = None) -> Up:
        ts = ["--timeseries", self.timeseries] if self.timeseries else ["--no-timeseries"]
        mq = ["--mqtt-broker", self.broker] if self.broker else ["--no-mqtt"]
        up = start_up(
            self.env(name), "--registry", url or self.url, "--cluster", self.name,
            "--cluster-ttl", str(self.ttl), "--listen", "127.0.0.1:0", *mq, *ts,
        )  # fmt: skip
        self.engines[name] = up
        return up

    def device_key(self, device: str) -> str:
        res = run(self.env("admin"), "device-key", "create", device)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout.strip().splitlines()[-1]

    def kill9(self, name: str) -> None:
        up = self.engines.pop(name)
        up.proc.send_signal(signal.SIGKILL)
        up.proc.wait()

    def stop_all(self) -> None:
        for up in self.engines.values():
            with suppress(Exception):
                up.stop()
        self.engines.clear()
        for p in self.proxies:
            p.close()

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        with self.psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'SET search_path TO "{self.schema}"')
            return list(conn.execute(query, args).fetchall())

    def owners(self) -> dict[tuple[str, str], str]:
        """(kind, name) → engine name, only rows held by a live incarnation."""
        rows = self.sql(
            "SELECT o.kind, o.name, e.name FROM cluster_owners o JOIN cluster_engines e "
            "ON e.id = o.engine AND e.epoch = o.epoch "
            "WHERE e.lease_until > EXTRACT(EPOCH FROM clock_timestamp())"
        )
        return {(str(k), str(n)): str(e) for k, n, e in rows}

    def balanced(self, keys: int) -> dict[tuple[str, str], str] | None:
        """The owners once all ``keys`` are held and each by its rendezvous owner among the
        live engines (the cluster has settled), else None. With few keys an engine may rightly
        own nothing (6 keys on 3 engines: p ~ 0.26), so tests wait for this, not for a share
        per engine."""
        from twin.registry.cluster import rendezvous

        live = dict(
            self.sql(
                "SELECT id, name FROM cluster_engines "
                "WHERE lease_until > EXTRACT(EPOCH FROM clock_timestamp())"
            )
        )
        owners = self.owners()
        if len(owners) != keys:
            return None
        ids = sorted(live)
        for (kind, name), engine in owners.items():
            if live.get(rendezvous(f"{kind}/{name}", ids)) != engine:
                return None
        return owners

    def engine_names(self) -> dict[int, str]:
        """pid → engine name (the registry's, ``host-pid``)."""
        return {int(p): str(n) for p, n in self.sql("SELECT pid, name FROM cluster_engines")}

    def status_json(self, up: Up) -> dict[str, Any]:
        import httpx

        token = self.token()
        r = httpx.get(f"{up.url}/api/v1/cluster", headers={"Authorization": f"Bearer {token}"})
        r.raise_for_status()
        return dict(r.json())

    _token: str | None = None

    def token(self) -> str:
        if self._token is None:
            env = self.env("admin")
            res = run(env, "user", "add", "admin", "--role", "admin", "--password-stdin",
                      input="admin-password-1\n")  # fmt: skip
            assert res.returncode == 0, res.stdout + res.stderr
            res = run(env, "token", "create", "admin")
            assert res.returncode == 0, res.stdout + res.stderr
            self._token = res.stdout.strip().splitlines()[-1]
        return self._token

    def drop(self) -> None:
        with self.psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')


@contextmanager
def cluster(root: Path, **kw: Any) -> Iterator[Cluster]:
    c = Cluster(root, **kw)
    try:
        yield c
    finally:
        c.stop_all()
        c.drop()


def dumps(value: Any) -> str:
    return json.dumps(value, indent=1, default=str)
