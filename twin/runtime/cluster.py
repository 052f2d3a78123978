"""Scale-out: several engines on one PostgreSQL registry (and one MQTT broker).

``twin up --cluster NAME --registry postgresql://...`` adds :class:`ClusterService` to the
engine. It is the engine's :class:`Ownership`: every device (its task, binding, desired-state
reconciler and command dispatch) and every scene has exactly one owner among the live engines.

```
ClusterService
├─ beat       every ttl/5: renew this incarnation's lease (twin/registry/cluster.py), read the
│             live members, compute each key's rendezvous owner, release what moved away
│             (at most ``max_moves`` a beat: a join rebalances without a stampede), claim
│             what is free; a changed set bumps ``version`` and pokes the engine
├─ fence      every 0.2 s: past the local deadline (taken *before* the last renewal was
│             sent, + ttl) this engine owns nothing, whatever PostgreSQL says later
└─ feed       local bus events → batched NOTIFY; LISTEN → other engines' events into the
              local bus (``"remote": true``), so WebSocket clients, scenes and alarms see
              every device whichever engine serves them (twin/runtime/feed.py)
```
Exactly once: a scene runs for a trigger event only after inserting the event's key
(:meth:`ClusterService.scene_gate`); a command is delivered only after its claim row is
inserted (:meth:`ClusterService.claim_command`); jobs that must run on one engine take a
job lease (:meth:`ClusterService.job`). Each of these writes is fenced by the incarnation's
epoch in the database (see twin/registry/cluster.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from twin.registry.cluster import ClusterStore, Member, rendezvous

if TYPE_CHECKING:
    from twin.runtime.engine import Engine

log = logging.getLogger(__name__)

Key = tuple[str, str]
OWNED_KINDS = ("Device", "Scene")


class Ownership:
    """What this engine runs. The default (one engine) owns everything."""

    active = False
    version = 0
    engine_id = ""
    epoch = 0

    def owns(self, kind: str, name: str) -> bool:
        return True

    async def job(self, name: str, seconds: float) -> bool:
        """May this engine run job ``name`` now (one engine at a time in a cluster)?"""
        return True

    async def scene_gate(self, scene: str, key: str) -> bool:
        return True

    async def claim_command(self, command: str) -> bool:
        return True

    async def unclaim_command(self, command: str) -> None:
        return None


EVERYTHING = Ownership()


@dataclass
class ClusterStats:
    beats: int = 0
    failed_beats: int = 0
    lease_lost: int = 0
    fenced: int = 0
    claimed: int = 0
    released: int = 0
    scene_dedup: int = 0
    command_refused: int = 0
    last_change: float = 0.0


@dataclass(eq=False)
class ClusterService(Ownership):
    """The engine service ``cluster`` (see the module docstring)."""

    cluster: str = "default"
    ttl: float = 5.0
    api: str = ""
    max_moves: int = 500
    name: str = "cluster"
    engine_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    engine_name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")

    def __post_init__(self) -> None:
        self.active = True
        self.epoch = 0
        self.version = 0
        self.held: set[Key] = set()
        self._releasing: set[Key] = set()  # given up here, rows not freed yet
        self.members: list[Member] = []
        self.deadline = 0.0  # trio clock: owning nothing after this
        self.stats = ClusterStats()
        self.engine: Any = None
        self.store: ClusterStore | None = None
        self._changed = trio.Event()

    # -- Ownership ----------------------------------------------------------------------------
    def owns(self, kind: str, name: str) -> bool:
        if kind not in OWNED_KINDS:
            return True
        return (kind, name) in self.held

    def owner_of(self, kind: str, name: str) -> Member | None:
        """The live member that should own a key (rendezvous over the members last read)."""
        ids = [m.id for m in self.members]
        owner = rendezvous(f"{kind}/{name}", ids)
        return next((m for m in self.members if m.id == owner), None)

    def _set_held(self, held: set[Key]) -> None:
        if held == self.held:
            return
        gained, lost = len(held - self.held), len(self.held - held)
        self.held = held
        self.version += 1
        self.stats.last_change = time.time()
        log.info(
            "cluster %s: engine %s owns %d (+%d -%d)",
            self.cluster,
            self.engine_name,
            len(held),
            gained,
            lost,
        )
        if self.engine is not None:
            self.engine.ownership_changed()
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self) -> None:
        await self._changed.wait()

    # -- database calls (worker threads, bounded) ---------------------------------------------
    async def _db(self, fn: Any, *args: Any, limit: float | None = None) -> Any:
        """Run a registry call in a thread; give up on it after ``timeout`` (a blackholed
        connection must not freeze the fence: the thread is abandoned)."""
        with trio.fail_after(limit or self.ttl):
            return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)

    # -- exactly once -------------------------------------------------------------------------
    async def scene_gate(self, scene: str, key: str) -> bool:
        if self.store is None or not self.held:
            return False
        digest = hashlib.blake2b(f"{scene}\n{key}".encode(), digest_size=16).hexdigest()
        ok = bool(await self._db(self.store.scene_run, self.engine_id, self.epoch, digest, scene))
        if not ok:
            self.stats.scene_dedup += 1
        return ok

    async def claim_command(self, command: str) -> bool:
        if self.store is None:
            return False
        ok = bool(await self._db(self.store.claim_command, self.engine_id, self.epoch, command))
        if not ok:
            self.stats.command_refused += 1
        return ok

    async def unclaim_command(self, command: str) -> None:
        if self.store is not None:
            await self._db(self.store.unclaim_command, self.engine_id, self.epoch, command)

    async def job(self, name: str, seconds: float) -> bool:
        if self.store is None or trio.current_time() > self.deadline:
            return False
        try:
            return bool(
                await self._db(self.store.job, self.engine_id, self.epoch, name, seconds)
            )
        except Exception as exc:  # TooSlowError too: the job waits for the next round
            log.warning("cluster: job lease %s: %s", name, exc)
            return False

    # -- the loops ----------------------------------------------------------------------------
    def _keys(self) -> list[Key]:
        specs = self.engine.specs if self.engine is not None else {}
        return sorted(k for k in specs if k[0] in OWNED_KINDS)

    def _load(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "devices": sum(1 for k in self.held if k[0] == "Device"),
            "scenes": sum(1 for k in self.held if k[0] == "Scene"),
            "revision": engine.revision_number if engine is not None else 0,
            "device_tasks": len(engine.controller.tasks) if engine is not None else 0,
        }

    async def _register(self) -> None:
        assert self.store is not None
        sent = trio.current_time()
        self.epoch, _ = await self._db(
            self.store.register,
            self.engine_id,
            self.engine_name,
            socket.gethostname(),
            os.getpid(),
            self.api,
            self.ttl,
        )
        self.deadline = sent + self.ttl - 0.25
        log.info(
            "cluster %s: engine %s (%s) joined with epoch %d",
            self.cluster,
            self.engine_name,
            self.engine_id,
            self.epoch,
        )

    async def beat(self) -> None:
        """One renewal + rebalance round."""
        assert self.store is not None
        store = self.store
        sent = trio.current_time()
        ok = await self._db(store.heartbeat, self.engine_id, self.epoch, self.ttl, self._load())
        if not ok:
            self.stats.lease_lost += 1
            log.warning(
                "cluster %s: engine %s lost its lease (epoch %d); re-registering",
                self.cluster,
                self.engine_name,
                self.epoch,
            )
            self._set_held(set())
            self._releasing.clear()  # the old epoch's rows are free for the others anyway
            await self._register()
            return
        self.deadline = sent + self.ttl - 0.25
        self.stats.beats += 1
        self.members = await self._db(store.members)
        ids = [m.id for m in self.members]
        if self.engine_id not in ids:  # raced with our own expiry
            return
        want = {k for k in self._keys() if rendezvous(f"{k[0]}/{k[1]}", ids) == self.engine_id}
        give = sorted(self.held - want)[: self.max_moves]
        if give:
            # stop running them first, then free the rows: never two owners at once
            self._set_held(self.held - set(give))
            self._releasing.update(give)
        self._releasing -= want  # wanted here again before they were freed (a newcomer left)
        if self._releasing:
            # freed only once the engine runs without them; a reload that fails (or a database
            # call that times out) leaves them for the next beat instead of stuck forever
            with trio.move_on_after(self.ttl / 2) as waited:
                await self.engine.settled()
            if not waited.cancelled_caught:
                free = sorted(self._releasing)
                await self._db(store.release, self.engine_id, self.epoch, free)
                self._releasing.difference_update(free)
                self.stats.released += len(free)
        take = want - self.held
        if take:
            held = await self._db(store.claim, self.engine_id, self.epoch, sorted(take))
            got = held & take
            self.stats.claimed += len(got)
            self._set_held(self.held | got)

    async def _beat_loop(self) -> None:
        assert self.store is not None
        reap_at = 0.0
        while True:
            try:
                await self.beat()
                if trio.current_time() >= reap_at:
                    reap_at = trio.current_time() + 10 * self.ttl
                    await self._db(self.store.reap)
            except Exception as exc:  # TooSlowError too: retried next beat
                self.stats.failed_beats += 1
                log.warning("cluster %s: heartbeat failed: %s", self.cluster, exc)
            await trio.sleep(self.ttl / 5)

    async def _fence(self) -> None:
        while True:
            await trio.sleep(0.2)
            if self.held and trio.current_time() > self.deadline:
                self.stats.fenced += 1
                log.error(
                    "cluster %s: engine %s could not renew its lease in time: it stops owning "
                    "%d devices/scenes until it can",
                    self.cluster,
                    self.engine_name,
                    len(self.held),
                )
                # if the lease is still ours when the database answers again, the next beat
                # takes back what rendezvous gives it and frees the rest (else rows this
                # engine no longer runs would stay held while it renews)
                self._releasing |= self.held
                self._set_held(set())

    def status(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "engine": {"id": self.engine_id, "name": self.engine_name, "epoch": self.epoch},
            "ttl": self.ttl,
            "owns": {
                "devices": sorted(n for k, n in self.held if k == "Device"),
                "scenes": sorted(n for k, n in self.held if k == "Scene"),
            },
            "members": [m.to_json() for m in self.members],
            "stats": self.stats.__dict__.copy(),
        }

    async def __call__(
        self, engine: Engine, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        from twin.runtime.feed import Feed

        self.engine = engine
        self.store = ClusterStore(engine.registry)
        await self._db(self.store.ensure, limit=30)
        await self._register()
        engine.ownership = self
        # NOTIFY channels are per database: the schema and the cluster's name make it ours
        where = f"{getattr(engine.registry, 'schema', '') or ''}/{self.cluster}"
        channel = "twin_feed_" + hashlib.blake2b(where.encode(), digest_size=8).hexdigest()
        feed = Feed(engine, self.store, self.engine_id, channel=channel)
        self.feed = feed
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(feed.run)
                nursery.start_soon(self._fence)
                await self.beat()  # own a share before the devices start
                nursery.start_soon(self._beat_loop)
                engine.service_info[self.name] = self
                task_status.started(self)
        finally:
            self.held = set()
            with trio.move_on_after(3) as scope:
                scope.shield = True
                try:
                    await trio.to_thread.run_sync(self.store.leave, self.engine_id, self.epoch)
                except Exception as exc:
                    log.warning("cluster: leaving failed (the lease will pass): %s", exc)


def members_json(members: Iterable[Member]) -> list[dict[str, Any]]:
    return [m.to_json() for m in members]


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)
