"""Cluster membership, ownership and fencing in PostgreSQL (scale-out; DESIGN §7).

Several engines share one PostgreSQL registry. This module is the SQL of it, synchronous like
the rest of the registry (the runtime calls it from worker threads, ``twin/runtime/cluster.py``).

Tables (created on first use by :meth:`ClusterStore.ensure`, idempotently, under the
registry's migration lock — cluster mode is PostgreSQL-only, so they are not part of the
numbered migrations both dialects share):

``cluster_engines``
    one row per engine incarnation: ``id`` (random per process start), ``epoch`` (from the
    ``cluster_epoch`` sequence, unique per registration: the *fencing token*), its name, host,
    API address, and ``lease_until`` in the database's clock. An engine renews every
    ``ttl / 5``; a row whose lease passed is dead (reaped a minute later).
``cluster_owners``
    ``(kind, name) → (engine, epoch)``: who runs a device task, a reconciler or a scene. A row
    is claimed only when free or held by a dead incarnation, and released by its owner when the
    rendezvous hash moves it elsewhere (a join): never two owners at once.
``cluster_scene_runs``
    one key per scene trigger event: a second engine cannot insert it twice.
``cluster_command_claims``
    one row per dispatched command: the ledger row is claimed, not read, before delivery.
``cluster_jobs``
    lease rows for jobs that must run on one engine at a time (retention, rollups).

**Fencing**: every write that matters (claiming an owner row, a scene-run key, a command claim,
a job lease) is conditional on the writer's own incarnation row still holding a live lease with
its epoch. An engine cut off from PostgreSQL cannot renew, so its writes fail the moment its
lease has passed in the database, whatever its own clock believes; it also stops acting by
itself when its local deadline (taken *before* each renewal was sent) passes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..errors import RegistryError

_NOW = "EXTRACT(EPOCH FROM clock_timestamp())"
_LIVE = (
    "EXISTS (SELECT 1 FROM cluster_engines e WHERE e.id = %(engine)s "
    f"AND e.epoch = %(epoch)s AND e.lease_until > {_NOW})"
)

SCHEMA = [
    "CREATE SEQUENCE IF NOT EXISTS cluster_epoch",
    """CREATE TABLE IF NOT EXISTS cluster_engines (
        id TEXT PRIMARY KEY,
        epoch BIGINT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        host TEXT NOT NULL DEFAULT '',
        pid INTEGER NOT NULL DEFAULT 0,
        api TEXT NOT NULL DEFAULT '',
        started_at DOUBLE PRECISION NOT NULL,
        heartbeat_at DOUBLE PRECISION NOT NULL,
        lease_until DOUBLE PRECISION NOT NULL,
        load JSONB NOT NULL DEFAULT '{}'::jsonb
    )""",
    """CREATE TABLE IF NOT EXISTS cluster_owners (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        engine TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        since DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (kind, name)
    )""",
    "CREATE INDEX IF NOT EXISTS cluster_owners_engine ON cluster_owners (engine)",
    """CREATE TABLE IF NOT EXISTS cluster_scene_runs (
        key TEXT PRIMARY KEY,
        scene TEXT NOT NULL,
        engine TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS cluster_scene_runs_at ON cluster_scene_runs (at)",
    """CREATE TABLE IF NOT EXISTS cluster_command_claims (
        command TEXT PRIMARY KEY,
        engine TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS cluster_jobs (
        name TEXT PRIMARY KEY,
        engine TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        until DOUBLE PRECISION NOT NULL
    )""",
]


@dataclass(frozen=True)
class Member:
    id: str
    epoch: int
    name: str
    host: str
    pid: int
    api: str
    started_at: float
    heartbeat_at: float
    lease_until: float
    load: dict[str, Any] = field(default_factory=dict)
    alive: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "epoch": self.epoch,
            "name": self.name,
            "host": self.host,
            "pid": self.pid,
            "api": self.api,
            "started_at": self.started_at,
            "heartbeat_at": self.heartbeat_at,
            "lease_until": self.lease_until,
            "alive": self.alive,
            "load": self.load,
        }


def _member_fields(r: Sequence[Any]) -> tuple[Any, ...]:
    return (
        str(r[0]), int(r[1]), str(r[2]), str(r[3]), int(r[4]), str(r[5]),
        float(r[6]), float(r[7]), float(r[8]), dict(r[9] or {}), bool(r[10]),
    )  # fmt: skip


def rendezvous(key: str, members: Sequence[str]) -> str | None:
    """Highest-random-weight owner of ``key`` among ``members`` (engine ids): every engine
    computes the same answer from the same member list, and a join or a death moves only the
    keys of that one engine (~1/N of them)."""
    best: tuple[bytes, str] | None = None
    for m in members:
        w = hashlib.blake2b(f"{m}\0{key}".encode(), digest_size=8).digest()
        if best is None or w > best[0]:
            best = (w, m)
    return None if best is None else best[1]


class ClusterStore:
    """The cluster tables of a PostgreSQL registry (``twin.registry.postgres``)."""

    def __init__(self, registry: Any) -> None:
        if getattr(registry, "dialect", "") != "postgresql":
            raise RegistryError(
                "cluster mode needs the PostgreSQL registry",
                hint="run every engine with --registry postgresql://... (the same database)",
            )
        self.registry = registry

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self.registry._tx(write=True) as conn:
            yield conn

    def ensure(self) -> None:
        key = int.from_bytes(hashlib.sha256(b"flux-iot-cluster").digest()[:8], "big", signed=True)
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
            for stmt in SCHEMA:
                conn.execute(stmt)

    # -- membership ---------------------------------------------------------------------------
    def register(
        self, engine: str, name: str, host: str, pid: int, api: str, ttl: float
    ) -> tuple[int, float]:
        """A new incarnation: returns (epoch, lease_until in the database's clock)."""
        with self._tx() as conn:
            row = conn.execute(
                "INSERT INTO cluster_engines (id, epoch, name, host, pid, api, started_at, "
                f"heartbeat_at, lease_until) VALUES (%s, nextval('cluster_epoch'), %s, %s, %s, "
                f"%s, {_NOW}, {_NOW}, {_NOW} + %s) "
                "ON CONFLICT (id) DO UPDATE SET epoch = nextval('cluster_epoch'), "
                f"heartbeat_at = {_NOW}, lease_until = {_NOW} + %s "
                "RETURNING epoch, lease_until",
                (engine, name, host, pid, api, ttl, ttl),
            ).fetchone()
        return int(row[0]), float(row[1])

    def heartbeat(self, engine: str, epoch: int, ttl: float, load: dict[str, Any]) -> bool:
        """Renew the lease; False when it had passed already (the incarnation is dead: its
        owner rows may be taken, so it must stop acting and register anew)."""
        with self._tx() as conn:
            row = conn.execute(
                f"UPDATE cluster_engines SET heartbeat_at = {_NOW}, "
                f"lease_until = {_NOW} + %s, load = %s::jsonb "
                f"WHERE id = %s AND epoch = %s AND lease_until > {_NOW} RETURNING epoch",
                (ttl, json.dumps(load), engine, epoch),
            ).fetchone()
        return row is not None

    def leave(self, engine: str, epoch: int) -> None:
        """A clean stop: give everything up at once (others take over without waiting for the
        lease to pass)."""
        with self._tx() as conn:
            conn.execute(
                "DELETE FROM cluster_owners WHERE engine = %s AND epoch = %s", (engine, epoch)
            )
            conn.execute("DELETE FROM cluster_jobs WHERE engine = %s AND epoch = %s", (engine, epoch))
            conn.execute("DELETE FROM cluster_engines WHERE id = %s AND epoch = %s", (engine, epoch))

    def members(self, *, include_dead: bool = False) -> list[Member]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT id, epoch, name, host, pid, api, started_at, heartbeat_at, lease_until, "
                f"load, lease_until > {_NOW} FROM cluster_engines ORDER BY name, id"
            ).fetchall()
        out = [
            Member(*_member_fields(r))
            for r in rows
        ]
        return out if include_dead else [m for m in out if m.alive]

    def reap(self, grace: float = 60.0) -> int:
        """Forget incarnations dead for ``grace`` seconds, and owner rows of dead ones."""
        with self._tx() as conn:
            conn.execute(
                "DELETE FROM cluster_owners o WHERE NOT EXISTS (SELECT 1 FROM cluster_engines e "
                f"WHERE e.id = o.engine AND e.epoch = o.epoch AND e.lease_until > {_NOW})"
            )
            cur = conn.execute(
                f"DELETE FROM cluster_engines WHERE lease_until < {_NOW} - %s", (grace,)
            )
            conn.execute(f"DELETE FROM cluster_scene_runs WHERE at < {_NOW} - 86400")
            return int(cur.rowcount or 0)

    # -- ownership ----------------------------------------------------------------------------
    def owners(self) -> dict[tuple[str, str], tuple[str, int]]:
        with self._tx() as conn:
            rows = conn.execute("SELECT kind, name, engine, epoch FROM cluster_owners").fetchall()
        return {(str(r[0]), str(r[1])): (str(r[2]), int(r[3])) for r in rows}

    def claim(self, engine: str, epoch: int, keys: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """Claim the free ones of ``keys`` (or those held by a dead incarnation); return the
        keys this incarnation holds afterwards. Nothing when its own lease has passed."""
        keys = list(keys)
        if not keys:
            return set()
        params = {"engine": engine, "epoch": epoch}
        with self._tx() as conn:
            live = conn.execute(f"SELECT {_LIVE}", params).fetchone()
            if not live or not live[0]:
                return set()
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO cluster_owners AS o (kind, name, engine, epoch, since) "
                    f"VALUES (%(kind)s, %(name)s, %(engine)s, %(epoch)s, {_NOW}) "
                    "ON CONFLICT (kind, name) DO UPDATE SET engine = excluded.engine, "
                    "epoch = excluded.epoch, since = excluded.since "
                    "WHERE NOT EXISTS (SELECT 1 FROM cluster_engines e WHERE e.id = o.engine "
                    f"AND e.epoch = o.epoch AND e.lease_until > {_NOW})",
                    [{"kind": k, "name": n, **params} for k, n in keys],
                )
            rows = conn.execute(
                "SELECT kind, name FROM cluster_owners WHERE engine = %(engine)s "
                "AND epoch = %(epoch)s",
                params,
            ).fetchall()
        return {(str(r[0]), str(r[1])) for r in rows}

    def release(self, engine: str, epoch: int, keys: Iterable[tuple[str, str]]) -> None:
        keys = list(keys)
        if not keys:
            return
        with self._tx() as conn, conn.cursor() as cur:
            cur.executemany(
                "DELETE FROM cluster_owners WHERE kind = %s AND name = %s AND engine = %s "
                "AND epoch = %s",
                [(k, n, engine, epoch) for k, n in keys],
            )

    # -- exactly once -------------------------------------------------------------------------
    def scene_run(self, engine: str, epoch: int, key: str, scene: str) -> bool:
        """Record that this incarnation runs the scene for trigger ``key``: True exactly once
        cluster-wide (False: another engine ran it, or this one's lease has passed)."""
        params = {"engine": engine, "epoch": epoch, "key": key, "scene": scene}
        with self._tx() as conn:
            row = conn.execute(
                "INSERT INTO cluster_scene_runs (key, scene, engine, epoch, at) "
                f"SELECT %(key)s, %(scene)s, %(engine)s, %(epoch)s, {_NOW} WHERE {_LIVE} "
                "ON CONFLICT (key) DO NOTHING RETURNING key",
                params,
            ).fetchone()
        return row is not None

    def claim_command(self, engine: str, epoch: int, command: str) -> bool:
        """Claim a command for dispatch: True for exactly one incarnation, ever (a retry by the
        same incarnation is True again)."""
        params = {"engine": engine, "epoch": epoch, "command": command}
        with self._tx() as conn:
            row = conn.execute(
                "INSERT INTO cluster_command_claims AS c (command, engine, epoch, at) "
                f"SELECT %(command)s, %(engine)s, %(epoch)s, {_NOW} WHERE {_LIVE} "
                "ON CONFLICT (command) DO UPDATE SET at = excluded.at "
                "WHERE c.engine = excluded.engine AND c.epoch = excluded.epoch "
                "RETURNING command",
                params,
            ).fetchone()
        return row is not None

    def unclaim_command(self, engine: str, epoch: int, command: str) -> None:
        """Give a claim back: the command was not sent (its device is not connected to this
        engine), so the device's next owner may deliver it."""
        with self._tx() as conn:
            conn.execute(
                "DELETE FROM cluster_command_claims WHERE command = %s AND engine = %s "
                "AND epoch = %s",
                (command, engine, epoch),
            )

    def job(self, engine: str, epoch: int, name: str, seconds: float) -> bool:
        """Take or renew the lease of job ``name`` for ``seconds``: True when this incarnation
        may run it now (one engine at a time, fenced like everything else)."""
        params = {"engine": engine, "epoch": epoch, "name": name, "s": seconds}
        with self._tx() as conn:
            row = conn.execute(
                "INSERT INTO cluster_jobs AS j (name, engine, epoch, until) "
                f"SELECT %(name)s, %(engine)s, %(epoch)s, {_NOW} + %(s)s WHERE {_LIVE} "
                "ON CONFLICT (name) DO UPDATE SET engine = excluded.engine, "
                "epoch = excluded.epoch, until = excluded.until "
                f"WHERE (j.engine = excluded.engine AND j.epoch = excluded.epoch) OR j.until < {_NOW}"
                " RETURNING name",
                params,
            ).fetchone()
        return row is not None

    # -- the cross-engine feed ----------------------------------------------------------------
    def notify(self, channel: str, payloads: Sequence[str]) -> None:
        with self._tx() as conn, conn.cursor() as cur:
            cur.executemany("SELECT pg_notify(%s, %s)", [(channel, p) for p in payloads])

    def sender(self) -> Any:
        """A dedicated autocommit connection for ``pg_notify`` (one round trip per batch, no
        transaction around it); the caller closes it."""
        import psycopg

        return psycopg.connect(self.registry._conninfo, autocommit=True)

    def listen(self, channel: str) -> Any:
        """A dedicated autocommit connection LISTENing on ``channel`` (the caller iterates
        ``conn.notifies(timeout=...)`` in a thread and closes it)."""
        import psycopg
        from psycopg import sql as pgsql

        conn = psycopg.connect(self.registry._conninfo, autocommit=True)
        conn.execute(pgsql.SQL("LISTEN {}").format(pgsql.Identifier(channel)))
        return conn
